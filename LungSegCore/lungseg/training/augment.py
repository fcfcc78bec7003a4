"""Training-only transforms (torch and MONAI): label resizing and the augmentation. The model input itself comes
from `inference/preprocess.py`, the one path that training and inference share."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize_label(label: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Resize an integer (H, W) label map with nearest-neighbour interpolation."""
    label = torch.as_tensor(np.asarray(label))
    out = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")
    return out[0, 0].to(torch.uint8)


def training_augmentation(cfg: dict):
    """MONAI dictionary transforms for `image` (1,H,W in [0,1]) and `label` (1,H,W). Never flips horizontally.

    Keys: rotate_deg, scale, translate (fractions), affine_prob; gamma (range), noise_std, intensity (shift/scale);
    a key set to 0, null or false leaves its transform out.
    """
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    size = cfg["size"]
    rotate = np.deg2rad(cfg.get("rotate_deg", 10.0) or 0.0)
    scale, translate = cfg.get("scale", 0.15) or 0.0, cfg.get("translate", 0.08) or 0.0
    transforms = []
    if rotate or scale or translate:
        transforms.append(
            RandAffined(
                keys=("image", "label"),
                prob=cfg.get("affine_prob", 0.8),
                rotate_range=(rotate,),
                scale_range=(scale, scale),
                translate_range=(translate * size, translate * size),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )
        )
    if cfg.get("gamma", (0.7, 1.5)):
        transforms.append(RandAdjustContrastd(keys="image", prob=0.5, gamma=tuple(cfg.get("gamma", (0.7, 1.5)))))
    if cfg.get("intensity", True):
        transforms += [
            RandScaleIntensityd(keys="image", prob=0.3, factors=0.1),
            RandShiftIntensityd(keys="image", prob=0.3, offsets=0.1),
        ]
    if cfg.get("noise_std", 0.02):
        transforms.append(RandGaussianNoised(keys="image", prob=0.3, std=cfg.get("noise_std", 0.02)))
    return Compose(transforms)
