"""Label convention and the mask operations that depend on it.

Labels follow the patient's side: 0 background, 1 right lung, 2 left lung. Arrays are (rows, columns) in the
stored pixel order of a radiograph, where the patient's right lies at low column indices (a PA or AP view
displayed the standard way). Nothing here ever flips an image horizontally.
"""
from __future__ import annotations

import numpy as np

BACKGROUND, RIGHT_LUNG, LEFT_LUNG = 0, 1, 2
IGNORE = 255  # training labels only: pixels (devices, markup) that count neither for nor against a prediction
LABEL_NAMES = {RIGHT_LUNG: "right", LEFT_LUNG: "left"}
NUM_CLASSES = 3


def midline_column(mask: np.ndarray) -> int:
    """Column that separates the two lungs: the emptiest column of the mask's central half."""
    profile = (mask > 0).sum(axis=0).astype(np.float64)
    cols = np.nonzero(profile)[0]
    if cols.size == 0:
        return mask.shape[1] // 2
    lo, hi = cols[0], cols[-1]
    quarter = (hi - lo) // 4
    lo, hi = lo + quarter, hi - quarter
    if hi <= lo:
        return int((cols[0] + cols[-1]) // 2)
    window = profile[lo : hi + 1]
    candidates = np.nonzero(window == window.min())[0] + lo
    centre = (cols[0] + cols[-1]) / 2
    return int(candidates[np.argmin(np.abs(candidates - centre))])


def split_left_right(mask: np.ndarray) -> np.ndarray:
    """Turn a merged both-lung mask into right (1) and left (2) labels by side of the lung midline.

    Separate lungs fall on either side of the emptiest central column; lungs that touch are cut there.
    """
    lungs = mask > 0
    label = np.zeros(mask.shape, dtype=np.uint8)
    cut = midline_column(lungs)
    columns = np.arange(mask.shape[1])[None, :]
    label[lungs & (columns < cut)] = RIGHT_LUNG
    label[lungs & (columns >= cut)] = LEFT_LUNG
    return label


def merge_sides(right: np.ndarray, left: np.ndarray) -> np.ndarray:
    """Combine separate right and left masks into one label image (left wins where they overlap)."""
    label = np.zeros(right.shape, dtype=np.uint8)
    label[right > 0] = RIGHT_LUNG
    label[left > 0] = LEFT_LUNG
    return label


def clean_labelmap(label: np.ndarray) -> np.ndarray:
    """Keep the largest connected component of each lung (MONAI) and fill its holes (SciPy).

    Done per lung (`independent=True`): the largest component of a two-lung mask would delete one lung. Holes are
    filled with SciPy directly: MONAI's FillHoles wraps the same call but takes 3x longer.
    """
    from monai.transforms import KeepLargestConnectedComponent
    from scipy import ndimage

    keep = KeepLargestConnectedComponent(applied_labels=[RIGHT_LUNG, LEFT_LUNG], is_onehot=False, independent=True)
    kept = np.asarray(keep(label[None].astype(np.uint8)))[0].astype(np.uint8)
    out = kept.copy()
    for value in (RIGHT_LUNG, LEFT_LUNG):
        out[ndimage.binary_fill_holes(kept == value) & (kept == BACKGROUND)] = value
    return out


def lung_areas(label: np.ndarray, pixel_area_mm2: float | None) -> dict:
    """Right and left lung areas in pixels (and mm² when the pixel size is known), their sum as a fraction of
    the image, and the right/left ratio."""
    right, left = int((label == RIGHT_LUNG).sum()), int((label == LEFT_LUNG).sum())
    row = {"right_area_px": right, "left_area_px": left, "right_area_mm2": "", "left_area_mm2": "",
           "lung_fraction": round((right + left) / label.size, 4),
           "right_left_ratio": round(right / left, 3) if left else ""}
    if pixel_area_mm2 is not None:
        row["right_area_mm2"] = round(right * pixel_area_mm2, 1)
        row["left_area_mm2"] = round(left * pixel_area_mm2, 1)
    return row
