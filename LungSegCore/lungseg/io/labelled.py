"""Labelled sets on disk: `images/`, `masks/` (+ optional `masks_right/`, `masks_left/`, `masks_ignore/`) and
`splits.csv`, read into cases for training (`training.data`), evaluation and QC fitting.

Masks are 0/255 PNGs with the image's name. Right and left come from `masks_right/` and `masks_left/` where they
exist, otherwise from the merged mask split at the lung midline (`labels.split_left_right`). Pixels marked in
`masks_ignore/` (devices or markup over the lung) get the label IGNORE and count neither way in training.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..definitions import IGNORE
from ..errors import LungSegError
from ..inference.labels import merge_sides, split_left_right
from .files import stem_of


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    mask: Path
    mask_right: Path | None
    mask_left: Path | None
    split: str
    mask_ignore: Path | None = None


def read_split_table(root: Path) -> dict[str, dict[str, str]]:
    """The rows of `root/splits.csv` by file name (empty when there is none)."""
    path = Path(root) / "splits.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {row["file"]: row for row in csv.DictReader(f)}


def read_splits(root: Path) -> dict[str, str]:
    return {name: row["split"] for name, row in read_split_table(root).items()}


def split_names(split: str | list[str] | None) -> list[str] | None:
    """A config's `split`, one name or a list of names, as a list (None: every split)."""
    return None if split is None else [split] if isinstance(split, str) else list(split)


def exact_mask(folder: Path, image: Path) -> Path | None:
    """The mask in `folder` with the image's file name."""
    path = folder / image.name
    return path if path.exists() else None


def find_mask(folder: Path, image: Path) -> Path | None:
    """The mask in `folder` with the image's file name, else one with its stem and another suffix."""
    exact = folder / image.name
    if exact.exists():
        return exact
    matches = [p for p in folder.glob(stem_of(image) + ".*") if stem_of(p) == stem_of(image)]
    return matches[0] if matches else None


def labelled_case(
    image: Path,
    masks: Path,
    split: str,
    find: Callable[[Path, Path], Path | None] = exact_mask,
    masks_right: Path | None = None,
    masks_left: Path | None = None,
) -> Case | None:
    """`image` as a case (None when `masks` has no mask for it, as `find` matches them): its sides where both
    `masks_right` and `masks_left` (by default the folders of those names beside `masks`) have its mask, its
    ignore mask where `masks_ignore/` beside `masks` has one."""
    mask = find(masks, image)
    if mask is None:
        return None
    right = find(masks_right or masks.parent / "masks_right", image)
    left = find(masks_left or masks.parent / "masks_left", image)
    sided = right is not None and left is not None
    ignore = find(masks.parent / "masks_ignore", image)
    return Case(image.stem, image, mask, right if sided else None, left if sided else None, split, ignore)


def list_cases(root: str | Path, split: str | list[str] | None = None) -> list[Case]:
    """Every image with a mask under `root`, optionally only those of one split (or a list) of `splits.csv`."""
    root = Path(root)
    wanted = split_names(split)
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise LungSegError(f"{root}: expected the folders images/ and masks/")
    splits = read_splits(root)
    cases = []
    for image in sorted((root / "images").iterdir()):
        case = labelled_case(image, root / "masks", splits.get(image.name, ""))
        if case is not None and (wanted is None or case.split in wanted):
            cases.append(case)
    if not cases:
        raise LungSegError(f"{root}: no image/mask pairs" + (f" in split '{split}'" if split else ""))
    return cases


def read_gray(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32))


def case_sides(case: Case) -> np.ndarray | None:
    """The case's label (0 background, 1 right, 2 left) from its side masks; None when it has none."""
    if case.mask_right is not None and case.mask_left is not None:
        return merge_sides(read_gray(case.mask_right), read_gray(case.mask_left))
    return None


def case_label(case: Case) -> np.ndarray:
    """Full-resolution label image (0 background, 1 right, 2 left, IGNORE) of one case."""
    label = case_sides(case)
    if label is None:
        label = split_left_right(read_gray(case.mask) > 0)
    if case.mask_ignore is not None:
        label[read_gray(case.mask_ignore) > 0] = IGNORE
    return label
