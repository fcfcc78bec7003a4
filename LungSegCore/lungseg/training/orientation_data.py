"""The orientation classifier's data: upright films from `../shared/data` read and preprocessed as inference reads
them (cached per run), augmented with MONAI, then put into a random state, so that the labels cost nothing."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ..inference.orientation import STATES, UPRIGHT, apply_to_input
from ..inference.orientation_classifier import BASE_SIZE, INPUT_SIZE, classifier_input
from ..inference.preprocess import model_input, normalize_intensity
from ..io.files import atomic_path
from ..io.radiograph import read_radiograph, reorient
from ..io.selection import entry_cases


def film_input(path: Path) -> np.ndarray:
    """(128, 128) classifier input of a film, exactly as the batch computes it."""
    image = read_radiograph(path, max_pixels=None)
    return classifier_input(model_input(reorient(image.pixels, image.display_flips), BASE_SIZE)[None])[0, 0]


def heldout_films(cfg: dict) -> list[tuple[str, Path]]:
    """(set, path) of every held-out film: the held-out splits, the demo films and pydicom-data's chest CR."""
    data = cfg["data"]
    films = [(e["set"], c.image) for e in data["heldout"] for c in entry_cases(data["root"], e)]
    samples = Path(__file__).parents[1] / "samples"
    films += [("demo", p) for p in sorted(samples.glob("*.png"))]
    if data.get("dicom_films"):
        from pydicom.data import get_testdata_file

        films += [("dicom", Path(get_testdata_file(name))) for name in data["dicom_films"]]
    return films


def fingerprint(x: np.ndarray) -> np.ndarray:
    """Unit-norm 32² thumbnail, to find train films that copy a held-out film."""
    t = x.reshape(32, 4, 32, 4).mean(axis=(1, 3)).ravel()
    t = t - t.mean()
    return (t / (np.linalg.norm(t) + 1e-6)).astype(np.float32)


def build_cache(cfg: dict, run: Path, log=print) -> dict:
    """Classifier inputs of the upright train and held-out films (float16), kept in run/cache.npz. Train films that
    correlate above `data.dedup_correlation` with a held-out film are dropped."""
    path = run / "cache.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    t0 = time.time()
    train = [(e["set"], c.image) for e in cfg["data"]["train"] for c in entry_cases(cfg["data"]["root"], e)]
    heldout = heldout_films(cfg)
    train_x = np.stack([film_input(p) for _, p in train])
    heldout_x = np.stack([film_input(p) for _, p in heldout])
    correlation = np.stack([fingerprint(x) for x in train_x]) @ np.stack([fingerprint(x) for x in heldout_x]).T
    limit = cfg["data"].get("dedup_correlation")  # None: keep every train film
    keep = correlation.max(axis=1) <= limit if limit else np.ones(len(train), bool)
    log(
        f"cache: {len(train)} train films ({(~keep).sum()} dropped as copies of held-out films), "
        f"{len(heldout)} held-out, {time.time() - t0:.0f} s"
    )
    cache = {
        "train_x": train_x[keep].astype(np.float16),
        "train_set": np.array([s for s, _ in train])[keep],
        "dropped": np.array([f"{s}/{p.name}" for (s, p), k in zip(train, keep) if not k], dtype=str),
        "heldout_x": heldout_x.astype(np.float16),
        "heldout_set": np.array([s for s, _ in heldout]),
        "heldout_path": np.array([str(p) for _, p in heldout]),
    }
    with atomic_path(path) as tmp:  # keeps the .npz suffix, so np.savez adds none
        np.savez(tmp, **cache)
    return cache


