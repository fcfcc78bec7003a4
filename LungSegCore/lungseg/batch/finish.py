"""Finishing one input in a finisher process beside the model: post-processing, QC, and writing its outputs and
record."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..inference.labels import lung_areas
from ..inference.orientation_classifier import orientation_corrected
from ..inference.postprocess import postprocess
from ..io.files import write_atomic_text
from ..io.radiograph import OUTPUT_FORMATS, Radiograph, write_float_map, write_labelmap
from ..qc.model import assess
from .overlay import write_overlay, write_thumbnail
from .records import Options
from .workers import WORKING


def write_outputs(
    prediction, image: Radiograph, paths: dict[str, Path], row: dict, record: Path, thumbnail=None
) -> dict:
    t0 = time.perf_counter()
    if paths["output"].name.endswith(OUTPUT_FORMATS["dicom-seg"]):
        from ..io.dicomseg import write_dicom_seg

        write_dicom_seg(
            prediction.label, image.path, paths["output"], row["model"], row["model_version"], row["definition"]
        )
    else:
        write_labelmap(prediction.label, image.reference, paths["output"])
    if "overlay" in paths:
        write_overlay(image.pixels, prediction.label, paths["overlay"])
    if "probabilities" in paths:
        write_float_map(prediction.probabilities, image.reference, paths["probabilities"])
    if "uncertainty_map" in paths:
        write_float_map(prediction.uncertainty, image.reference, paths["uncertainty_map"])
    if "thumbnail" in paths:
        write_thumbnail(thumbnail, prediction.label, paths["thumbnail"])
    row.update({k: str(p) for k, p in paths.items()}, write_ms=round((time.perf_counter() - t0) * 1e3, 1))
    write_atomic_text(json.dumps(row), record)  # last: marks the input complete
    return row


def finish_row(item: dict, output: tuple, options: Options, card: dict) -> tuple:
    """Post-process one model output (`ModelOutput.item`: probabilities, uncertainty, member spread) into its
    prediction (on the input grid) and its results row, with its QC (`quality.assess`: the rules of the card's
    lung definition and the predicted quality of its `qc` block)."""
    t0 = time.perf_counter()
    image: Radiograph = item["image"]
    probabilities, uncertainty, member_spread = output
    finding = item.get("orientation")
    prediction = postprocess(
        probabilities,
        image.shape,
        uncertainty,
        options.save_probabilities,
        image.display_flips,
        member_spread,
        item.get("model_image"),
        finding,
    )
    assessment = assess(prediction, card)
    row = {
        "rows": image.shape[0],
        "columns": image.shape[1],
        "spacing_row_mm": image.spacing[0] if image.spacing else "",
        "spacing_col_mm": image.spacing[1] if image.spacing else "",
        **lung_areas(prediction.label, image.pixel_area_mm2),
        "quality": "" if assessment.quality is None else assessment.quality,
        "qc": assessment.qc,
        "qc_reasons": "; ".join(assessment.reasons),
        "qc_threshold": assessment.threshold,
        "uncertainty_mean": round(float(prediction.uncertainty[prediction.label > 0].mean()), 4)
        if prediction.uncertainty is not None and (prediction.label > 0).any()
        else "",
        "orientation": finding.found if finding else "",
        "orientation_corrected": orientation_corrected(image.display_flips, finding),
        "read_ms": round(item["read_ms"], 1),
        "preprocess_ms": round(item["preprocess_ms"], 1),
        "postprocess_ms": round((time.perf_counter() - t0) * 1e3, 1),
    }
    return prediction, row


def finish_and_write(
    item: dict, output: tuple, options: Options, card: dict, paths: dict[str, Path], row: dict, record: Path
) -> dict:
    """Post-processing, QC and writing of one input, run in a separate process beside the model."""
    with WORKING:
        prediction, stats = finish_row(item, output, options, card)
        return write_outputs(prediction, item["image"], paths, {**row, **stats}, record, item.get("thumbnail"))
