"""Orientation states of a stored chest radiograph, their transforms and inverses, and the classifier's preprocessing.

numpy + scipy only (no torch), so that it can run in front of an ONNX Runtime model.

States
------
A stored 2D image is ``apply(state, upright)`` of the upright film, where "upright" is the standard display of a frontal
chest radiograph: row 0 at the top of the screen holds the lung apices, the patient's right is on the viewer's left
(the heart on the viewer's right), and air is dark / bone bright. Arrays are indexed (row, column) and displayed with
row 0 at the top, column 0 at the left. ``apply`` does, in this order:

1. ``mirrored``: flip left-right (``np.fliplr``: column j goes to column W-1-j);
2. ``k`` (0..3): rotate by ``90*k`` degrees COUNTERCLOCKWISE as displayed, exactly ``np.rot90(x, k)``.
   ``k=1`` ("rotation 90"): the film's top (apices) is at the stored image's LEFT edge, the film's left edge (the
   patient's right) at the stored image's BOTTOM. ``k=2``: upside down. ``k=3`` (270 ccw = 90 clockwise): apices at
   the stored image's RIGHT edge;
3. ``inverted``: intensity inversion ``x -> min(x) + max(x) - x`` (uint8 0..255: ``255 - x``; bone dark, air bright).

``undo(state, stored)`` gives the upright film back. ``to_upright_labels(state, labels)`` maps a label map drawn on the
stored image into the upright frame, ``to_stored_labels(state, labels)`` maps a label map of the upright film (e.g. the
segmentation of the corrected image) back onto the stored image. Label VALUES are kept: a right-lung label stays the
patient's right lung (mirroring changes where it lies, not which lung it is).

The 16 states are indexed ``index = 8*inverted + 4*mirrored + k`` (``STATES[index]``); index 0 is upright.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

INPUT_SIZE = 128


@dataclass(frozen=True)
class State:
    """How a stored image relates to the upright film (see the module docstring for the exact definition)."""

    k: int = 0  # counterclockwise quarter turns, np.rot90(x, k), applied after the mirroring
    mirrored: bool = False  # np.fliplr, applied first
    inverted: bool = False  # intensity inversion

    def __post_init__(self):
        if self.k not in (0, 1, 2, 3):
            raise ValueError(f"k must be 0..3, not {self.k!r}")

    @property
    def index(self) -> int:
        return 8 * int(self.inverted) + 4 * int(self.mirrored) + self.k

    @property
    def upright(self) -> bool:
        return self.k == 0 and not self.mirrored and not self.inverted

    @property
    def name(self) -> str:
        parts = ([f"rot{90 * self.k}ccw"] if self.k else []) + (["mirrored"] if self.mirrored else []) + (
            ["inverted"] if self.inverted else [])
        return "+".join(parts) if parts else "upright"

    def geometric_inverse(self) -> "State":
        """The geometric state g' with apply(g', apply(g, x)) == x (the inversion flag is kept: it is its own inverse).

        A reflection is an involution: fliplr(rot90(y, -k)) == rot90(fliplr(y), k), so mirrored states are their own
        inverse; a pure rotation k is undone by rotation -k.
        """
        return State(self.k if self.mirrored else (-self.k) % 4, self.mirrored, self.inverted)


STATES: tuple[State, ...] = tuple(State(k, bool(m), bool(i)) for i in (0, 1) for m in (0, 1) for k in range(4))
UPRIGHT = STATES[0]
STATE_NAMES: tuple[str, ...] = tuple(s.name for s in STATES)
assert all(STATES[s.index] == s for s in STATES)


def invert_intensity(x: np.ndarray) -> np.ndarray:
    """min + max - x, in x's dtype (uint8 0..255: 255 - x). Its own inverse."""
    x = np.asarray(x)
    if x.size == 0:
        return x.copy()
    lo, hi = x.min(), x.max()
    if np.issubdtype(x.dtype, np.integer):
        return (hi.astype(np.int64) + lo - x.astype(np.int64)).astype(x.dtype)
    return (hi + lo - x).astype(x.dtype)


def apply_geometry(state: State, x: np.ndarray) -> np.ndarray:
    """Mirror (if state.mirrored) then rotate by np.rot90(., state.k) over the first two axes; no intensity change."""
    y = np.asarray(x)
    if state.mirrored:
        y = y[:, ::-1]
    return np.ascontiguousarray(np.rot90(y, state.k, axes=(0, 1)))


def undo_geometry(state: State, x: np.ndarray) -> np.ndarray:
    """The inverse of apply_geometry: rotate back by -k, then undo the mirroring."""
    y = np.rot90(np.asarray(x), -state.k, axes=(0, 1))
    if state.mirrored:
        y = y[:, ::-1]
    return np.ascontiguousarray(y)


