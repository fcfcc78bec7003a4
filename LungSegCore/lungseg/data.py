"""Labelled datasets on disk: `images/`, `masks/` (+ optional `masks_right/`, `masks_left/`, `masks_ignore/`) and
`splits.csv`.

This is the layout of the sets in `../shared/data`, and the layout a user follows to retrain on their own cohort.
Masks are 0/255 PNGs with the image's name. Right and left come from `masks_right/` and `masks_left/` where they
exist, otherwise from the merged mask split at the lung midline (`labels.split_left_right`). Pixels marked in
`masks_ignore/` (devices or markup over the lung) get the label IGNORE and count neither way in training.
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .definitions import IGNORE
from .errors import LungSegError
from .files import save_checkpoint
from .labels import merge_sides, split_left_right
from .transforms import model_input, resize_label


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    mask: Path
    mask_right: Path | None
    mask_left: Path | None
    split: str
    mask_ignore: Path | None = None


def read_splits(root: Path) -> dict[str, str]:
    path = root / "splits.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {row["file"]: row["split"] for row in csv.DictReader(f)}


def list_cases(root: str | Path, split: str | None = None) -> list[Case]:
    """Every image with a mask under `root`, optionally only one split of `splits.csv`."""
    root = Path(root)
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise LungSegError(f"{root}: expected the folders images/ and masks/")
    splits = read_splits(root)
    cases = []
    for image in sorted((root / "images").iterdir()):
        mask = root / "masks" / image.name
        if not mask.exists():
            continue
        right, left = root / "masks_right" / image.name, root / "masks_left" / image.name
        sided = right.exists() and left.exists()
        ignore = root / "masks_ignore" / image.name
        case = Case(image.stem, image, mask, right if sided else None, left if sided else None,
                    splits.get(image.name, ""), ignore if ignore.exists() else None)
        if split is None or case.split == split:
            cases.append(case)
    if not cases:
        raise LungSegError(f"{root}: no image/mask pairs" + (f" in split '{split}'" if split else ""))
    return cases


def split_by_ratio(cases: list[Case], ratios: dict[str, float], seed: int = 0) -> dict[str, list[Case]]:
    """A seeded, reproducible split of cases by ratio, e.g. {"train": 0.7, "val": 0.3}."""
    order = np.random.default_rng(seed).permutation(len(cases))
    total = sum(ratios.values())
    splits, start = {}, 0
    for i, (name, ratio) in enumerate(ratios.items()):
        end = len(cases) if i == len(ratios) - 1 else start + round(len(cases) * ratio / total)
        splits[name] = [cases[j] for j in sorted(order[start:end])]
        start = end
    return splits


def read_gray(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32))


def case_label(case: Case) -> np.ndarray:
    """Full-resolution label image (0 background, 1 right, 2 left, IGNORE) of one case."""
    if case.mask_right is not None and case.mask_left is not None:
        label = merge_sides(read_gray(case.mask_right), read_gray(case.mask_left))
    else:
        label = split_left_right(read_gray(case.mask) > 0)
    if case.mask_ignore is not None:
        label[read_gray(case.mask_ignore) > 0] = IGNORE
    return label


def cache_dir() -> Path:
    return Path(os.environ.get("LUNGSEG_CACHE", Path.home() / ".cache" / "lungseg"))


def load_arrays(cases: list[Case], size: int, desc: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Model-ready images (N,1,S,S float16 in [0,1]) and labels (N,1,S,S uint8), cached on disk by content."""
    key = hashlib.sha1(f"v2|{size}|".encode() + "|".join(
        f"{c.image}:{c.image.stat().st_mtime_ns}:{c.mask}:{c.mask_ignore}" for c in cases).encode()).hexdigest()[:16]
    path = cache_dir() / f"{desc or 'cases'}-{size}-{key}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=True)
        return cached["images"], cached["labels"]
    from tqdm import tqdm

    images = torch.empty((len(cases), 1, size, size), dtype=torch.float16)
    labels = torch.empty((len(cases), 1, size, size), dtype=torch.uint8)
    for i, case in enumerate(tqdm(cases, desc=f"loading {desc}", leave=False)):
        images[i] = model_input(read_gray(case.image), size).half()
        labels[i, 0] = resize_label(case_label(case), (size, size))
    save_checkpoint({"images": images, "labels": labels}, path)  # DDP ranks may build the same cache at once
    return images, labels


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory cases with an optional MONAI dictionary augmentation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def item(self, i: int, seed: int | None = None) -> dict:
        """Case `i`; with `seed`, its augmentation is drawn from that seed alone (reproducible anywhere)."""
        item = {"image": self.images[i].float(), "label": self.labels[i].float()}
        if self.transform is not None:
            if seed is not None:
                self.transform.set_random_state(seed=seed)
            item = self.transform(item)
        return {"image": torch.as_tensor(item["image"]).float().clamp(0, 1),
                "label": torch.as_tensor(item["label"]).round().long()}  # nearest resampling keeps IGNORE

    def __getitem__(self, i: int) -> dict:
        return self.item(i)


class EpochSamples(torch.utils.data.Dataset):
    """One epoch's drawn cases, each augmented from its own seed, so a resumed epoch repeats exactly."""

    def __init__(self, dataset: ArrayDataset, indices: list[int], seeds: list[int]):
        self.dataset, self.indices, self.seeds = dataset, indices, seeds

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        return self.dataset.item(self.indices[k], self.seeds[k])
