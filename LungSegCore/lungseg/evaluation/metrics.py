"""Overlap and distance metrics per lung and image, for `lungseg evaluate` and the QC fit, in NumPy and SciPy (MONAI's
definitions; the training's batch metrics are `training.validation`)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ..definitions import IGNORE, LEFT_LUNG, RIGHT_LUNG

REGIONS = {"both": None, "right": RIGHT_LUNG, "left": LEFT_LUNG}
METRICS = ("accuracy", "precision", "recall", "iou", "dice", "hd95")


def region_mask(label, region: str):
    value = REGIONS[region]
    return (label > 0) if value is None else (label == value)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: list[float] | None) -> float:
    """95th-percentile symmetric Hausdorff distance of two non-empty (H, W) masks, as MONAI's
    `compute_hausdorff_distance(..., percentile=95)` defines it: each mask's edge (the mask less its erosion), the
    distances from one edge to the other both ways, each one's 95th percentile (linear), the larger."""
    edges = [mask ^ ndimage.binary_erosion(mask) for mask in (pred, truth)]
    return float(
        max(
            np.quantile(ndimage.distance_transform_edt(~to, sampling=spacing)[frm], 0.95)
            for frm, to in ((edges[0], edges[1]), (edges[1], edges[0]))
        )
    )


def dice_from_counts(tp: float, fp: float, fn: float) -> float:
    """Dice from one region's true positives, false positives and false negatives; 1 where both masks are empty."""
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def both_lung_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """`image_metrics`' both_dice of one (H, W) label pair whose truth marks ignored pixels IGNORE (as
    `data.case_label` does), without the other metrics: the QC fit scores thousands of results."""
    keep = truth != IGNORE
    p, t = region_mask(pred, "both") & keep, region_mask(truth, "both") & keep
    tp = int(np.count_nonzero(p & t))
    return dice_from_counts(tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp)


def image_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: tuple[float, float] | None,
    regions=("both", "right", "left"),
    ignore: np.ndarray | None = None,
) -> dict[str, float]:
    """Accuracy, precision, recall, IoU, Dice and HD95 for each region of one (H, W) label pair.

    HD95 is in mm when `spacing` (row, column) is known, otherwise in pixels; NaN when either mask is empty.
    Pixels under `ignore` (devices or markup the annotators could not label) count neither way: both sides are
    set to background there, so they add no false positive, false negative or boundary.
    """
    if ignore is not None and ignore.any():
        pred, truth = np.where(ignore, 0, pred), np.where(ignore, 0, truth)
    out = {}
    for region in regions:
        p, t = region_mask(pred, region), region_mask(truth, region)
        tp = int(np.count_nonzero(p & t))
        fp, fn = int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp
        tn = p.size - tp - fp - fn
        for name, (numerator, denominator) in (
            ("accuracy", (tp + tn, p.size)),
            ("precision", (tp, tp + fp)),
            ("recall", (tp, tp + fn)),
        ):
            out[f"{region}_{name}"] = numerator / denominator if denominator else math.nan
        union = tp + fp + fn
        out[f"{region}_iou"] = tp / union if union else 1.0
        out[f"{region}_dice"] = dice_from_counts(tp, fp, fn)
        out[f"{region}_hd95"] = hd95(p, t, list(spacing) if spacing else None) if p.any() and t.any() else math.nan
    return out
