"""Synthetic failures: degraded copies of a labelled radiograph (an opacity or occluder over a lung, rotation,
zoom-out, crop, gamma, noise, blur), with the reference moved alike. A good model's own validation images hold few
failures; the fit (`fit.py`) learns what one looks like from these.
"""

from __future__ import annotations

import numpy as np

PERTURBATIONS = ("opacity", "occluder", "rotation", "zoom_out", "crop", "gamma", "noise", "blur")


def perturb(pixels: np.ndarray, truth: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """One random degradation of a radiograph (float pixels, air dark) and its reference labels, of a random
    kind and strength fixed by `seed`. Geometric kinds move the labels alike; the others keep them, since the
    lung is still there under an opacity or a device."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    kind = PERTURBATIONS[rng.integers(len(PERTURBATIONS))]
    rows, cols = pixels.shape
    low, high = np.percentile(pixels, (0.5, 99.5))
    span = max(high - low, 1e-6)
    lungs = np.argwhere((truth > 0) & (truth < 255))
    if kind in ("opacity", "occluder") and len(lungs):
        r, c = lungs[rng.integers(len(lungs))]  # somewhere on a lung
        if kind == "opacity":  # a consolidation: a smooth bright cloud
            sigma = rng.uniform(0.08, 0.2) * rows
            yy, xx = np.ogrid[:rows, :cols]
            cloud = np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * sigma**2))
            pixels = pixels + rng.uniform(0.5, 1.0) * span * cloud
        else:  # a device, markup or shield: a rectangle of bright or dark
            h, w = int(rng.uniform(0.1, 0.3) * rows), int(rng.uniform(0.1, 0.3) * cols)
            pixels = pixels.copy()
            pixels[max(r - h // 2, 0) : r + h // 2, max(c - w // 2, 0) : c + w // 2] = (
                high if rng.random() < 0.7 else low
            )
    elif kind == "rotation":
        angle = rng.choice([-1, 1]) * rng.uniform(15, 40)
        pixels = ndimage.rotate(pixels, angle, reshape=False, order=1, mode="constant", cval=float(low))
        truth = ndimage.rotate(truth, angle, reshape=False, order=0, mode="constant", cval=0)
    elif kind == "zoom_out":
        scale = rng.uniform(0.45, 0.75)
        small = (max(int(rows * scale), 8), max(int(cols * scale), 8))
        r0, c0 = rng.integers(0, rows - small[0] + 1), rng.integers(0, cols - small[1] + 1)
        zoom = (small[0] / rows, small[1] / cols)
        canvas, labels = np.full_like(pixels, low), np.zeros_like(truth)
        canvas[r0 : r0 + small[0], c0 : c0 + small[1]] = ndimage.zoom(pixels, zoom, order=1)[: small[0], : small[1]]
        labels[r0 : r0 + small[0], c0 : c0 + small[1]] = ndimage.zoom(truth, zoom, order=0)[: small[0], : small[1]]
        pixels, truth = canvas, labels
    elif kind == "crop":  # part of the chest cut off: the bottom, the top or one side
        side, cut = rng.integers(4), rng.uniform(0.15, 0.35)
        keep = [slice(None), slice(None)]
        keep[side % 2] = (
            slice(int(cut * pixels.shape[side % 2]), None)
            if side < 2
            else slice(None, int((1 - cut) * pixels.shape[side % 2]))
        )
        pixels, truth = pixels[tuple(keep)], truth[tuple(keep)]
    elif kind == "gamma":
        unit = np.clip((pixels - low) / span, 0, 1)
        gamma = rng.uniform(0.2, 0.4) if rng.random() < 0.5 else rng.uniform(2.5, 5.0)
        pixels = low + span * unit**gamma
    elif kind == "noise":
        pixels = pixels + rng.normal(0, rng.uniform(0.1, 0.35) * span, pixels.shape)
    else:  # blur
        pixels = ndimage.gaussian_filter(pixels, rng.uniform(0.01, 0.03) * max(rows, cols))
    return np.ascontiguousarray(pixels, dtype=np.float32), np.ascontiguousarray(truth), kind
