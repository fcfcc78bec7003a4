"""How LungSeg handles films that are not stored upright, measured end to end on labelled films it never trained on.

Every film is segmented as stored and as copies made from it (mirrored, turned by 90, 180 and 270 degrees,
intensity-inverted), through the same `Segmenter.segment` that `lungseg segment` and the Slicer module use. Each
copy's labelmap is scored against the reference moved the same way, with label values kept (a mirrored film's
right lung is still the patient's right lung). A right/left swap is a labelmap whose right lung overlaps the
reference's left lung more than its right.
"""

from __future__ import annotations

import numpy as np

from ..definitions import LEFT_LUNG, RIGHT_LUNG
from ..inference.orientation import UPRIGHT, State, apply_geometry
from ..io.labelled import Case, case_label
from ..io.radiograph import read_radiograph
from ..qc.model import assess
from .metrics import both_lung_dice, dice_from_counts

COPIES = {
    "stored": UPRIGHT,
    "mirrored": State(mirrored=True),
    "rotated 90": State(k=1),
    "rotated 180": State(k=2),
    "rotated 270": State(k=3),
    "mirrored + rotated 90": State(k=1, mirrored=True),
    "inverted": State(inverted=True),
}


def stored_copy(state: State, pixels: np.ndarray) -> np.ndarray:
    """The film as a file in `state` would hold it."""
    moved = apply_geometry(state, pixels)
    return moved.max() + moved.min() - moved if state.inverted else moved


def side_dice(pred: np.ndarray, truth: np.ndarray, value: int, other: int) -> float:
    p, t = pred == value, truth == other
    tp = int(np.count_nonzero(p & t))
    return dice_from_counts(tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp)


def score_copy(segmenter, pixels: np.ndarray, truth: np.ndarray, state: State) -> dict:
    """One copy of a film: what the classifier found and corrected, the Dice against the moved reference, whether
    right and left were swapped, and its QC."""
    prediction = segmenter.segment(stored_copy(state, pixels))
    truth = apply_geometry(state, truth)
    finding = prediction.orientation
    label = prediction.label
    kept = side_dice(label, truth, RIGHT_LUNG, RIGHT_LUNG) + side_dice(label, truth, LEFT_LUNG, LEFT_LUNG)
    crossed = side_dice(label, truth, RIGHT_LUNG, LEFT_LUNG) + side_dice(label, truth, LEFT_LUNG, RIGHT_LUNG)
    return {
        "found": finding.state.name if finding else "",
        "probability": round(finding.probability, 4) if finding else None,
        "corrected": finding.applied.name if finding else "",
        "recognised": bool(finding and finding.applied == state),
        "turn_and_inversion_corrected": bool(
            finding and finding.applied.without(mirrored=True) == state.without(mirrored=True)
        ),
        "both_dice": round(both_lung_dice(prediction.label, truth), 4),
        "sides_dice": round(kept / 2, 4),
        "swapped": bool(crossed > kept),
        "qc": assess(prediction, segmenter).qc,
    }


def score_film(segmenter, case: Case, copies: dict[str, State] = COPIES) -> list[dict]:
    """Every copy of one labelled film."""
    image = read_radiograph(case.image)
    truth = case_label(case)
    return [
        {"image": case.image.name, "copy": name, **score_copy(segmenter, image.pixels, truth, state)}
        for name, state in copies.items()
    ]


def summarize_copies(rows: list[dict]) -> dict:
    """Per copy: the share recognised (the classifier's correction is exactly the copy's state) and the share whose
    turn and inversion were undone, the mean Dice and its change from the stored films, swaps (all, among the
    recognised, and silent: with qc=ok), and the share flagged by QC."""
    stored = {r["image"]: r for r in rows if r["copy"] == "stored"}
    out = {}
    for name in dict.fromkeys(r["copy"] for r in rows):
        group = [r for r in rows if r["copy"] == name]
        change = [r["sides_dice"] - stored[r["image"]]["sides_dice"] for r in group]
        out[name] = {
            "films": len(group),
            "recognised": float(np.mean([r["recognised"] for r in group])),
            "turn_and_inversion_corrected": float(np.mean([r["turn_and_inversion_corrected"] for r in group])),
            "called_changed" if name == "stored" else "missed": float(np.mean([not r["recognised"] for r in group])),
            "mean_sides_dice": float(np.mean([r["sides_dice"] for r in group])),
            "mean_dice_change": float(np.mean(change)),
            "within_0.01": float(np.mean(np.abs(change) <= 0.01)),
            "swaps": int(sum(r["swapped"] for r in group)),
            "swaps_recognised": int(sum(r["swapped"] and r["recognised"] for r in group)),
            "silent_swaps": int(sum(r["swapped"] and r["qc"] == "ok" for r in group)),
            "qc_check": float(np.mean([r["qc"] == "check" for r in group])),
        }
    return out
