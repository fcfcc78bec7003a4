"""The one preprocessing path shared by training and inference, in NumPy (no torch at inference).

Model input: a grayscale radiograph resized to `size`x`size` (antialiased) and scaled to [0, 1] between its
0.5th and 99.5th intensity percentiles, so 8-bit PNGs, 12-bit DICOM and 16-bit TIFFs look alike to the network.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import sparse

LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5


@lru_cache(maxsize=64)
def resize_weights(source: int, target: int, antialias: bool) -> sparse.csr_matrix:
    """(target, source) bilinear interpolation weights with half-pixel centres, as torch's `interpolate`
    (align_corners=False) computes them: plain bilinear with the source index clamped at 0, or with `antialias` the
    triangle filter widened by the shrink factor (PIL's and torch's antialiased resize)."""
    scale = source / target
    centres = scale * (np.arange(target) + 0.5)
    if not antialias:
        position = np.maximum(centres - 0.5, 0.0)
        low = np.minimum(np.floor(position).astype(np.int64), source - 1)
        high = np.minimum(low + 1, source - 1)
        frac = (position - low).astype(np.float64)
        rows = np.repeat(np.arange(target), 2)
        return sparse.csr_matrix(
            (np.stack([1 - frac, frac], 1).ravel(), (rows, np.stack([low, high], 1).ravel())), shape=(target, source)
        )
    support = max(scale, 1.0)
    first = np.maximum((centres - support + 0.5).astype(np.int64), 0)
    last = np.minimum((centres + support + 0.5).astype(np.int64), source)
    taps = int((last - first).max())
    index = first[:, None] + np.arange(taps)[None]
    weight = np.maximum(0.0, 1.0 - np.abs((index - centres[:, None] + 0.5) / support))
    weight[index >= last[:, None]] = 0.0
    weight /= weight.sum(1, keepdims=True)
    keep = weight > 0
    rows = np.broadcast_to(np.arange(target)[:, None], index.shape)
    return sparse.csr_matrix((weight[keep], (rows[keep], index[keep])), shape=(target, source))


def resize(values: np.ndarray, shape: tuple[int, int], antialias: bool = False) -> np.ndarray:
    """Bilinear resize of a (..., H, W) array to (..., rows, columns) float32, with torch's sampling."""
    rows, columns = shape
    if values.shape[-2:] == (rows, columns):
        return np.asarray(values, dtype=np.float32)
    height, width = values.shape[-2:]
    down = resize_weights(height, rows, antialias).astype(np.float32)
    across = resize_weights(width, columns, antialias).astype(np.float32).T.tocsr()
    flat = np.asarray(values, dtype=np.float32).reshape(-1, height, width)
    out = np.empty((len(flat), rows, columns), np.float32)
    for k, plane in enumerate(flat):
        out[k] = (across.T @ (down @ plane).T).T  # sparse on the left: the work grows with the taps, not the size
    return out.reshape(*values.shape[:-2], rows, columns)


@lru_cache(maxsize=64)
def fixed_point_weights(source: int, target: int) -> tuple[sparse.csr_matrix, int]:
    """(target, source) integer bilinear weights and their precision in bits, as torch's 8-bit resize makes them: the
    most bits that keep the largest weight, doubled, below 2^15 (at most 22)."""
    weights = resize_weights(source, target, False).copy()
    largest, bits = weights.data.max(), 0
    while bits < 22 and int(0.5 + largest * (1 << (bits + 1))) < 1 << 15:
        bits += 1
    weights.data = np.floor(weights.data * (1 << bits) + 0.5)
    return weights.astype(np.int64), bits


def resize_uint8(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (C, H, W) uint8 values to (C, rows, columns) exactly as torch resizes uint8 images: a pass
    along the columns, then along the rows, each in fixed point and rounded back to 8 bits."""
    (across, across_bits), (down, down_bits) = (
        fixed_point_weights(values.shape[2], shape[1]),
        fixed_point_weights(values.shape[1], shape[0]),
    )
    out = np.empty((len(values), *shape), np.uint8)
    for k, plane in enumerate(np.asarray(values, dtype=np.int64)):
        columns = np.clip((across @ plane.T + (1 << (across_bits - 1))) >> across_bits, 0, 255)  # (columns, H)
        out[k] = np.clip((down @ columns.T + (1 << (down_bits - 1))) >> down_bits, 0, 255)
    return out


def percentiles(flat: np.ndarray, percents: tuple[float, ...]) -> list[np.ndarray]:
    """torch.quantile's values (linear interpolation) along the last axis, with the last axis kept. One NumPy
    partition finds every order statistic needed, with less work than a sort or a kthvalue per statistic."""
    n = flat.shape[-1]
    positions = [p / 100 * (n - 1) for p in percents]
    below = [int(q) for q in positions]
    above = [min(i + 1, n - 1) for i in below]
    part = np.partition(flat, sorted(set(below + above)), axis=-1)
    return [
        part[..., i : i + 1] + (part[..., j : j + 1] - part[..., i : i + 1]) * (q - i)
        for q, i, j in zip(positions, below, above)
    ]


def normalize_intensity(image: np.ndarray) -> np.ndarray:
    """Scale each (..., H, W) image to [0, 1] between its robust percentiles (float32)."""
    flat = np.asarray(image, dtype=np.float32).reshape(*image.shape[:-2], -1)
    low, high = percentiles(flat, (LOW_PERCENTILE, HIGH_PERCENTILE))
    scaled = (flat - low) / np.maximum(high - low, np.float32(1e-6))
    return np.clip(scaled, 0.0, 1.0, out=scaled).reshape(image.shape)


def model_input(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) radiograph -> (1, size, size) float32 array ready for the network."""
    image = np.asarray(image, dtype=np.float32)
    if image.shape != (size, size):
        image = resize(image, (size, size), antialias=True)
    return normalize_intensity(image)[None]
