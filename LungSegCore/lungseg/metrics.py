"""Overlap and distance metrics per lung, computed with MONAI."""
from __future__ import annotations

import math

import numpy as np
import torch

from .labels import LEFT_LUNG, RIGHT_LUNG

REGIONS = {"both": None, "right": RIGHT_LUNG, "left": LEFT_LUNG}
METRICS = ("accuracy", "precision", "recall", "iou", "dice", "hd95")


def region_mask(label: np.ndarray | torch.Tensor, region: str):
    value = REGIONS[region]
    return (label > 0) if value is None else (label == value)


def batch_dice(pred: torch.Tensor, truth: torch.Tensor, region: str) -> torch.Tensor:
    """Dice of one region for (B, 1, H, W) label batches; an image where both are empty scores 1."""
    from monai.metrics import compute_dice

    p = region_mask(pred, region).float()
    t = region_mask(truth, region).float()
    return compute_dice(p, t, include_background=True, ignore_empty=False)[:, 0]


def image_metrics(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float] | None,
                  regions=("both", "right", "left"), ignore: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy, precision, recall, IoU, Dice and HD95 for each region of one (H, W) label pair.

    HD95 is in mm when `spacing` (row, column) is known, otherwise in pixels; NaN when either mask is empty.
    Pixels under `ignore` (devices or markup the annotators could not label) count neither way: both sides are
    set to background there, so they add no false positive, false negative or boundary.
    """
    from monai.metrics import compute_confusion_matrix_metric, compute_hausdorff_distance, get_confusion_matrix

    if ignore is not None and ignore.any():
        pred, truth = np.where(ignore, 0, pred), np.where(ignore, 0, truth)
    out = {}
    for region in regions:
        p = torch.as_tensor(region_mask(pred, region))[None, None].float()
        t = torch.as_tensor(region_mask(truth, region))[None, None].float()
        confusion = get_confusion_matrix(p, t, include_background=True)
        for name, key in (("accuracy", "accuracy"), ("precision", "precision"), ("recall", "sensitivity")):
            out[f"{region}_{name}"] = float(compute_confusion_matrix_metric(key, confusion)[0, 0])
        tp, fp, _, fn = confusion[0, 0].tolist()
        union = tp + fp + fn
        out[f"{region}_iou"] = tp / union if union else 1.0
        out[f"{region}_dice"] = 2 * tp / (2 * tp + fp + fn) if union else 1.0
        if p.any() and t.any():
            hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95,
                                            spacing=list(spacing) if spacing else None)
            out[f"{region}_hd95"] = float(hd[0, 0])
        else:
            out[f"{region}_hd95"] = math.nan
    return out
