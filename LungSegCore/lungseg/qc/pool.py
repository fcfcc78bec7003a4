"""The labelled cases of a QC fit and their scored rows: which images a model never trained on, the two halves
(fit and measure) they fall in, and, per image or degraded copy (`perturb.py`), the model's maps, the features,
the rule flags and the true Dice (`scored_row`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..definitions import DEFINITIONS
from ..errors import LungSegError
from ..io.labelled import case_label, list_cases, read_split_table
from ..io.radiograph import read_radiograph
from ..io.selection import entry_cases
from .features import lung_shapes, quality_features
from .perturb import perturb
from .rules import quality_flags

# -- images, halves and what a model trained on ----------------------------------------------------------------


def read_groups(root: Path) -> dict[str, str]:
    """File -> the unit the halves keep together: the patient where splits.csv names one, else the file."""
    return {name: row.get("patient") or name for name, row in read_split_table(root).items()}


def half_of(dataset: str, group: str) -> str:
    """ "fit" or "measure", by a hash of the data set and the group: fixed, and the same for every model."""
    return "fit" if int(hashlib.sha1(f"{dataset}/{group}".encode()).hexdigest()[:8], 16) % 2 == 0 else "measure"


def training_entries(card: dict) -> list[dict]:
    """The data entries a model trained on, from its card."""
    return (card.get("data") or {}).get("train") or (card.get("recipe") or {}).get("data", {}).get("train") or []


def trained_on(card: dict, dataset: str) -> bool:
    """Whether the model trained on (part of) `dataset`: the data set is in its domain."""
    return any(entry["set"] == dataset for entry in training_entries(card))


def cases_for(card: dict, dataset: str, root: Path, limit: int | None = None) -> list:
    """The labelled images of `dataset` (the folder `root / dataset`) that the model never trained on (whole
    splits, or a cross-validation fold's held-out part), at most `limit` (a fixed subset chosen by hash, so that
    both halves keep their share)."""
    seen = {
        case.image.name
        for entry in training_entries(card)
        if entry["set"] == dataset
        for case in entry_cases(root, entry)
    }
    cases = [c for c in list_cases(root / dataset) if c.image.name not in seen]
    if limit is not None and len(cases) > limit:
        cases = sorted(cases, key=lambda c: hashlib.sha1(c.image.name.encode()).hexdigest())[:limit]
        cases.sort(key=lambda c: c.image.name)
    return cases


def usable_cases(cases: list) -> tuple[list, list[str]]:
    """The cases whose image and reference masks can be read and have one size, and for each other case a message
    naming the file and the problem: one bad file does not stop a fit."""
    usable, problems = [], []
    for case in cases:
        try:
            pixels, truth, _ = case_arrays(case, 0)
        except LungSegError as exc:  # the image: io names the file and the problem
            problems.append(str(exc))
            continue
        except RuntimeError as exc:  # a mask SimpleITK cannot read; its message names the file
            problems.append(f"{case.image.name}: a reference mask cannot be read ({' '.join(str(exc).split())})")
            continue
        if pixels.shape != truth.shape:
            problems.append(
                f"{case.mask}: the reference is {truth.shape[1]}x{truth.shape[0]} pixels but the image "
                f"{case.image.name} is {pixels.shape[1]}x{pixels.shape[0]}"
            )
            continue
        usable.append(case)
    return usable, problems


# -- segmenting them: features, rules and the true Dice per image ----------------------------------------------


def case_arrays(case, variant: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Pixels (stored view; the data sets hold no display flips), reference labels and the perturbation of one
    image: variant 0 is the image itself, variant k > 0 its k-th perturbation."""
    truth, pixels = case_label(case), read_radiograph(case.image).pixels
    if variant == 0:
        return pixels, truth, ""
    seed = int(hashlib.sha1(f"{case.image.name}/{variant}".encode()).hexdigest()[:8], 16)
    return perturb(pixels, truth, seed)


UNCERTAINTY_SCALE = 500.0  # the spread (a std of probabilities, at most 0.5) stored as uint8


