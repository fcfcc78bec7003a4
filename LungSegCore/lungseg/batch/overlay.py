"""Pictures for people: a radiograph with its lungs drawn over it, and a sheet of cases (worst first).

Used by `lungseg segment --overlays`, its review page's thumbnails, `lungseg evaluate` (`worst_cases.png`) and the
training report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..definitions import LEFT_LUNG, RIGHT_LUNG
from ..io.radiograph import write_atomic

# RGB per label: right lung green-blue, left lung orange (distinct for common colour blindness)
LABEL_COLOURS = {RIGHT_LUNG: (0, 158, 115), LEFT_LUNG: (230, 159, 0)}
SHEET_TITLES = ("radiograph", "reference", "prediction")
TEXT_ROWS = 20  # height of a line of text on a case sheet


def display_uint8(pixels: np.ndarray) -> np.ndarray:
    """Gray values scaled to 0-255 between the 0.5th and 99.5th percentiles, as a viewer's auto window."""
    low, high = np.percentile(pixels, (0.5, 99.5))
    return (np.clip((pixels - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


def overlay_rgb(pixels: np.ndarray, label: np.ndarray, opacity: float = 0.35) -> np.ndarray:
    """(rows, columns, 3) uint8: the radiograph with each lung filled lightly and outlined in its colour."""
    rgb = np.repeat(display_uint8(pixels)[..., None], 3, axis=2).astype(np.float32)
    lab = sitk.GetImageFromArray(label.astype(np.uint8))
    contour = sitk.LabelContour(lab, fullyConnected=True, backgroundValue=0)
    thickness = max(1, round(max(label.shape) / 400))
    if thickness > 1:
        contour = sitk.GrayscaleDilate(contour, [thickness - 1] * 2)
    edge = sitk.GetArrayFromImage(contour)
    for value, colour in LABEL_COLOURS.items():
        colour = np.array(colour, dtype=np.float32)
        fill = label == value
        rgb[fill] = (1 - opacity) * rgb[fill] + opacity * colour
        rgb[edge == value] = colour
    return rgb.astype(np.uint8)


def write_overlay(pixels: np.ndarray, label: np.ndarray, path: str | Path, opacity: float = 0.35) -> None:
    write_atomic(sitk.GetImageFromArray(overlay_rgb(pixels, label, opacity), isVector=True), Path(path))


THUMBNAIL_SIDE = 192  # the longest side of a review-page thumbnail (review.py), in pixels


def thumbnail_base(
    model_input: np.ndarray,
    shape: tuple[int, int],
    flips: tuple[bool, bool] = (False, False),
    side: int = THUMBNAIL_SIDE,
) -> np.ndarray:
    """The picture of a thumbnail, made from the model's input (already resized and windowed, so it costs a
    fraction of a millisecond): (h, w) uint8 with the stored image's aspect ratio, a longest side of at most
    `side`, and the stored orientation (`flips` undone). Small enough to hand to another process.

    Args:
        model_input: (S, S) values in [0, 1], as `transforms.model_input` makes them, in the standard view.
        shape: (rows, columns) of the stored image.
        flips: the display flips that brought the stored image to the standard view.
    """
    from ..inference.preprocess import resize
    from ..io.radiograph import reorient

    scale = min(side / max(shape), 1.0)
    size = (max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale)))
    small = resize(reorient(np.asarray(model_input, dtype=np.float32), flips), size, antialias=True)
    return np.rint(np.clip(small, 0, 1) * 255).astype(np.uint8)


def write_thumbnail(
    base: np.ndarray, label: np.ndarray, path: str | Path, quality: int = 85, opacity: float = 0.35
) -> None:
    """A small JPEG of the lungs over `thumbnail_base`'s picture, drawn as `overlay_rgb` draws them (fill and
    outline per lung); the labelmap is sampled down to the picture's size."""
    from PIL import Image

    from ..io.files import atomic_path

    rows = ((np.arange(base.shape[0]) + 0.5) * label.shape[0] / base.shape[0]).astype(np.intp)
    cols = ((np.arange(base.shape[1]) + 0.5) * label.shape[1] / base.shape[1]).astype(np.intp)
    small = label[np.ix_(rows, cols)]
    padded = np.pad(small, 1, mode="edge")
    edge = (
        (padded[:-2, 1:-1] != small)
        | (padded[2:, 1:-1] != small)
        | (padded[1:-1, :-2] != small)
        | (padded[1:-1, 2:] != small)
    )
    colours = np.zeros((256, 3), np.uint8)  # colour and opacity per label value, looked up in one pass each
    fill = np.zeros(256, np.uint8)
    for value, colour in LABEL_COLOURS.items():
        colours[value], fill[value] = colour, round(opacity * 255)
    alpha = np.where(edge & (fill[small] > 0), np.uint8(255), fill[small])
    picture = Image.composite(
        Image.fromarray(colours[small]), Image.fromarray(base).convert("RGB"), Image.fromarray(alpha)
    )  # PIL blends in C: a fraction of numpy's float arithmetic
    with atomic_path(path) as tmp:
        picture.save(tmp, format="JPEG", quality=quality)


def _text_line(texts: list[tuple[int, str]], width: int) -> np.ndarray:
    """(TEXT_ROWS, width, 3) uint8: black text on white, each text starting at its column."""
    from PIL import Image, ImageDraw, ImageFont

    line = Image.new("RGB", (width, TEXT_ROWS), "white")
    draw = ImageDraw.Draw(line)
    font = ImageFont.load_default(size=TEXT_ROWS - 6)
    for column, text in texts:
        draw.text((column, 2), text, fill="black", font=font)
    return np.asarray(line)


def nearest(label: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A labelmap resized by its nearest pixel (half-pixel centres)."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * label.shape[0] / shape[0]).astype(np.intp), label.shape[0] - 1)
    columns = np.minimum(((np.arange(shape[1]) + 0.5) * label.shape[1] / shape[1]).astype(np.intp), label.shape[1] - 1)
    return np.asarray(label, dtype=np.uint8)[rows[:, None], columns[None]]


def write_case_sheet(
    cases: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]], path: str | Path, height: int = 256
) -> None:
    """PNG of one row per case, in the order given (worst first).

    Args:
        cases: (pixels, reference, prediction, caption) per case; the labelmaps hold 0/1/2 on the pixels' grid,
            and the caption (e.g. the file name and its Dice) is written above the row.
        path: the PNG to write (atomically).
        height: rows of each picture; the width follows the image's aspect ratio.
    """
    from ..inference.preprocess import resize

    gap = 4
    widths = [max(1, round(pixels.shape[1] * height / pixels.shape[0])) for pixels, *_ in cases]
    tile = max(widths)  # one column width for all rows, so that the titles stand above their columns
    sheet_width = 3 * tile + 2 * gap
    parts = [_text_line([(k * (tile + gap) + 4, title) for k, title in enumerate(SHEET_TITLES)], sheet_width)]
    for (pixels, truth, prediction, caption), width in zip(cases, widths):
        small = resize(pixels, (height, width), antialias=True)
        labels = [nearest(x, (height, width)) for x in (truth, prediction)]
        gray = np.repeat(display_uint8(small)[..., None], 3, axis=2)
        tiles = [
            np.pad(t, ((0, 0), (0, tile - width), (0, 0)), constant_values=255)
            for t in (gray, overlay_rgb(small, labels[0]), overlay_rgb(small, labels[1]))
        ]
        space = np.full((height, gap, 3), 255, np.uint8)
        parts += [
            _text_line([(4, caption)], sheet_width),
            np.concatenate([tiles[0], space, tiles[1], space, tiles[2]], axis=1),
            np.full((gap, sheet_width, 3), 255, np.uint8),
        ]
    write_atomic(sitk.GetImageFromArray(np.concatenate(parts, axis=0), isVector=True), Path(path))
