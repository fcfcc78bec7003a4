"""Left/right derivation from merged masks and per-lung clean-up."""
from __future__ import annotations

import numpy as np

from lungseg.data import list_cases, read_gray
from lungseg.labels import LEFT_LUNG, RIGHT_LUNG, clean_labelmap, merge_sides, split_left_right


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
    label[30:35, 20:25] = 0            # hole in the right lung
    label[2:5, 2:5] = LEFT_LUNG        # stray speck of "left lung" on the right side
    label[75:78, 80:83] = RIGHT_LUNG   # stray speck of "right lung"
    out = clean_labelmap(label)
    assert (out[30:35, 20:25] == RIGHT_LUNG).all()
    assert (out[2:5, 2:5] == 0).all() and (out[75:78, 80:83] == 0).all()
    assert (out == LEFT_LUNG).sum() == 60 * 35 and (out == RIGHT_LUNG).sum() == 60 * 35
