"""Training data: the cases a config selects from labelled sets (`io.selection` over `io.labelled`), as model-ready
arrays.

The sets follow the layout of `io.labelled`: that of the sets in `../shared/data`, and the one a user follows to
retrain on their own cohort.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..inference.preprocess import model_input
from ..io.files import save_checkpoint
from ..io.labelled import Case, case_label, read_gray
from .augment import resize_label


def cache_dir() -> Path:
    return Path(os.environ.get("LUNGSEG_CACHE", Path.home() / ".cache" / "lungseg"))


def load_arrays(cases: list[Case], size: int, desc: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Model-ready images (N,1,S,S float16 in [0,1]) and labels (N,1,S,S uint8), cached on disk by content."""
    key = hashlib.sha1(
        f"v2|{size}|".encode()
        + "|".join(f"{c.image}:{c.image.stat().st_mtime_ns}:{c.mask}:{c.mask_ignore}" for c in cases).encode()
    ).hexdigest()[:16]
    path = cache_dir() / f"{desc or 'cases'}-{size}-{key}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=True)
        return cached["images"], cached["labels"]
    from tqdm import tqdm

    images = torch.empty((len(cases), 1, size, size), dtype=torch.float16)
    labels = torch.empty((len(cases), 1, size, size), dtype=torch.uint8)
    for i, case in enumerate(tqdm(cases, desc=f"loading {desc}", leave=False)):
        images[i] = torch.from_numpy(model_input(read_gray(case.image), size)).half()
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
        return {
            "image": torch.as_tensor(item["image"]).float().clamp(0, 1),
            "label": torch.as_tensor(item["label"]).round().long(),
        }  # nearest resampling keeps IGNORE

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
