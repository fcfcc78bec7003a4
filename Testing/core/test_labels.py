"""Left/right derivation from merged masks and per-lung clean-up."""

from __future__ import annotations

import numpy as np

from lungseg.inference.labels import LEFT_LUNG, RIGHT_LUNG, clean_labelmap, merge_sides, split_left_right
from lungseg.io.labelled import list_cases, read_gray


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_split_reproduces_jsrt_right_and_left_masks(jsrt):
    cases = list_cases(jsrt, "val")
    assert len(cases) == 22
    for case in cases:
        derived = split_left_right(read_gray(case.mask) > 0)
        truth = merge_sides(read_gray(case.mask_right), read_gray(case.mask_left))
        assert _dice(derived == RIGHT_LUNG, truth == RIGHT_LUNG) > 0.99, case.name
        assert _dice(derived == LEFT_LUNG, truth == LEFT_LUNG) > 0.99, case.name


def test_split_cuts_touching_lungs_at_the_midline():
    mask = np.zeros((100, 120), bool)
    mask[10:90, 10:58] = True
    mask[10:90, 62:110] = True
    mask[60:70, 55:65] = True  # a bridge between the lungs
    label = split_left_right(mask)
    assert set(np.unique(label[:, :55])) <= {0, RIGHT_LUNG}
    assert set(np.unique(label[:, 65:])) <= {0, LEFT_LUNG}
    assert (label == RIGHT_LUNG).sum() > 3000 and (label == LEFT_LUNG).sum() > 3000


def test_clean_keeps_one_component_per_lung_and_fills_holes():
    label = np.zeros((80, 100), np.uint8)
    label[10:70, 10:45] = RIGHT_LUNG
    label[10:70, 55:90] = LEFT_LUNG
    label[30:35, 20:25] = 0  # hole in the right lung
    label[2:5, 2:5] = LEFT_LUNG  # stray speck of "left lung" on the right side
    label[75:78, 80:83] = RIGHT_LUNG  # stray speck of "right lung"
    out = clean_labelmap(label)
    assert (out[30:35, 20:25] == RIGHT_LUNG).all()
    assert (out[2:5, 2:5] == 0).all() and (out[75:78, 80:83] == 0).all()
    assert (out == LEFT_LUNG).sum() == 60 * 35 and (out == RIGHT_LUNG).sum() == 60 * 35


def _reference_clean(label):
    """The definition: MONAI's KeepLargestConnectedComponent per lung, then SciPy's binary_fill_holes."""
    from monai.transforms import KeepLargestConnectedComponent
    from scipy import ndimage

    keep = KeepLargestConnectedComponent(applied_labels=[RIGHT_LUNG, LEFT_LUNG], is_onehot=False, independent=True)
    kept = np.asarray(keep(label[None]))[0].astype(np.uint8)
    out = kept.copy()
    for value in (RIGHT_LUNG, LEFT_LUNG):
        out[ndimage.binary_fill_holes(kept == value) & (kept == 0)] = value
    return out


def test_clean_matches_monai_and_scipy_on_random_masks():
    """The fast clean-up gives the same labels as the library calls it replaces (ties in size excluded)."""
    from scipy import ndimage

    from lungseg.inference.labels import EIGHT_CONNECTED

    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(300):
        shape = tuple(int(v) for v in rng.integers(3, 60, 2))
        label = ((rng.random(shape) < rng.uniform(0.2, 0.8)) * rng.integers(1, 3, shape)).astype(np.uint8)
        if rng.random() < 0.7:
            label = ndimage.median_filter(label, 3)
        sizes = [
            np.sort(np.bincount(ndimage.label(label == v, structure=EIGHT_CONNECTED)[0].ravel())[1:])
            for v in (RIGHT_LUNG, LEFT_LUNG)
        ]
        if any(len(s) > 1 and s[-1] == s[-2] for s in sizes):
            continue  # two largest components of equal size: either is right
        np.testing.assert_array_equal(clean_labelmap(label), _reference_clean(label))
        compared += 1
    assert compared > 200
