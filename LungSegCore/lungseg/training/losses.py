"""Loss registry: a config name maps to a MONAI loss over (B, C, H, W) logits and (B, 1, H, W) labels."""

from __future__ import annotations

import torch

from ..registry import Registry

LOSSES = Registry("loss")
register = LOSSES.register
build_loss = LOSSES.build


@register("dice_ce")
def dice_ce(lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> torch.nn.Module:
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)


@register("bce_dice")
def bce_dice(lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> torch.nn.Module:
    """Binary cross-entropy per class (sigmoid) + Dice."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, sigmoid=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)


@register("bce_iou")
def bce_iou(lambda_iou: float = 1.0, lambda_ce: float = 1.0) -> torch.nn.Module:
    """Binary cross-entropy per class (sigmoid) + soft IoU (Jaccard)."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, sigmoid=True, jaccard=True, lambda_dice=lambda_iou, lambda_ce=lambda_ce)


class _DiceCEIgnoring(torch.nn.Module):
    def __init__(self, ignore_index: int, lambda_dice: float, lambda_ce: float):
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(to_onehot_y=True, softmax=True, ignore_index=ignore_index)
        self.ce = torch.nn.CrossEntropyLoss(ignore_index=ignore_index)
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lambda_dice * self.dice(logits, target) + self.lambda_ce * self.ce(logits, target[:, 0].long())


@register("dice_ce_ignore")
def dice_ce_ignore(lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> torch.nn.Module:
    """Dice + cross-entropy where pixels labelled IGNORE (masks_ignore/) count neither for nor against."""
    from ..definitions import IGNORE

    return _DiceCEIgnoring(IGNORE, lambda_dice, lambda_ce)


def training_loss(model, loss_fn, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits): the segmentation loss, averaged over deep-supervision outputs, plus the network's own term
    (the probabilistic U-Net's beta * KL) for networks that see the labels in training."""
    core = model.module if hasattr(model, "module") else model
    if getattr(core, "uses_labels_in_training", False):
        logits = model(x, y)
        return loss_fn(logits, y) + core.auxiliary_loss(), logits
    logits = model(x)
    if isinstance(logits, (list, tuple)):
        return sum(loss_fn(o, y) for o in logits) / len(logits), logits[-1]
    return loss_fn(logits, y), logits
