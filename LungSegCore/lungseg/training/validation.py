"""Validation metrics during training (torch and MONAI): Dice, IoU and loss of label batches at the model's
resolution. The per-image metrics of `lungseg evaluate` are `evaluation.metrics`, in NumPy."""

from __future__ import annotations

import torch

from ..definitions import IGNORE
from ..evaluation.metrics import region_mask
from ..nets.networks import predict_logits


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
            x = images[i : i + batch_size].float().to(device)
            y = labels[i : i + batch_size].long()
            logits = predict_logits(model, x).float()
            losses.append(float(loss_fn(logits, y.to(device))) * len(x))
            pred = logits.argmax(1, keepdim=True).cpu()
            for region in dice:
                dice[region].append(batch_dice(pred, scorable(pred, y), region))
        both = torch.cat(dice["both"])
        scores.update(
            {
                f"{name}/loss": sum(losses) / len(images),
                f"{name}/iou": float(iou_from_dice(both).mean()),
                **{f"{name}/dice_{r}": float(torch.cat(v).mean()) for r, v in dice.items()},
            }
        )
        per_image[name] = both
    model.train()
    return scores, per_image
