"""Loss registry: a config name maps to a MONAI loss over (B, C, H, W) logits and (B, 1, H, W) labels."""
from __future__ import annotations

import torch

from .registry import Registry

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
