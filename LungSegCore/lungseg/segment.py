"""Batch segmentation: `lungseg segment INPUT... -o OUT_DIR`.

Each input gets a labelmap on its own grid (`OUT_DIR/<stem>.<ext>`), optionally an overlay PNG, and one row in
`OUT_DIR/results.csv`. A bad input becomes an error row and a message on stderr; the rest of the batch goes on.
"""
from __future__ import annotations

import csv
import io as _io
import sys
import time
from pathlib import Path

from .io import OUTPUT_FORMATS, ImageReadError, list_inputs, read_radiograph, stem_of, write_atomic_text, \
    write_labelmap, write_overlay
from .labels import LEFT_LUNG, RIGHT_LUNG

RESULT_FIELDS = ["input", "status", "error", "output", "overlay", "model", "definition", "rows", "columns",
                 "spacing_row_mm", "spacing_col_mm", "right_area_px", "left_area_px", "right_area_mm2",
                 "left_area_mm2"]


def output_names(paths: list[Path]) -> dict[Path, str]:
    """A unique output stem per input: the file's stem, with a counter where two inputs share one."""
    names, used = {}, {}
    for path in paths:
        stem = stem_of(path)
        count = used.get(stem.lower(), 0)
        used[stem.lower()] = count + 1
        names[path] = stem if count == 0 else f"{stem}__{count + 1}"
    return names


def lung_areas(label, pixel_area_mm2: float | None) -> dict:
    right, left = int((label == RIGHT_LUNG).sum()), int((label == LEFT_LUNG).sum())
    row = {"right_area_px": right, "left_area_px": left, "right_area_mm2": "", "left_area_mm2": ""}
    if pixel_area_mm2 is not None:
        row["right_area_mm2"] = round(right * pixel_area_mm2, 1)
        row["left_area_mm2"] = round(left * pixel_area_mm2, 1)
    return row


def segment_one(segmenter, path: Path, out_stem: Path, fmt: str, overlay: bool) -> dict:
    image = read_radiograph(path)
    prediction = segmenter.segment(image.pixels)
    output = out_stem.with_name(out_stem.name + OUTPUT_FORMATS[fmt])
    write_labelmap(prediction.label, image.reference, output)
    row = {"output": str(output), "rows": image.shape[0], "columns": image.shape[1],
           "spacing_row_mm": image.spacing[0] if image.spacing else "",
           "spacing_col_mm": image.spacing[1] if image.spacing else "",
           **lung_areas(prediction.label, image.pixel_area_mm2)}
    if overlay:
        overlay_path = out_stem.with_name(out_stem.name + "_overlay.png")
        write_overlay(image.pixels, prediction.label, overlay_path)
        row["overlay"] = str(overlay_path)
    return row


def write_results(rows: list[dict], path: Path) -> None:
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic_text(buffer.getvalue(), path)


def run_segment(inputs: list[str], out_dir: str | Path, model: str = "unet", fmt: str = "nrrd",
                overlays: bool = False, device: str = "auto", recursive: bool = False) -> int:
    """Segment every input; returns the process exit status (0 only when every input succeeded)."""
    from tqdm import tqdm

    from .inference import Segmenter

    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format '{fmt}'; choose one of {', '.join(OUTPUT_FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = list_inputs(inputs, recursive=recursive)
    if not paths:
        print(f"lungseg: no input images found in {', '.join(map(str, inputs))}", file=sys.stderr)
        return 2
    segmenter = Segmenter(model, device)
    names = output_names(paths)
    rows, failed, t0 = [], 0, time.time()
    for path in tqdm(paths, desc="segmenting", unit="image"):
        row = {"input": str(path), "model": segmenter.name, "definition": segmenter.card.get("definition", "")}
        try:
            row.update(segment_one(segmenter, path, out_dir / names[path], fmt, overlays), status="ok", error="")
        except ImageReadError as exc:
            row.update(status="error", error=exc.problem)
        except Exception as exc:  # one broken file must not stop the batch
            row.update(status="error", error=f"{type(exc).__name__}: {exc}")
        if row["status"] == "error":
            failed += 1
            tqdm.write(f"lungseg: error: {path}: {row['error']}", file=sys.stderr)
        rows.append(row)
    write_results(rows, out_dir / "results.csv")
    elapsed = time.time() - t0
    print(f"lungseg: {len(rows) - failed} of {len(rows)} segmented, {failed} failed, in {elapsed:.1f} s "
          f"({len(rows) / max(elapsed, 1e-9):.1f} images/s); results in {out_dir / 'results.csv'}")
    return 1 if failed else 0
