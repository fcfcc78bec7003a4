"""Accuracy of a model against reference masks: `lungseg evaluate --images DIR --masks DIR [--model NAME]`.

Writes a per-image CSV, a summary JSON and `worst_cases.png` (image, reference and prediction of the worst cases,
each with its Dice). Each image also gets its QC as `lungseg segment` gives it (`quality`, the predicted Dice, beside
the true Dice; `qc` and `qc_reasons`), and the summary's `qc_accuracy` says how well QC found the bad segmentations:
the recall of the images below Dice 0.90 and the false-flag rate above it at the card's threshold, and the Spearman
correlation of the quality with the Dice. Users can check QC on their own labelled data before they trust it.
Right and left lungs are scored when `masks_right/` and `masks_left/` exist beside the masks folder (or are given);
the merged both-lung mask is always scored. Pixels marked in `masks_ignore/` beside the masks (devices or markup
over the lung) are left out of every score.
HD95 is in mm where the image file states its pixel size, otherwise in pixels; `spacing_mm` (`--spacing-mm`) gives the
pixel size of files that state none (PNG, JPEG), e.g. 0.7 mm for JSRT at 512² (its 2048² originals are 0.175 mm).
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from ..batch.overlay import write_case_sheet
from ..errors import LungSegError
from ..inference.labels import split_left_right
from ..inference.orientation import ALL_CORRECTIONS, Corrections
from ..inference.orientation_classifier import orientation_corrected
from ..io.files import list_inputs, write_atomic_text, write_csv
from ..io.labelled import Case, case_sides, find_mask, labelled_case, read_gray, read_splits
from ..io.radiograph import ImageReadError, read_radiograph
from ..qc.model import assess, quality_model
from ..qc.stats import DICE_LIMIT, qc_accuracy, qc_accuracy_text
from .metrics import METRICS, image_metrics

SUMMARY_STATS = {"mean": np.mean, "std": np.std, "median": np.median, "min": np.min, "max": np.max}
WORST_SHOWN = 5  # in the summary and in worst_cases.png


def summarize(rows: list[dict], regions: tuple[str, ...], worst: int = WORST_SHOWN) -> dict:
    summary = {"images": len(rows)}
    for region in regions:
        for metric in METRICS:
            key = f"{region}_{metric}"
            values = np.array([r[key] for r in rows if not math.isnan(r[key])], dtype=np.float64)
            if values.size:
                summary[key] = {
                    **{name: float(stat(values)) for name, stat in SUMMARY_STATS.items()},
                    "n": int(values.size),
                }
    ranked = sorted(rows, key=lambda r: r["both_dice"])
    summary["worst_cases"] = [
        {
            "image": r["image"],
            "both_dice": r["both_dice"],
            **({"right_dice": r["right_dice"], "left_dice": r["left_dice"]} if "right_dice" in r else {}),
        }
        for r in ranked[:worst]
    ]
    return summary


def case_caption(image: Path, metrics: dict, scored: tuple[str, ...]) -> str:
    """`name: Dice 0.9512 (right 0.9601, left 0.9410)`, per lung where the reference has sides."""
    sides = [f"{r} {metrics[f'{r}_dice']:.4f}" for r in scored if r != "both"]
    return f"{image.name}: Dice {metrics['both_dice']:.4f}" + (f" ({', '.join(sides)})" if sides else "")


def evaluate(
    images: str | Path,
    masks: str | Path,
    model: str = "unet",
    out_dir: str | Path | None = None,
    split: str | None = None,
    masks_right: str | Path | None = None,
    masks_left: str | Path | None = None,
    device: str = "auto",
    segmenter=None,
    truth_definition: str | None = None,
    uncertainty: bool = False,
    spacing_mm: float | None = None,
    names: list[str] | None = None,
    orientation: bool = True,
    corrections: Corrections = ALL_CORRECTIONS,
) -> dict:
    """Segment every image that has a mask and score it; returns the summary (also written to `out_dir`).
    `uncertainty` segments as `lungseg segment --uncertainty` does, so that its QC is the one measured. `names`
    keeps only those image file names (a cross-validation fold); `spacing_mm` is the pixel size of images whose
    file states none. `orientation` and `corrections` as for `lungseg segment`."""
    from ..inference.segmenter import Segmenter

    images, masks = Path(images), Path(masks)
    masks_right = Path(masks_right) if masks_right else masks.parent / "masks_right"
    masks_left = Path(masks_left) if masks_left else masks.parent / "masks_left"
    regions = ("both", "right", "left") if masks_right.is_dir() and masks_left.is_dir() else ("both",)
    cases = labelled_cases(images, masks, masks_right, masks_left, split, names)
    if spacing_mm is not None and not spacing_mm > 0:
        raise LungSegError(f"--spacing-mm {spacing_mm}: a pixel size must be above 0 mm")

    segmenter = segmenter or Segmenter(model, device, orientation=orientation, corrections=corrections)
    if truth_definition and truth_definition != segmenter.definition:
        print(
            f"lungseg: warning: the reference masks follow '{truth_definition}' but model '{segmenter.name}' "
            f"segments '{segmenter.definition}'; the two protocols agree only at Dice ~0.86 on the same images, "
            "so low scores here do not mean wrong segmentations",
            file=sys.stderr,
        )
    rows, worst = score_cases(cases, segmenter, regions, uncertainty, spacing_mm)
    summary = {
        "model": segmenter.name,
        "definition_model": segmenter.definition,
        "definition_truth": truth_definition or "",
        "images_dir": str(images),
        "masks_dir": str(masks),
        "split": split or "",
        "regions": list(regions),
        "hd95_unit": "mm" if rows and all(r["hd95_unit"] == "mm" for r in rows) else "px",
        "spacing_mm": spacing_mm,
        **summarize(rows, regions),
        "qc_accuracy": qc_summary(rows, segmenter, uncertainty),
        "orientation_corrected": corrected_counts(rows),
    }
    if out_dir is not None:
        write_evaluation(rows, summary, worst, Path(out_dir))
    return summary


def labelled_cases(
    images: Path, masks: Path, masks_right: Path, masks_left: Path, split: str | None, names: list[str] | None
) -> list[Case]:
    """The images in `images` that have a mask in `masks` (of the same name, or the same stem), as cases: those of
    `split` in splits.csv beside the images folder, and of `names`, when given."""
    paths = list_inputs([images])
    splits = {}
    if split:
        splits = read_splits(images.parent)
        if not splits:
            raise LungSegError(f"{images.parent / 'splits.csv'}: needed for --split {split}")
        paths = [p for p in paths if splits.get(p.name) == split]
    if names is not None:
        wanted = set(names)
        paths = [p for p in paths if p.name in wanted]
    cases = [labelled_case(p, masks, splits.get(p.name, ""), find_mask, masks_right, masks_left) for p in paths]
    cases = [case for case in cases if case is not None]
    if not cases:
        raise LungSegError(
            f"no image in {images} has a mask in {masks}"
            + (f" (split {split})" if split else "")
            + (" among the names given" if names is not None else "")
        )
    return cases


def reference(case: Case, regions: tuple[str, ...]) -> tuple[np.ndarray, tuple[str, ...]]:
    """The case's reference label and the regions it scores: both lungs and each side where it has side masks,
    else both lungs alone."""
    sides = case_sides(case)
    if sides is None:
        return (read_gray(case.mask) > 0).astype(np.uint8), ("both",)
    return sides, regions


def score_cases(
    cases: list[Case], segmenter, regions: tuple[str, ...], uncertainty: bool, spacing_mm: float | None
) -> tuple[list[dict], list[tuple]]:
    """Segment and score every case: the rows, and the WORST_SHOWN lowest-Dice cases (dice, order, pixels, truth,
    prediction, scored, caption). An image that cannot be read, or whose masks do not fit it, is left out."""
    from tqdm import tqdm

    rows, worst = [], []
    for case in tqdm(cases, desc="evaluating", unit="image"):
        scored = score_case(case, segmenter, regions, uncertainty, spacing_mm)
        if scored is None:
            continue
        row, shown = scored
        rows.append(row)
        worst = sorted(worst + [(row["both_dice"], len(rows), *shown)], key=lambda entry: entry[:2])[:WORST_SHOWN]
    return rows, worst


def score_case(
    case: Case, segmenter, regions: tuple[str, ...], uncertainty: bool, spacing_mm: float | None
) -> tuple[dict, tuple] | None:
    """One case's row, and what the case sheet shows of it (pixels, truth, prediction, scored, caption); None,
    with an error line, when it cannot be scored."""
    try:
        image = read_radiograph(case.image)
    except ImageReadError as exc:
        print(f"lungseg: error: {exc}", file=sys.stderr)
        return None
    segmentation = segmenter.segment(
        image.pixels,
        uncertainty=uncertainty,
        display_flips=image.display_flips,
        orientation_stated=image.orientation_stated,
    )
    prediction, assessment = segmentation.label, assess(segmentation, segmenter)
    truth, scored = reference(case, regions)
    if truth.shape != prediction.shape:
        print(
            f"lungseg: error: {case.mask}: mask is {truth.shape[::-1]} but the image is {prediction.shape[::-1]}",
            file=sys.stderr,
        )
        return None
    ignore = read_gray(case.mask_ignore) > 0 if case.mask_ignore else None
    if ignore is not None and ignore.shape != truth.shape:
        print(
            f"lungseg: error: {case.mask_ignore}: ignore mask is {ignore.shape[::-1]} but the image is "
            f"{truth.shape[::-1]}",
            file=sys.stderr,
        )
        return None
    spacing = image.spacing or ((spacing_mm, spacing_mm) if spacing_mm else None)  # the file's own wins
    metrics = image_metrics(prediction, truth, spacing, regions=scored, ignore=ignore)
    row = {
        "image": str(case.image),
        "both_dice": metrics["both_dice"],
        "quality": math.nan if assessment.quality is None else assessment.quality,
        "qc": assessment.qc,
        "qc_reasons": "; ".join(assessment.reasons),
        "orientation": segmentation.orientation.found if segmentation.orientation else "",
        "orientation_corrected": orientation_corrected(image.display_flips, segmentation.orientation),
        "hd95_unit": "mm" if spacing else "px",
        "ignored_pixels": int(ignore.sum()) if ignore is not None else 0,
        **{f"{r}_{m}": metrics.get(f"{r}_{m}", math.nan) for r in regions for m in METRICS},
    }
    return row, (image.pixels, truth, prediction, scored, case_caption(case.image, metrics, scored))


def write_evaluation(rows: list[dict], summary: dict, worst: list[tuple], out_dir: Path) -> None:
    """`evaluation.csv`, `summary.json` and `worst_cases.png` in `out_dir`."""
    write_csv(rows, list(rows[0].keys()), out_dir / "evaluation.csv")
    write_atomic_text(json.dumps(summary, indent=2) + "\n", out_dir / "summary.json")
    if worst:
        # a truth without sides is split for the sheet only (never scored), and only for the cases shown
        write_case_sheet(
            [
                (pixels, truth if scored != ("both",) else split_left_right(truth), prediction, caption)
                for _, _, pixels, truth, prediction, scored, caption in worst
            ],
            out_dir / "worst_cases.png",
        )


def qc_summary(rows: list[dict], segmenter, uncertainty: bool = False) -> dict:
    """How well QC flagged the images below Dice 0.90 here (see `quality.qc_accuracy`): with every rule and the
    card's threshold (`qc`), and with the predicted quality alone (`quality_only`)."""
    fitted, mode = quality_model(segmenter.card, uncertainty)
    dice = [r["both_dice"] for r in rows]
    quality = [r["quality"] for r in rows]
    has_quality = fitted is not None and rows and not any(math.isnan(q) for q in quality)
    out = {
        "dice_limit": DICE_LIMIT,
        "threshold": fitted.threshold if fitted else None,
        "mode": mode if fitted else None,
        "fitted": fitted is not None,
        "qc": qc_accuracy(dice, [r["qc"] == "check" for r in rows], quality if has_quality else None),
    }
    if has_quality:
        out["quality_only"] = qc_accuracy(dice, [q < fitted.threshold for q in quality], quality)
    return out


