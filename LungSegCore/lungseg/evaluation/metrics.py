"""Overlap and distance metrics per lung, computed with MONAI: per image for `lungseg evaluate`, per batch for
training and validation."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..definitions import IGNORE, LEFT_LUNG, RIGHT_LUNG
from ..nets.networks import predict_logits

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


def iou_from_dice(dice: torch.Tensor) -> torch.Tensor:
    """IoU (Jaccard) of the same pair of masks: J = D / (2 - D)."""
    return dice / (2 - dice)


def scorable(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The truth with IGNORE pixels set to the prediction, so they count neither for nor against it."""
    return torch.where(truth == IGNORE, pred.to(truth.dtype), truth)


def overlap(pred: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU of the both-lung region of (B, 1, H, W) label batches."""
    pred, truth = pred.cpu(), truth.cpu()
    dice = batch_dice(pred, scorable(pred, truth), "both")
    return dice, iou_from_dice(dice)


@torch.no_grad()
def evaluate_sets(model, loss_fn, sets: dict, device: torch.device, batch_size: int = 16) -> tuple[dict, dict]:
    """Loss, IoU and Dice (both lungs; Dice also per lung) of a model on each of `sets` (name -> (images,
    labels) at the model's resolution), and the per-image both-lung Dice. Leaves the model in training mode."""
    model.eval()
    scores, per_image = {}, {}
    for name, (images, labels) in sets.items():
        losses, dice = [], {"both": [], "right": [], "left": []}
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].float().to(device)
            y = labels[i:i + batch_size].long()
            logits = predict_logits(model, x).float()
            losses.append(float(loss_fn(logits, y.to(device))) * len(x))
            pred = logits.argmax(1, keepdim=True).cpu()
            for region in dice:
                dice[region].append(batch_dice(pred, scorable(pred, y), region))
        both = torch.cat(dice["both"])
        scores.update({f"{name}/loss": sum(losses) / len(images), f"{name}/iou": float(iou_from_dice(both).mean()),
                       **{f"{name}/dice_{r}": float(torch.cat(v).mean()) for r, v in dice.items()}})
        per_image[name] = both
    model.train()
    return scores, per_image


def hd95(pred: torch.Tensor, truth: torch.Tensor, spacing: list[float] | None) -> float:
    """95th-percentile symmetric Hausdorff distance of two non-empty (H, W) masks.

    The value of MONAI's `compute_hausdorff_distance(..., percentile=95)`, from the same MONAI steps (edges,
    surface distances both ways, percentile, larger of the two). That function passes `get_mask_edges` an
    argument MONAI deprecated itself, and its FutureWarning reached every `lungseg evaluate` user.
    """
    from monai.metrics import get_mask_edges, get_surface_distance

    edges_pred, edges_truth = get_mask_edges(pred, truth)
    distances = (get_surface_distance(edges_pred, edges_truth, "euclidean", spacing),
                 get_surface_distance(edges_truth, edges_pred, "euclidean", spacing))
    return float(max(torch.quantile(d, 0.95) for d in distances))


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


def image_metrics(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float] | None,
                  regions=("both", "right", "left"), ignore: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy, precision, recall, IoU, Dice and HD95 for each region of one (H, W) label pair.

    HD95 is in mm when `spacing` (row, column) is known, otherwise in pixels; NaN when either mask is empty.
    Pixels under `ignore` (devices or markup the annotators could not label) count neither way: both sides are
    set to background there, so they add no false positive, false negative or boundary.
    """
    from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix

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
        out[f"{region}_dice"] = dice_from_counts(tp, fp, fn)
        if p.any() and t.any():
            out[f"{region}_hd95"] = hd95(p[0, 0], t[0, 0], list(spacing) if spacing else None)
        else:
            out[f"{region}_hd95"] = math.nan
    return out
