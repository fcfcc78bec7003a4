"""Post-processing of one model output into the labelmap on the input's grid, apart from the model (as MONAI's
`transforms.post` and lungmask's `postprocessing` are): the batch pipeline runs it in helper processes that hold no
model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..definitions import LEFT_LUNG, RIGHT_LUNG
from ..io.radiograph import reorient
from .labels import clean_labelmap
from .orientation import UPRIGHT, State, apply_geometry, upright_shape
from .orientation_classifier import Finding
from .preprocess import resize, resize_uint8


@dataclass
class Prediction:
    label: np.ndarray  # (rows, columns) uint8: 0 background, 1 right lung, 2 left lung
    probabilities: np.ndarray | None  # (3, rows, columns) float32 softmax on the input grid, when kept
    raw_label: np.ndarray  # argmax before clean-up at the model's resolution, for quality control
    uncertainty: np.ndarray | None = None  # (rows, columns) float32, when asked for
    # At the model's resolution and in the standard view, for the predicted quality (`qc/features.py`): the softmax
    # (3, S, S), the cleaned labelmap (S, S) and the uncertainty (S, S) when asked for. Views, not copies.
    model_probabilities: np.ndarray | None = None
    model_label: np.ndarray | None = None
    model_uncertainty: np.ndarray | None = None
    model_member_spread: np.ndarray | None = None  # (S, S) an ensemble's member spread (inference.ModelOutput)
    model_image: np.ndarray | None = None  # (S, S) the network's input, for a quality that reads the image's edges
    orientation: Finding | None = None  # what the orientation classifier found and corrected (None: not checked)

    def placed(self, orientation: State, flips: tuple[bool, bool]) -> Prediction:
        """The full-resolution maps, made on the upright film, moved onto the stored grid: back into the state the
        pixels showed (`orientation`), then through the header's display flips. Label values stay: each lung keeps
        the patient's side it marks, only its place on the grid changes."""
        if orientation.upright and not any(flips):
            return self

        def place(array):
            return None if array is None else reorient(apply_geometry(orientation, array), flips)

        return dataclasses.replace(
            self,
            label=place(self.label),
            probabilities=place(self.probabilities),
            uncertainty=place(self.uncertainty),
        )


# A full-resolution pixel is background for sure when, on every model pixel its bilinear weights can reach,
# background beats both lungs by this many 8-bit levels: each of the resampler's two passes rounds every band by
# at most half a level.
SURE_MARGIN = 3


def _quantize(scores: np.ndarray) -> np.ndarray:
    return np.rint(scores * 255).astype(np.uint8)