def qc_line(summary: dict) -> str:
    """`QC (threshold 0.953): 7 of 8 below Dice 0.90 flagged (recall 0.88; 3 of 3 below 0.80), false flags 3.1%
    (12 of 390), ...`."""
    acc = summary.get("qc_accuracy")
    if not acc:
        return ""
    threshold = f"threshold {acc['threshold']:.3f}" if acc["threshold"] is not None else "no fitted quality"
    return f"QC ({threshold}): {qc_accuracy_text(acc['qc'])}"


def corrected_counts(rows: list[dict]) -> dict[str, int]:
    """How many images were corrected for orientation, by correction, e.g. {"rotated 90 (from the pixels)": 2}."""
    return dict(Counter(row["orientation_corrected"] for row in rows if row.get("orientation_corrected")))


def summary_line(summary: dict) -> str:
    parts = [f"{summary['images']} images"]
    for region in summary["regions"]:
        d = summary.get(f"{region}_dice")
        if d:
            parts.append(f"{region} Dice {d['mean']:.4f} (min {d['min']:.4f})")
    hd = summary.get("both_hd95")
    if hd:
        parts.append(f"HD95 {hd['mean']:.2f} {summary['hd95_unit']}")
    qc = qc_line(summary)
    corrected = sum(summary.get("orientation_corrected", {}).values())
    if corrected:
        parts.append(f"{corrected} corrected for orientation (see orientation_corrected)")
    return ", ".join(parts) + (f"; {qc}" if qc else "")