def augmentation(cfg: dict):
    """MONAI transforms for one upright (1, 128, 128) film in [0, 1]; never flips or turns beyond `rotate_deg`."""
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandAffine,
        RandGaussianNoise,
        RandGaussianSmooth,
        RandScaleIntensity,
        RandShiftIntensity,
    )

    size = INPUT_SIZE
    return Compose(
        [
            RandAffine(
                prob=1.0,
                rotate_range=(np.deg2rad(cfg["rotate_deg"]),),
                scale_range=(cfg["scale"], cfg["scale"]),
                translate_range=(cfg["translate"] * size, cfg["translate"] * size),
                padding_mode="border",
            ),
            RandAdjustContrast(prob=0.8, gamma=tuple(cfg["gamma"])),
            RandScaleIntensity(prob=0.5, factors=cfg["contrast"]),
            RandShiftIntensity(prob=0.5, offsets=cfg["brightness"]),
            RandGaussianSmooth(
                prob=cfg["blur_prob"], sigma_x=tuple(cfg["blur_sigma"]), sigma_y=tuple(cfg["blur_sigma"])
            ),
            RandGaussianNoise(prob=cfg["noise_prob"], std=cfg["noise_std"]),
        ]
    )


def nonchest(rng: np.random.Generator, size: int = INPUT_SIZE) -> np.ndarray:
    """A random input that is not a chest film (noise, a smooth field or random shapes), for outlier exposure: the
    classifier learns to spread its probabilities over all states for such inputs."""
    kind = rng.integers(3)
    if kind == 0:
        x = rng.random((size, size))
    elif kind == 1:
        x = ndimage.gaussian_filter(rng.normal(size=(size, size)), rng.uniform(1, size / 4), mode="wrap")
    else:
        rows, cols = np.mgrid[:size, :size]
        x = np.zeros((size, size))
        for _ in range(rng.integers(1, 6)):
            cy, cx, ry, rx = (*rng.uniform(0, size, 2), *rng.uniform(size / 16, size / 2, 2))
            x += rng.normal() * (((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 < 1)
        x = ndimage.gaussian_filter(x, rng.uniform(0, 3))
    return normalize_intensity(x.astype(np.float32))


def state_shares(training: dict) -> np.ndarray:
    """How often each state is drawn: `upright_share` and `mirrored_share` (plain mirroring), the rest evenly."""
    shares = np.zeros(len(STATES))
    shares[UPRIGHT.index] = training["upright_share"]
    shares[STATES[4].index] = training.get("mirrored_share", 0.0)
    rest = shares == 0
    shares[rest] = (1 - shares.sum()) / rest.sum()
    return shares


class Batches:
    """Training batches: augmented films in random states, and a few non-chest inputs at the end."""

    def __init__(self, cache: dict, cfg: dict, rng: np.random.Generator):
        self.cache, self.cfg, self.rng = cache, cfg, rng
        self.augment = augmentation(cfg["augment"])
        entries = cfg["data"]["train"]
        self.members = [np.flatnonzero(cache["train_set"] == e["set"]) for e in entries]
        weights = np.array([e.get("weight", 1.0) if len(m) else 0.0 for e, m in zip(entries, self.members)])
        self.weights = weights / weights.sum()
        self.shares = state_shares(cfg["training"])

    def film(self) -> np.ndarray:
        members = self.members[self.rng.choice(len(self.members), p=self.weights)]
        x = self.cache["train_x"][members[self.rng.integers(len(members))]].astype(np.float32)
        self.augment.set_random_state(seed=int(self.rng.integers(2**31)))
        out = np.asarray(self.augment(x[None]))[0]
        return normalize_intensity(np.clip(out, 0, None))

    def next(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        training = self.cfg["training"]
        labels = self.rng.choice(len(STATES), size=training["batch_size"], p=self.shares)
        films = [apply_to_input(STATES[label], self.film()) for label in labels]
        outliers = [nonchest(self.rng) for _ in range((training.get("outlier_exposure") or {}).get("per_batch", 0))]
        x = torch.from_numpy(np.stack(films + outliers).astype(np.float32)[:, None])
        return x, torch.from_numpy(labels), len(outliers)
