"""The features of one segmentation that its predicted quality reads (`model.py`): cheap measures of the model's
output at the model's resolution (no second forward pass).

- how sure the model is: the Dice the softmax expects of its own labelmap, probability mass near 0.5 and the
  entropy inside the lungs, lung probability left outside the kept lungs, the mean winning probability;
- how much the clean-up had to change (fragments removed, holes filled);
- shape and position plausibility for the definition: lung area, right/left ratio, how the lungs fill their
  bounding boxes, the smoothness of their outlines, where they sit and how tall they are;
- how far each lung's outline, scaled to its bounding box, lies from the shapes of the reference lungs the fit saw
  (a statistical shape model: the principal modes of those shapes, stored in the card);
- whether each lung's outline lies on its edge in the image (the network's input): a lung is darker than the ribs,
  heart, diaphragm and soft tissue that bound it, so an outline on that edge sees the image brighten outward;
- with `--uncertainty`, also the spread of the test-time-augmentation or latent samples inside the lungs;
- for an ensemble, the spread of its members, in every mode (they run anyway).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ..definitions import LEFT_LUNG, RIGHT_LUNG

EPS = 1e-6

# The features, in a fixed order. Two-sided features enter the regression as their distance from the centre of
# good segmentations in the fitting data (stored in the card), so that too much and too little both count.
OUTPUT_FEATURES = (  # how sure the model is of its own output
    "expected_dice",  # the Dice the softmax expects of its own cleaned labelmap, mean of the two lungs
    "uncertain_mass",  # pixels with lung probability in 0.2-0.8, per lung pixel
    "entropy",  # mean normalized entropy of the softmax inside the lungs
    "outside_mass",  # lung probability outside the kept lungs, per lung pixel
    "confidence",  # mean winning-class probability over the whole image
    "cleanup_change",  # pixels that clean-up removed or filled, per lung pixel
)
SHAPE_FEATURES = (  # how plausible the lungs' shape and position are
    "lung_fraction",  # log of the lung area as a fraction of the image (two-sided)
    "right_left_ratio",  # log of the right/left area ratio (two-sided)
    "box_fill",  # the smaller lung's area over its bounding box
    "outline",  # boundary pixels over the square root of the area, the larger over the two lungs
    "centre_x",  # mean column of the two lungs' centroids, as a fraction of the width (two-sided)
    "centre_y",  # mean row of the two lungs' centroids, as a fraction of the height (two-sided)
    "height",  # rows spanned by the lungs, as a fraction of the height (two-sided)
    "solidity",  # the smaller lung's area over its convex hull's: a bite out of a lung (an opacity missed)
    "height_ratio",  # log of the right/left lung height ratio (two-sided): one lung cut short at its base or apex
)
FEATURES = OUTPUT_FEATURES + SHAPE_FEATURES
# The regressions a fit chooses among (scripts/fit_quality.py, by cross-validation within the fit half). The
# uncertainty and member features join any set where the mode or the model has them.
# "boundary" leaves out the image-wide confidence and entropy: they differ more between cohorts (JSRT, COVID-era
# films) than between a good and a bad segmentation of one cohort.
BOUNDARY_FEATURES = ("expected_dice", "uncertain_mass", "outside_mass", "cleanup_change")
FEATURE_SETS = {"boundary": BOUNDARY_FEATURES, "output": OUTPUT_FEATURES, "output+shape": FEATURES}
UNCERTAINTY_FEATURES = (
    "uncertainty_mean",  # mean sample spread (std of the probabilities) inside the lungs
    "uncertain_border",  # pixels near the lungs with a spread above 0.2, per lung pixel
)
# An ensemble's members disagree where its result is doubtful; they run anyway, so this costs nothing extra.
MEMBER_FEATURES = (
    "member_spread",  # mean member spread (std of the members' probabilities) inside the lungs
    "member_disagreement",  # pixels near the lungs where the members' spread exceeds 0.2, per lung pixel
)
# How far each lung's shape lies from the reference lungs' (`shape_prior_distance`). It needs a shape model fitted
# on reference masks (`fit_shape_prior`), so a fit offers each set with it too, where it has the references.
PRIOR_FEATURE = "shape_prior"
# Whether the outline follows the image's lung edge (`edge_support`). It reads the network's input, which the batch
# hands to the QC only for a regression that reads it, so a fit offers each set with it too.
EDGE_FEATURE = "edge_support"
EDGE_SIGMA = 1.5  # pixels at the model's resolution: the image is smoothed this much before its gradient is taken
EDGE_MARGIN = 8  # pixels around the lungs' bounding box whose gradients set the scale of the image's edges
SHAPE_GRID = (24, 16)  # rows, columns of a lung scaled to its bounding box
SHAPE_MODES = 6  # principal modes of the reference shapes; what they cannot express is the distance
TWO_SIDED = ("lung_fraction", "right_left_ratio", "centre_x", "centre_y", "height", "height_ratio")
LOG_LIMIT = math.log(10.0)  # log ratios are clipped to +-log(10); a lost lung counts as a ratio of 10
PER_LUNG_LIMIT = 1.0  # per-lung-pixel features are clipped at 1 (beyond it the lungs are mostly lost)


def _lung_stats(mask: np.ndarray) -> tuple[int, tuple[float, float], tuple[int, int, int, int]]:
    """Area, centroid (row, column) and bounding box (r0, r1, c0, c1) of one lung, from its row and column counts."""
    per_row, per_col = np.count_nonzero(mask, axis=1), np.count_nonzero(mask, axis=0)
    area = int(per_row.sum())
    if area == 0:
        return 0, (math.nan, math.nan), (0, 0, 0, 0)
    rows, cols = np.flatnonzero(per_row), np.flatnonzero(per_col)
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    centre = (float(per_row @ np.arange(len(per_row))) / area, float(per_col @ np.arange(len(per_col))) / area)
    return area, centre, (r0, r1, c0, c1)


def _boundary_pixels(mask: np.ndarray, area: int, box: tuple[int, int, int, int]) -> int:
    """Pixels of one lung that a 3x3 cross erosion removes (SciPy's binary_erosion with zero borders), within its
    bounding box (every pixel of the lung lies in it): a fraction of the cost of the general routine."""
    if area == 0:
        return 0
    r0, r1, c0, c1 = box
    return int(np.count_nonzero(_outline(mask[r0:r1, c0:c1])))


def _outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of a mask that a 3x3 cross erosion removes (zero beyond its borders), by shifted views."""
    padded = np.pad(mask, 1)
    interior = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _solidity(mask: np.ndarray) -> float:
    """Area over convex-hull area of one lung. The hull of each row's first and last pixel is the hull of the
    shape, so qhull sees two points per row instead of every pixel; half the hull's perimeter is added because
    the hull runs through pixel centres."""
    from scipy.spatial import ConvexHull, QhullError

    rows = np.flatnonzero(mask.any(1))
    if len(rows) < 2:
        return 0.0
    inside = mask[rows]
    first, last = inside.argmax(1), mask.shape[1] - 1 - inside[:, ::-1].argmax(1)
    points = np.concatenate([np.stack([rows, first], 1), np.stack([rows, last], 1)]).astype(np.float64)
    try:
        hull = ConvexHull(points)
    except QhullError:  # every point on one line: a sliver
        return 0.0
    return min(float(np.count_nonzero(inside)) / (hull.volume + hull.area / 2 + 1), 1.0)


def _entropy_inside(probabilities: np.ndarray, lungs: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Mean normalized entropy of the softmax over the lung pixels (computed within their bounding box)."""
    r0, r1, c0, c1 = box
    p = probabilities[:, r0:r1, c0:c1]
    inside = lungs[r0:r1, c0:c1]
    entropy = -(p * np.log(np.maximum(p, EPS))).sum(0)
    return float(entropy[inside].mean() / math.log(3))


def lung_shapes(label: np.ndarray) -> np.ndarray:
    """Each lung (right, left) scaled to its bounding box on SHAPE_GRID by area averaging, flattened: (2, rows *
    columns) in [0, 1]. A missing lung is all zeros. Position and size are other features; this is the outline."""
    masks = {value: label == value for value in (RIGHT_LUNG, LEFT_LUNG)}
    return _box_shapes(masks, {value: _lung_stats(mask) for value, mask in masks.items()})


def _box_shapes(masks: dict, stats: dict) -> np.ndarray:
    """`lung_shapes` from each lung's mask and `_lung_stats`, which `quality_features` has at hand."""
    shapes = np.zeros((2, SHAPE_GRID[0] * SHAPE_GRID[1]), dtype=np.float32)
    for k, value in enumerate((RIGHT_LUNG, LEFT_LUNG)):
        area, _, (r0, r1, c0, c1) = stats[value]
        if area:
            shapes[k] = adaptive_mean(masks[value][r0:r1, c0:c1], SHAPE_GRID).reshape(-1)
    return shapes


def adaptive_mean(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The mean of `values` over each cell of a `grid` laid over it, cells rounded outward to whole pixels (bin i
    of n over length L spans floor(i L / n) to ceil((i + 1) L / n), as torch's adaptive average pooling)."""
    total = np.zeros((values.shape[0] + 1, values.shape[1] + 1))
    total[1:, 1:] = np.asarray(values, dtype=np.float64).cumsum(0).cumsum(1)
    edges = [
        (np.arange(n) * length // n, -(-(np.arange(n) + 1) * length // n)) for n, length in zip(grid, values.shape)
    ]
    (r0, r1), (c0, c1) = edges
    sums = total[r1][:, c1] - total[r0][:, c1] - total[r1][:, c0] + total[r0][:, c0]
    return (sums / np.outer(r1 - r0, c1 - c0)).astype(np.float32)


def fit_shape_prior(shapes: np.ndarray, modes: int = SHAPE_MODES) -> dict:
    """A statistical shape model of reference lungs (`lung_shapes` of n masks, (n, 2, P)): per lung the mean shape
    and its first `modes` principal components, as the card stores it."""
    shapes = np.asarray(shapes, dtype=np.float64)
    means, components = [], []
    for k in range(2):
        mean = shapes[:, k].mean(0)
        components.append(np.linalg.svd(shapes[:, k] - mean, full_matrices=False)[2][:modes])
        means.append(mean)
    return {
        "grid": list(SHAPE_GRID),
        "images": len(shapes),
        "mean": np.round(means, 4).tolist(),
        "components": np.round(components, 4).tolist(),
    }


def shape_prior_distances(shapes: np.ndarray, prior: dict) -> np.ndarray:
    """How far each result's lungs (`lung_shapes` of n results, (n, 2, P)) lie from the prior's shape space: the
    root mean square of what its modes cannot express, averaged over the two lungs (0: a shape the references
    span; a lost lung is far). (n,); the prior's lists are read once for all n."""
    x = np.asarray(shapes, dtype=np.float64) - np.asarray(prior["mean"])  # (n, 2, P)
    basis = np.asarray(prior["components"])  # (2, modes, P)
    residual = x - np.einsum("nkm,kmp->nkp", np.einsum("nkp,kmp->nkm", x, basis), basis)
    return np.sqrt((residual**2).mean(2)).mean(1)


def shape_prior_distance(shapes: np.ndarray, prior: dict) -> float:
    """`shape_prior_distances` of one result's lungs (2, P)."""
    return float(shape_prior_distances(shapes[None], prior)[0])


def edge_support(image: np.ndarray, label: np.ndarray, probabilities: np.ndarray) -> float:
    """How well the lungs' outline follows their edge in the image, the weaker lung's: along its outline, the
    mean rise of the smoothed image outward (across the outline, the normal pointing down the lung's probability),
    over the 90th percentile of the gradient's size around the lungs. High where the outline lies on the edge of
    a dark lung; near 0 or below where it cuts through the lung or strays beyond it. 0 for a lost lung.

    Args:
        image: (S, S) the network's input (`transforms.model_input`), in the standard view.
        label: (S, S) the cleaned labelmap at the model's resolution.
        probabilities: (3, S, S) the softmax.
    """
    lungs = label > 0
    if not lungs.any():
        return 0.0
    rows, cols = np.flatnonzero(lungs.any(1)), np.flatnonzero(lungs.any(0))
    r0, r1 = max(rows[0] - EDGE_MARGIN, 0), min(rows[-1] + 1 + EDGE_MARGIN, label.shape[0])
    c0, c1 = max(cols[0] - EDGE_MARGIN, 0), min(cols[-1] + 1 + EDGE_MARGIN, label.shape[1])
    smooth = ndimage.gaussian_filter(np.asarray(image[r0:r1, c0:c1], dtype=np.float32), EDGE_SIGMA)
    gy, gx = np.gradient(smooth)
    scale = float(np.percentile(np.hypot(gx, gy), 90)) + EPS
    rises = []
    for value in (RIGHT_LUNG, LEFT_LUNG):
        mask = label[r0:r1, c0:c1] == value
        if not mask.any():
            return 0.0
        rr, cc = np.nonzero(_outline(mask))
        py, px = np.gradient(np.asarray(probabilities[value, r0:r1, c0:c1], dtype=np.float32))
        ny, nx = -py[rr, cc], -px[rr, cc]  # outward: down the lung's probability
        norm = np.hypot(ny, nx)
        across = norm > EPS
        rise = (gy[rr, cc] * ny + gx[rr, cc] * nx)[across] / norm[across]
        rises.append(float(rise.mean()) / scale if across.any() else 0.0)
    return min(rises)


def quality_features(
    prediction, shape: bool = True, prior: dict | None = None, edges: bool = False
) -> dict[str, float]:
    """The features of one segmentation (see FEATURES), from its maps at the model's resolution; the
    uncertainty and member features too when the prediction carries those maps, PRIOR_FEATURE with a shape
    model (`fit_shape_prior`), and EDGE_FEATURE with `edges` (the prediction must carry the network's input).
    About 1-2 ms at 256x256, and 1 ms more with the edges. `shape=False` leaves out SHAPE_FEATURES, for a
    regression that does not read them."""
    probabilities = np.asarray(prediction.model_probabilities, dtype=np.float32)
    label = prediction.model_label
    raw = prediction.raw_label
    lung_probability = probabilities[RIGHT_LUNG] + probabilities[LEFT_LUNG]
    lungs = label > 0
    lung_area = max(int(np.count_nonzero(lungs)), 1)

    expected, stats, masks = [], {}, {}
    for value in (RIGHT_LUNG, LEFT_LUNG):
        mask = masks[value] = label == value
        p = probabilities[value]
        stats[value] = _lung_stats(mask)
        r0, r1, c0, c1 = stats[value][2]
        inside = float(p[r0:r1, c0:c1][mask[r0:r1, c0:c1]].sum())
        expected.append(2 * inside / (float(p.sum()) + stats[value][0] + EPS))
    uncertain = np.count_nonzero((lung_probability > 0.2) & (lung_probability < 0.8))
    boxes = [stats[v][2] for v in (RIGHT_LUNG, LEFT_LUNG) if stats[v][0]]
    if boxes:
        union = (min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes))
        entropy = _entropy_inside(probabilities, lungs, union)
    else:
        entropy = 1.0
    raw_lungs = raw > 0
    changed = np.count_nonzero(raw_lungs != lungs) + np.count_nonzero((raw != label) & lungs & raw_lungs)

    features = {
        "expected_dice": float(np.mean(expected)),
        "uncertain_mass": min(uncertain / lung_area, PER_LUNG_LIMIT),
        "entropy": entropy,
        "outside_mass": min(
            max(float(lung_probability.sum()) - float(lung_probability[lungs].sum()), 0.0) / lung_area, PER_LUNG_LIMIT
        ),
        "confidence": float(probabilities.max(0).mean()),
        "cleanup_change": min(changed / lung_area, PER_LUNG_LIMIT),
    }
    if shape:
        features.update(_shape_features(label, masks, stats))
    if prior is not None:
        features[PRIOR_FEATURE] = shape_prior_distance(_box_shapes(masks, stats), prior)
    if edges:
        if prediction.model_image is None:
            raise ValueError(f"{EDGE_FEATURE} reads the network's input: give postprocess its model_image")
        features[EDGE_FEATURE] = edge_support(prediction.model_image, label, probabilities)
    for names, spread in (
        (UNCERTAINTY_FEATURES, prediction.model_uncertainty),
        (MEMBER_FEATURES, prediction.model_member_spread),
    ):
        if spread is not None:
            features.update(zip(names, _spread_features(spread, lungs, lung_area)))
    return features


def _shape_features(label: np.ndarray, masks: dict, stats: dict) -> dict[str, float]:
    """SHAPE_FEATURES of a cleaned labelmap, from each lung's mask and `_lung_stats`."""
    (right, (ry, rx), rbox), (left, (ly, lx), lbox) = stats[RIGHT_LUNG], stats[LEFT_LUNG]
    right_mask, left_mask = masks[RIGHT_LUNG], masks[LEFT_LUNG]
    rb, lb = _boundary_pixels(right_mask, right, rbox), _boundary_pixels(left_mask, left, lbox)
    rows, cols = label.shape
    size = label.size
    both = right > 0 and left > 0
    return {
        "lung_fraction": max(math.log(max(right + left, 1) / size), -2 * LOG_LIMIT),
        "right_left_ratio": float(np.clip(math.log(right / left), -LOG_LIMIT, LOG_LIMIT)) if both else LOG_LIMIT,
        "box_fill": min(
            (a / max((b[1] - b[0]) * (b[3] - b[2]), 1) if a else 0.0) for a, b in ((right, rbox), (left, lbox))
        ),
        "outline": max((edge / math.sqrt(a) if a else 0.0) for a, edge in ((right, rb), (left, lb))),
        "centre_x": (rx + lx) / 2 / cols if both else 0.0,
        "centre_y": (ry + ly) / 2 / rows if both else 0.0,
        "height": (max(rbox[1], lbox[1]) - min(rbox[0], lbox[0])) / rows if both else 0.0,
        "solidity": min(_solidity(right_mask), _solidity(left_mask)) if both else 0.0,
        "height_ratio": float(np.clip(math.log((rbox[1] - rbox[0]) / (lbox[1] - lbox[0])), -LOG_LIMIT, LOG_LIMIT))
        if both
        else LOG_LIMIT,
    }


def _spread_features(spread: np.ndarray, lungs: np.ndarray, lung_area: int) -> tuple[float, float]:
    """Mean spread inside the lungs, and the pixels near them (3 pixels out) with a spread above 0.2 per lung
    pixel."""
    near = ndimage.binary_dilation(lungs, iterations=3)
    mean = float(spread[lungs].mean()) if lungs.any() else 1.0
    return mean, min(np.count_nonzero(spread[near] > 0.2) / lung_area, PER_LUNG_LIMIT)
