"""Label convention and the mask operations that depend on it.

Labels follow the patient's side (values in `definitions.py`). Arrays are (rows, columns) in the
stored pixel order of a radiograph, where the patient's right lies at low column indices (a PA or AP view
displayed the standard way). Nothing here ever flips an image horizontally.
"""

from __future__ import annotations

import numpy as np

# the label values, importable from here too: they are the convention these operations implement
from ..definitions import BACKGROUND, IGNORE, LEFT_LUNG, NUM_CLASSES, RIGHT_LUNG  # noqa: F401


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


EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # MONAI's KeepLargestConnectedComponent default in 2D


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (all False when the mask is empty)."""
    from scipy import ndimage

    parts, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if count <= 1:
        return parts.astype(bool)
    sizes = np.bincount(parts.ravel())
    sizes[0] = 0
    return parts == sizes.argmax()


def holes(mask: np.ndarray) -> np.ndarray:
    """Background pixels enclosed by the mask (not 4-connected to the image border), as SciPy's
    binary_fill_holes finds them. Only the mask's bounding box is searched: everything outside it reaches the
    border, so a region touching the box's edge is not a hole."""
    from scipy import ndimage

    found = np.zeros(mask.shape, dtype=bool)
    box = ndimage.find_objects(mask.view(np.uint8))
    if not box:
        return found
    box = box[0]
    regions, count = ndimage.label(~mask[box])
    enclosed = np.ones(count + 1, dtype=bool)
    enclosed[0] = False
    for edge in (regions[0], regions[-1], regions[:, 0], regions[:, -1]):
        enclosed[edge] = False
    found[box] = enclosed[regions]
    return found


def clean_labelmap(label: np.ndarray) -> np.ndarray:
    """Keep the largest connected component of each lung and fill its holes.

    Done per lung: the largest component of a two-lung mask would delete one lung. This is MONAI's
    KeepLargestConnectedComponent(independent=True) followed by SciPy's binary_fill_holes, with SciPy's labelling
    called directly: it runs once per radiograph in every batch (timings in scripts/benchmark.py).
    """
    lungs = {value: largest_component(label == value) for value in (RIGHT_LUNG, LEFT_LUNG)}
    out = np.zeros(label.shape, dtype=np.uint8)
    for value, lung in lungs.items():
        out[lung] = value
    background = out == BACKGROUND  # a hole never takes pixels of the other lung
    for value, lung in lungs.items():
        out[holes(lung) & background] = value
    return out


def lung_areas(label: np.ndarray, pixel_area_mm2: float | None) -> dict:
    """Right and left lung areas in pixels (and mm² when the pixel size is known), their sum as a fraction of
    the image, and the right/left ratio."""
    right, left = int(np.count_nonzero(label == RIGHT_LUNG)), int(np.count_nonzero(label == LEFT_LUNG))
    row = {
        "right_area_px": right,
        "left_area_px": left,
        "right_area_mm2": "",
        "left_area_mm2": "",
        "lung_fraction": round((right + left) / label.size, 4),
        "right_left_ratio": round(right / left, 3) if left else "",
    }
    if pixel_area_mm2 is not None:
        row["right_area_mm2"] = round(right * pixel_area_mm2, 1)
        row["left_area_mm2"] = round(left * pixel_area_mm2, 1)
    return row
