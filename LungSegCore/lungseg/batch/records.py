"""The output ledger of `lungseg segment`: output names and paths, each input's record, shards and the results table.

Every input gets a record `OUT_DIR/.lungseg/<name>.json`, written last and atomically: it marks the input as
complete, so a rerun skips it (unless `--overwrite`) and a killed run loses nothing. `results.csv` and `results.json`
gather all records in the folder, which also makes the outputs of several `--shard I/N` jobs add up to one table.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import LungSegError
from ..inference.orientation import ALL_CORRECTIONS, Corrections
from ..io.files import remove_partial_files, stem_of, write_atomic_text, write_csv
from ..io.radiograph import DEFAULT_MAX_PIXELS, OUTPUT_FORMATS

RESULT_FIELDS = [
    "input",
    "status",
    "error",
    "output",
    "overlay",
    "probabilities",
    "uncertainty_map",
    "thumbnail",
    "model",
    "model_version",
    "definition",
    "device",
    "rows",
    "columns",
    "spacing_row_mm",
    "spacing_col_mm",
    "right_area_px",
    "left_area_px",
    "right_area_mm2",
    "left_area_mm2",
    "lung_fraction",
    "right_left_ratio",
    "quality",
    "qc_threshold",
    "qc",
    "qc_reasons",
    "uncertainty_mean",
    "orientation",
    "orientation_corrected",
    "read_ms",
    "preprocess_ms",
    "inference_ms",
    "postprocess_ms",
    "write_ms",
]
RECORDS = ".lungseg"
THUMBNAILS = "thumbs"  # OUT/.lungseg/thumbs/<name>.jpg, for the review page


@dataclass
class Options:
    fmt: str = "nrrd"
    overlays: bool = False
    save_probabilities: bool = False
    uncertainty: bool = False
    overwrite: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # refuse larger images before decoding them (None: no limit)
    orientation: bool = True  # check each film's orientation with the classifier
    corrections: Corrections = ALL_CORRECTIONS  # what a found orientation may correct


def output_names(paths: list[Path]) -> dict[Path, str]:
    """A unique output stem per input: the file's stem, with a counter where two inputs share one."""
    names, used = {}, {}
    for path in paths:
        stem = stem_of(path)
        count = used.get(stem.lower(), 0)
        used[stem.lower()] = count + 1
        names[path] = stem if count == 0 else f"{stem}__{count + 1}"
    return names


def in_shard(path: Path, shard: tuple[int, int] | None) -> bool:
    """Shard I of N (1-based) by a hash of the path as given: every job agrees, with no overlap and no gap."""
    if shard is None:
        return True
    index, count = shard
    digest = int(hashlib.sha1(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:12], 16)
    return digest % count == index - 1


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise LungSegError(f"--shard '{text}': expected I/N, e.g. 3/10") from None
    if not 1 <= index <= count:
        raise LungSegError(f"--shard '{text}': I must be between 1 and N")
    return index, count


def record_path(out_dir: Path, name: str) -> Path:
    """The input's record, written last: it marks the input complete."""
    return out_dir / RECORDS / f"{name}.json"


def output_paths(out_dir: Path, name: str, options: Options) -> dict[str, Path]:
    float_ext = ".nrrd" if options.fmt in ("png", "dicom-seg") else OUTPUT_FORMATS[options.fmt]  # those hold no floats
    paths = {"output": out_dir / f"{name}{OUTPUT_FORMATS[options.fmt]}"}
    if options.overlays:
        paths["overlay"] = out_dir / f"{name}_overlay.png"
    if options.save_probabilities:
        paths["probabilities"] = out_dir / f"{name}_probabilities{float_ext}"
    if options.uncertainty:
        paths["uncertainty_map"] = out_dir / f"{name}_uncertainty{float_ext}"
    paths["thumbnail"] = out_dir / RECORDS / THUMBNAILS / f"{name}.jpg"  # always: the review page shows every input
    return paths


def is_complete(record_path: Path, expected: dict[str, Path]) -> bool:
    """An earlier run finished this input with the same outputs, all still present."""
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record.get("status") == "ok" and all(record.get(k) == str(p) and p.exists() for k, p in expected.items())


def remove_partial_outputs(out_dir: Path, name: str, options: Options) -> None:
    """Remove what a killed writer left half-written of this input's outputs and record."""
    for output in [*output_paths(out_dir, name, options).values(), record_path(out_dir, name)]:
        remove_partial_files(output)


def collect_results(out_dir: Path) -> list[dict]:
    rows = []
    for record in sorted((out_dir / RECORDS).glob("*.json")):
        try:
            rows.append(json.loads(record.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # a record being replaced by another shard right now; it is complete in its own table
    return sorted(rows, key=lambda r: r.get("input", ""))


def write_results(rows: list[dict], out_dir: Path) -> None:
    write_csv(rows, RESULT_FIELDS, out_dir / "results.csv")
    write_atomic_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", out_dir / "results.json")
