"""The one preprocessing path shared by training and inference, plus the training augmentation.

Model input: a grayscale radiograph resized to `size`x`size` (antialiased) and scaled to [0, 1] between its
0.5th and 99.5th intensity percentiles, so 8-bit PNGs, 12-bit DICOM and 16-bit TIFFs look alike to the network.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (..., H, W) float tensor with bilinear interpolation, antialiased when shrinking."""
    lead = image.shape[:-2]
    flat = image.reshape(-1, 1, *image.shape[-2:]).float()
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(*lead, *size)


def resize_label(label: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Resize an integer (H, W) label map with nearest-neighbour interpolation."""
    label = torch.as_tensor(np.asarray(label))
    out = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")
    return out[0, 0].to(torch.uint8)


def percentiles(flat: np.ndarray, percents: tuple[float, ...]) -> list[np.ndarray]:
    """torch.quantile's values (linear interpolation) along the last axis, with the last axis kept. One NumPy
    partition finds every order statistic needed, with less work than a sort or a kthvalue per statistic."""
    n = flat.shape[-1]
    positions = [p / 100 * (n - 1) for p in percents]
    below = [int(q) for q in positions]
    above = [min(i + 1, n - 1) for i in below]
    part = np.partition(flat, sorted(set(below + above)), axis=-1)
    return [part[..., i:i + 1] + (part[..., j:j + 1] - part[..., i:i + 1]) * (q - i)
            for q, i, j in zip(positions, below, above)]


def normalize_intensity(image: torch.Tensor) -> torch.Tensor:
    """Scale each (..., H, W) image to [0, 1] between its robust percentiles."""
    flat = image.reshape(*image.shape[:-2], -1).float()
    low, high = (torch.from_numpy(v) for v in percentiles(flat.numpy(), (LOW_PERCENTILE, HIGH_PERCENTILE)))
    scaled = (flat - low) / torch.clamp(high - low, min=1e-6)
    return scaled.clamp_(0.0, 1.0).reshape(image.shape)


def model_input(image: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(H, W) radiograph -> (1, size, size) float tensor ready for the network."""
    tensor = torch.as_tensor(np.ascontiguousarray(image)).float()
    if tensor.shape != (size, size):
        tensor = resize_image(tensor, (size, size))
    return normalize_intensity(tensor)[None]


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
        transforms.append(RandAffined(
            keys=("image", "label"), prob=cfg.get("affine_prob", 0.8), rotate_range=(rotate,),
            scale_range=(scale, scale), translate_range=(translate * size, translate * size),
            mode=("bilinear", "nearest"), padding_mode="zeros"))
    if cfg.get("gamma", (0.7, 1.5)):
        transforms.append(RandAdjustContrastd(keys="image", prob=0.5, gamma=tuple(cfg.get("gamma", (0.7, 1.5)))))
    if cfg.get("intensity", True):
        transforms += [RandScaleIntensityd(keys="image", prob=0.3, factors=0.1),
                       RandShiftIntensityd(keys="image", prob=0.3, offsets=0.1)]
    if cfg.get("noise_std", 0.02):
        transforms.append(RandGaussianNoised(keys="image", prob=0.3, std=cfg.get("noise_std", 0.02)))
    return Compose(transforms)