def _resize_uint8(scores: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (C, S, S) scores in [0, 1] quantized to 8 bits, with half-pixel centres (torch's sampling):
    enlarging, as 8-bit image bands in Pillow's C resampler, much faster than float; shrinking along either axis (an
    image smaller than the model's input), in NumPy's integers with torch's fixed point, which Pillow's antialiasing
    does not give. 1/255 is far below any boundary decision that matters."""
    quantized = _quantize(scores)
    if shape[0] < scores.shape[-2] or shape[1] < scores.shape[-1]:
        return resize_uint8(quantized, shape)
    return _enlarge_bands(quantized, shape, (0, shape[0], 0, shape[1]))


def _enlarge_bands(quantized: np.ndarray, shape: tuple[int, int], window: tuple[int, int, int, int]) -> np.ndarray:
    """The rows r0:r1 and columns c0:c1 of the (C, S, S) 8-bit bands enlarged to `shape`, computed alone.

    Two Pillow calls, columns then rows: one call may run its two passes in either order (Pillow 13 ran a window's
    rows first and the whole film's columns first), and each pass rounds to 8 bits, so a window would not always
    equal that part of the whole. The window's edges must fall on whole model pixels (`_window_edges`): Pillow takes
    the box in single precision, and whole numbers keep each output pixel's sampling centre and weights those of the
    whole resize."""
    from PIL import Image

    r0, r1, c0, c1 = window
    (rows, height), (cols, width) = (quantized.shape[-2], shape[0]), (quantized.shape[-1], shape[1])
    top, bottom = r0 * rows // height, r1 * rows // height  # the window's edges in model pixels
    first, last = max(0, top - 2), min(rows, bottom + 2)  # the model rows its weights reach, and a row to spare
    across = (c0 * cols // width, 0, c1 * cols // width, last - first)
    down = (0, top - first, c1 - c0, bottom - first)
    return np.stack(
        [
            np.asarray(
                Image.fromarray(band[first:last])
                .resize((c1 - c0, last - first), Image.BILINEAR, box=across)
                .resize((c1 - c0, r1 - r0), Image.BILINEAR, box=down)
            )
            for band in quantized
        ]
    )


def _window_edges(first: int, last: int, size: int, out: int) -> tuple[int, int]:
    """Output pixels [start, stop) that hold the sampling centres of model pixels first..last (along one axis of
    `size` model pixels enlarged to `out`), with a pixel to spare, widened to edges that fall on whole model pixels:
    multiples of out / gcd(size, out), e.g. 4 for 1024 from 256 (the whole axis where there are none)."""
    step = out // math.gcd(size, out)
    start = max(0, first * out // size - 1) // step * step
    end = -(-(last + 1) * out // size) + 1  # ceil, and a pixel to spare
    stop = min(out, -(-end // step) * step)
    return start, stop


def _full_resolution_label(scores: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The argmax of the (3, S, S) scores resized to `shape` (`_resize_uint8`). Enlarging, only the window that
    holds every pixel that is not surely background is resized (about the lungs' box): the same labelmap at a
    fraction of the cost."""
    if shape[0] < scores.shape[-2] or shape[1] < scores.shape[-1]:
        return _winning_class(_resize_uint8(scores, shape))
    quantized = _quantize(scores)
    background, right, left = quantized.astype(np.int16)
    # 2 model pixels around: every weight of a bilinear enlargement's output pixel falls within 1.5 of its centre
    unsure = ndimage.binary_dilation(background - np.maximum(right, left) < SURE_MARGIN, iterations=2)
    label = np.zeros(shape, np.uint8)
    rows, cols = np.flatnonzero(unsure.any(axis=1)), np.flatnonzero(unsure.any(axis=0))
    if not len(rows):
        return label
    r0, r1 = _window_edges(rows[0], rows[-1], scores.shape[-2], shape[0])
    c0, c1 = _window_edges(cols[0], cols[-1], scores.shape[-1], shape[1])
    label[r0:r1, c0:c1] = _winning_class(_enlarge_bands(quantized, shape, (r0, r1, c0, c1)))
    return label


def _winning_class(scores: np.ndarray) -> np.ndarray:
    """argmax over (background, right, left) by two comparisons (ties go to the lower class, as in argmax); faster
    than NumPy's argmax over the class axis."""
    background, right, left = scores
    lung = np.maximum(right, left) > background
    return lung.view(np.uint8) * (1 + (left > right).view(np.uint8))


def postprocess(
    probabilities: np.ndarray,
    shape: tuple[int, int],
    uncertainty: np.ndarray | None = None,
    keep_probabilities: bool = False,
    display_flips: tuple[bool, bool] = (False, False),
    member_spread: np.ndarray | None = None,
    model_image: np.ndarray | None = None,
    orientation: Finding | None = None,
) -> Prediction:
    """The cleaned labelmap of one model output, on the stored image's grid.

    Clean-up (largest component per lung, holes filled) runs at the model's resolution, where it is cheap; each
    lung's probability is then limited to its kept component (plus a 2-pixel margin for the finer edge) before one
    bilinear resize and argmax at full resolution.

    Args:
        probabilities: (3, S, S) softmax (background, right, left) of the image in its standard view, on the CPU.
        shape: (rows, columns) of the stored image.
        uncertainty: (S, S) per-pixel uncertainty, or None.
        keep_probabilities: also return the probabilities resized to `shape`.
        display_flips: (flip rows, flip columns) that brought the stored image to the standard view (see
            `io.display_flips`); the maps are flipped back to the stored grid.
        member_spread: (S, S) an ensemble's member spread, or None; kept at the model's resolution only.
        model_image: (S, S) the network's input (`transforms.model_input`), or None; kept as it is, for the
            predicted quality of a card that reads the image (`quality.reads_image`).
        orientation: what the orientation classifier found; the state it undid before the model ran is put back
            on the maps (made on the upright film), and the finding is kept in the Prediction.

    Returns:
        The Prediction: the labelmap, the probabilities (when kept) and the uncertainty (when given) on the stored
        grid, and the uncleaned argmax at the model's resolution.
    """
    raw_small = _winning_class(probabilities)
    clean_small = clean_labelmap(raw_small)
    scores = np.array(probabilities, dtype=np.float32)
    for value in (RIGHT_LUNG, LEFT_LUNG):
        kept = clean_small == value
        lung = scores[value]
        lung *= ndimage.maximum_filter(kept.view(np.uint8), size=5)  # 0 beyond a 2-pixel margin
        lung[kept & (raw_small != value)] = 1.0  # filled holes
    state = orientation.applied if orientation else UPRIGHT
    shape = upright_shape(state, shape)
    label = _full_resolution_label(scores, shape)
    unc = resize(uncertainty, shape) if uncertainty is not None else None
    full = resize(probabilities, shape) if keep_probabilities else None
    prediction = Prediction(
        label=label,
        probabilities=full,
        raw_label=raw_small,
        uncertainty=unc,
        model_probabilities=probabilities,
        model_label=clean_small,
        model_uncertainty=uncertainty,
        model_member_spread=member_spread,
        model_image=None if model_image is None else np.asarray(model_image),
        orientation=orientation,
    )
    return prediction.placed(state, display_flips)