def iter_outputs(segmenter, items: list, mode: str, batch_size: int = 8):
    """Yields each item (case, variant), the model's maps for it, as uint8: the softmax (3, S, S), its spread in the
    uncertainty mode (S, S) and an ensemble's member spread (S, S), from an `inference.Segmenter`; and what the
    model saw (`seen`: the network input (S, S), the reference labels and the perturbation), so that `scored_row`
    need not read and degrade the image again. The batch quantizes the softmax the same way before resizing it,
    so nothing that matters is lost."""
    from ..inference.preprocess import model_input

    def u8_spread(maps, k):
        return None if maps is None else np.clip(np.rint(maps[k] * UNCERTAINTY_SCALE), 0, 255).astype(np.uint8)

    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        seen = []
        for case, variant in chunk:
            pixels, truth, kind = case_arrays(case, variant)
            seen.append((model_input(pixels, segmenter.size)[0], truth, kind))
        output = segmenter.predict(np.stack([x[None] for x, _, _ in seen]), uncertainty=mode == "uncertainty")
        for k, item in enumerate(chunk):
            u8 = np.rint(output.probabilities[k] * 255).astype(np.uint8)
            yield item, (u8, u8_spread(output.uncertainty, k), u8_spread(output.member_spread, k)), seen[k]


def model_outputs(segmenter, items: list, mode: str, batch_size: int = 8) -> dict[str, tuple]:
    """`iter_outputs` by item key (`item_key`), for a cache."""
    return {item_key(*item): maps for item, maps, _ in iter_outputs(segmenter, items, mode, batch_size)}


def scored_row(
    case, variant: int, maps: tuple, dataset: str, groups: dict[str, str], seen: tuple | None = None
) -> dict:
    """One item's row from the model's maps (`iter_outputs`): the features (EDGE_FEATURE too, from the network's
    input), the rule flags of each lung definition and the true Dice, with its perturbation, group (`read_groups`)
    and half. `seen` is what `iter_outputs` gave the model; without it (maps from a cache) the image is read and
    degraded again as the model saw it."""
    from ..evaluation.metrics import both_lung_dice
    from ..inference.postprocess import postprocess
    from ..inference.preprocess import model_input

    u8, spread, member_spread = (None if m is None else m.astype(np.float32) for m in maps)
    if seen is None:
        pixels, truth, kind = case_arrays(case, variant)
        seen = model_input(pixels, u8.shape[-1])[0], truth, kind
    model_image, truth, kind = seen
    prediction = postprocess(
        u8 / 255,
        truth.shape,
        None if spread is None else spread / UNCERTAINTY_SCALE,
        member_spread=None if member_spread is None else member_spread / UNCERTAINTY_SCALE,
        model_image=model_image,
    )
    group = groups.get(case.image.name, case.image.name)
    return {
        "image": case.image.name,
        "perturbation": kind,
        "split": case.split,
        "group": group,
        "half": half_of(dataset, group),
        "dice": both_lung_dice(prediction.label, truth),
        "features": quality_features(prediction, edges=True),
        # for PRIOR_FEATURE: the shape model is fitted on the fit half's real references, once the halves are
        # known (a degraded copy's reference is moved alike, no shape to learn)
        "shapes": lung_shapes(prediction.model_label).astype(np.float16),
        "reference_shapes": None if kind else lung_shapes(truth).astype(np.float16),
        "rules": {
            d: quality_flags(prediction.label, prediction.raw_label, prediction.uncertainty, d) for d in DEFINITIONS
        },
    }


def scored_rows(outputs: dict[str, tuple], items: list, dataset: str, groups: dict[str, str]) -> list[dict]:
    """`scored_row` of each item, from the outputs by item key (`model_outputs`)."""
    return [scored_row(case, variant, outputs[item_key(case, variant)], dataset, groups) for case, variant in items]


def item_key(case, variant: int) -> str:
    return case.image.name + (f"~p{variant}" if variant else "")


def is_ensemble(card: dict) -> bool:
    return card["network"]["name"] == "ensemble"