def apply(state: State, upright: np.ndarray) -> np.ndarray:
    """The image stored in `state`, made from the upright film (2D, or 2D + trailing channel axis)."""
    y = apply_geometry(state, upright)
    return invert_intensity(y) if state.inverted else y


def undo(state: State, stored: np.ndarray) -> np.ndarray:
    """The upright film from an image stored in `state` (the exact inverse of `apply` for that state)."""
    y = invert_intensity(stored) if state.inverted else np.asarray(stored)
    return undo_geometry(state, y)


def to_upright_labels(state: State, labels: np.ndarray) -> np.ndarray:
    """A label map on the stored image, moved into the upright frame (values kept, no intensity inversion)."""
    return undo_geometry(state, labels)


def to_stored_labels(state: State, labels: np.ndarray) -> np.ndarray:
    """A label map of the upright film (e.g. the segmentation of undo(state, stored)), moved onto the stored image."""
    return apply_geometry(state, labels)


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing for the classifier


def to_gray(image: np.ndarray) -> np.ndarray:
    """2D float64 from a 2D array, (1, H, W), (H, W, 1) or an RGB(A) (H, W, 3|4) array (mean of the colour channels)."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    elif a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        a = a[..., :3].mean(axis=-1) if a.shape[-1] >= 3 else a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {np.asarray(image).shape}")
    return a.astype(np.float64)


def border_value(a: np.ndarray) -> float:
    """Median of the outermost ring of pixels (commutes with the D4 transforms and with intensity inversion)."""
    ring = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]]) if min(a.shape) > 1 else a.ravel()
    return float(np.median(ring))


def pad_to_square(a: np.ndarray, value: float | None = None) -> np.ndarray:
    """Centre `a` in a square canvas filled with `value` (default: border_value(a))."""
    h, w = a.shape
    n = max(h, w)
    if h == w:
        return a
    out = np.full((n, n), border_value(a) if value is None else value, dtype=a.dtype)
    top, left = (n - h) // 2, (n - w) // 2
    out[top:top + h, left:left + w] = a
    return out


def resize_square(a: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased resize of a square array to (size, size): when shrinking by 4x or more, first block means by an
    integer factor b = floor(f/2) (edge-padded evenly to a multiple of b), then a Gaussian prefilter for the rest of
    the factor, then a linear zoom. Every step is symmetric, so it commutes with the D4 states (up to the 1-pixel
    asymmetry of an odd padding)."""
    a = np.asarray(a, np.float64)
    n = a.shape[0]
    if n == size:
        return a
    b = int(n / size / 2)
    if b >= 2:
        r = (-n) % b
        if r:
            a = np.pad(a, ((r // 2, r - r // 2),) * 2, mode="edge")
        m = a.shape[0] // b
        a = a.reshape(m, b, m, b).mean(axis=(1, 3))
        n = m
    f = n / size
    if f > 1:
        a = ndimage.gaussian_filter(a, sigma=0.5 * f, mode="nearest", truncate=3.0)
    return ndimage.zoom(a, size / n, order=1, mode="nearest", grid_mode=True)[:size, :size]


def normalize(a: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.0) -> np.ndarray:
    """Percentile window to [0, 1], clipped (a flat image gives zeros). Commutes with inversion: norm(-a) = 1 - norm(a)."""
    lo, hi = np.percentile(a, [lo_pct, hi_pct])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return np.zeros(a.shape, np.float32)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def preprocess(image: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Classifier input (size, size) float32 in [0, 1] from a stored image of any size / aspect / bit depth.

    Pad to square with the border value (aspect kept), resize to `size`, then 1st-99th percentile window to [0, 1].
    Deterministic; the model takes it as (N, 1, size, size).
    """
    a = to_gray(image)
    if not np.isfinite(a).all():
        a = np.nan_to_num(a, nan=np.nanmedian(a) if np.isfinite(a).any() else 0.0)
    return normalize(resize_square(pad_to_square(a), size))


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def marginals(probs: np.ndarray) -> dict:
    """From (..., 16) state probabilities: P(upright), P(mirrored), P(inverted) and P(k) (..., 4)."""
    p = np.asarray(probs).reshape(*np.shape(probs)[:-1], 2, 2, 4)  # inverted, mirrored, k
    return {"upright": p[..., 0, 0, 0], "mirrored": p[..., :, 1, :].sum(axis=(-1, -2)),
            "inverted": p[..., 1, :, :].sum(axis=(-1, -2)), "k": p.sum(axis=(-2, -3))}


def decide(probs: np.ndarray, min_confidence: float = 0.9) -> State | None:
    """The most probable state of one image, or None when its probability is below `min_confidence` (do not correct)."""
    p = np.asarray(probs).reshape(-1)
    i = int(p.argmax())
    return STATES[i] if p[i] >= min_confidence else None
