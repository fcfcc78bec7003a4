"""Films that are not stored upright, end to end: the held-out splits of ../shared/data, each film as stored and as
mirrored, turned and inverted copies, segmented as `lungseg segment` segments them; and non-chest inputs.

    .venv/bin/python scripts/orientation_study.py [--data ../shared/data] [--model unet] [--out orientation-study]

Writes OUT/copies.csv (one row per copy), OUT/non-chest.csv (photos, an extremity CR, noise and a gradient, each in
all 16 states) and OUT/summary.json (per set and copy: recognised, Dice change, swaps, QC), and prints the summary.
Takes about 10 minutes on one core for the 1,008 held-out films.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LungSegCore"))

from lungseg.evaluation.orientation import score_film, stored_copy, summarize_copies  # noqa: E402
from lungseg.inference.orientation import STATES  # noqa: E402
from lungseg.inference.segmenter import Segmenter  # noqa: E402
from lungseg.io.files import write_csv  # noqa: E402
from lungseg.io.selection import entry_cases  # noqa: E402
from lungseg.qc.model import assess  # noqa: E402

HELDOUT = [
    {"set": "jsrt", "split": "val"},
    {"set": "covid-qu-ex", "split": ["val", "test"]},
    {"set": "v7-full", "split": "val"},
]


def nonchest_inputs() -> dict[str, np.ndarray]:
    """Photos (scikit-image), an extremity CR (pydicom-data), noise and gradients: none is a chest film."""
    import skimage.data
    from pydicom.data import get_testdata_file

    from lungseg.io.radiograph import read_radiograph

    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:256, :256] / 255.0
    names = ("camera", "coins", "astronaut", "moon", "text", "coffee", "chelsea", "page", "shepp_logan_phantom")
    names += ("rocket", "brick", "grass", "gravel", "horse", "hubble_deep_field", "retina", "cell", "logo", "clock")
    images = {name: getattr(skimage.data, name)() for name in names}
    images = {name: image.mean(axis=-1) if image.ndim == 3 else image for name, image in images.items()}
    images["extremity CR (RG3_UNCR)"] = read_radiograph(get_testdata_file("RG3_UNCR.dcm")).pixels
    images["uniform noise"] = rng.random((256, 256))
    images["gradient"] = rows + cols
    return {name: np.asarray(image, dtype=np.float32) for name, image in images.items()}


def nonchest_rows(segmenter) -> list[dict]:
    """Each non-chest input in all 16 states: what was found, corrected, and its QC."""
    rows = []
    for name, pixels in nonchest_inputs().items():
        for state in STATES:
            prediction = segmenter.segment(stored_copy(state, pixels))
            finding = prediction.orientation
            rows.append(
                {
                    "input": name,
                    "state": state.name,
                    "found": finding.found,
                    "corrected": finding.corrected,
                    "qc": assess(prediction, segmenter).qc,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--model", default="unet")
    parser.add_argument("--out", default="orientation-study")
    parser.add_argument("--every", type=int, default=1, help="every N-th film of each set (a quick look)")
    parser.add_argument("--non-chest-only", action="store_true", help="only the non-chest inputs")
    args = parser.parse_args()
    segmenter = Segmenter(args.model, "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary, all_rows = {}, []
    for entry in [] if args.non_chest_only else HELDOUT:
        rows = [row for case in entry_cases(args.data, entry)[:: args.every] for row in score_film(segmenter, case)]
        all_rows += [{"set": entry["set"], **row} for row in rows]
        summary[entry["set"]] = summarize_copies(rows)
        print(entry["set"], json.dumps(summary[entry["set"]], indent=1), flush=True)
    rows = nonchest_rows(segmenter)
    write_csv(rows, list(rows[0]), out / "non-chest.csv")
    summary["non-chest"] = {
        "inputs": len({r["input"] for r in rows}),
        "copies": len(rows),
        "corrected": sum(bool(r["corrected"]) for r in rows),
        "qc_check": sum(r["qc"] == "check" for r in rows),
    }
    print("non-chest", json.dumps(summary["non-chest"]))
    if all_rows:
        write_csv(all_rows, list(all_rows[0]), out / "copies.csv")
    (out / "summary.json").write_text(json.dumps({"model": args.model, "sets": summary}, indent=1))


if __name__ == "__main__":
    main()
