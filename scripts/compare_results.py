#!/usr/bin/env python
"""Compare two `lungseg segment` output folders image by image: did the same model give the same answers?

    .venv/bin/python scripts/compare_results.py OLD_OUT NEW_OUT [--json report.json]

For every input segmented in both: the Dice between the two labelmaps (both lungs, on the input's grid), the
relative difference of the right and of the left lung area, the difference of `quality`, and whether the QC
decision (`qc`) is the same. Prints the worst image of each measure and the share of identical QC decisions;
used to check that a change of runtime (torch to ONNX Runtime) or version changes no answer that matters.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def read_rows(folder: Path) -> dict[str, dict]:
    with open(folder / "results.csv", newline="", encoding="utf-8") as f:
        return {row["input"]: row for row in csv.DictReader(f) if row["status"] == "ok"}


def labelmap(path: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(path)).squeeze()


def compare_one(old: dict, new: dict) -> dict:
    a, b = labelmap(old["output"]), labelmap(new["output"])
    lungs = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    same = int(np.count_nonzero((a == b) & (a > 0)))
    areas = {}
    for side in ("right", "left"):
        before, after = float(old[f"{side}_area_px"]), float(new[f"{side}_area_px"])
        areas[side] = abs(after - before) / before if before else float(after != before)
    quality = (
        abs(float(new["quality"]) - float(old["quality"]))
        if old["quality"] and new["quality"]
        else float(old["quality"] != new["quality"])
    )
    return {
        "dice": 2 * same / lungs if lungs else 1.0,
        "right_area": areas["right"],
        "left_area": areas["left"],
        "quality": quality,
        "same_qc": old["qc"] == new["qc"],
    }


def compare(old_folder: Path, new_folder: Path) -> dict:
    old, new = read_rows(old_folder), read_rows(new_folder)
    common = sorted(set(old) & set(new))
    per_image = {name: compare_one(old[name], new[name]) for name in common}
    report = {
        "images": len(common),
        "only_old": len(set(old) - set(new)),
        "only_new": len(set(new) - set(old)),
        "same_qc_share": sum(r["same_qc"] for r in per_image.values()) / max(len(common), 1),
    }
    for key, worst in (("dice", min), ("right_area", max), ("left_area", max), ("quality", max)):
        if per_image:
            name = worst(per_image, key=lambda n: per_image[n][key])
            report[f"worst_{key}"] = {"value": round(per_image[name][key], 6), "input": name}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args()
    report = compare(args.old, args.new)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report["images"] else 1


if __name__ == "__main__":
    sys.exit(main())
