"""Fitting a model's predicted quality (`quality.py`) on labelled images, and measuring it on others.

`lungseg fit-qc` fits a model's card on a labelled data set (`fit_card_qc`): a model you trained, or a shipped one
on your own cohort. `scripts/fit_quality.py` fits the shipped cards on ../shared/data with more sources (peer
models, failure sources, cross-validation folds) and a cache. Both go through the same steps:

1. segment the labelled images the model never trained on, and degraded copies of them (`perturb`: an opacity or
   occluder over a lung, rotation, zoom-out, crop, gamma, noise, blur, the reference moved alike), which give the
   failures that good validation images lack;
2. split them in two halves by a hash of the image (of the patient where `splits.csv` names one);
3. on the `fit` half, keep or turn off the fragments rule (`keeps_fragments_rule`), choose the feature set and
   ridge penalty by cross-validation (`choose_regression`), fit the regression and choose the threshold
   (`fit_mode`: the highest recall of Dice < 0.90 whose false-flag rate on real images, rules included, stays
   within the budget);
4. measure it on the `measure` half (`group_measures`): every number a card's `validation` holds is from images
   the fit never saw.
"""
from __future__ import annotations

import dataclasses
import hashlib
import sys
from datetime import date
from pathlib import Path

import numpy as np

from ..training.data import case_label, entry_cases, list_cases, read_split_table
from ..definitions import DEFINITIONS, IGNORE
from ..errors import LungSegError
from ..io.radiograph import read_radiograph
from .rules import FRAGMENTS, quality_flags
from .features import (EDGE_FEATURE, FEATURE_SETS, MEMBER_FEATURES, PRIOR_FEATURE, TWO_SIDED, UNCERTAINTY_FEATURES,
                       fit_shape_prior, lung_shapes, quality_features, shape_prior_distances)
from .model import QualityModel, transform
from .stats import DICE_LIMIT, fit_regression, qc_accuracy, qc_accuracy_text

MODES = ("default", "uncertainty")
METHOD = ("fractional logistic regression (quasi-binomial GLM, IRLS; feature set and L2 chosen by cross-validation "
          "within the fit half) of the both-lung Dice on features of the model's own output (lungseg/quality.py); "
          "flag below the threshold")


# -- images, halves and what a model trained on ----------------------------------------------------------------

def read_groups(root: Path) -> dict[str, str]:
    """File -> the unit the halves keep together: the patient where splits.csv names one, else the file."""
    return {name: row.get("patient") or name for name, row in read_split_table(root).items()}


def half_of(dataset: str, group: str) -> str:
    """"fit" or "measure", by a hash of the data set and the group: fixed, and the same for every model."""
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
    seen = {case.image.name for entry in training_entries(card) if entry["set"] == dataset
            for case in entry_cases(root, entry)}
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
            problems.append(f"{case.mask}: the reference is {truth.shape[1]}x{truth.shape[0]} pixels but the image "
                            f"{case.image.name} is {pixels.shape[1]}x{pixels.shape[0]}")
            continue
        usable.append(case)
    return usable, problems


# -- segmenting them: features, rules and the true Dice per image ----------------------------------------------

def dice_both(label: np.ndarray, truth: np.ndarray) -> float:
    """Both-lung Dice as `lungseg evaluate` scores it, IGNORE pixels (devices, markup) left out."""
    keep = truth != IGNORE
    p, t = (label > 0) & keep, (truth > 0) & keep
    total = int(p.sum()) + int(t.sum())
    return 2 * int((p & t).sum()) / total if total else 1.0


PERTURBATIONS = ("opacity", "occluder", "rotation", "zoom_out", "crop", "gamma", "noise", "blur")


def perturb(pixels: np.ndarray, truth: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """One random degradation of a radiograph (float pixels, air dark) and its reference labels, of a random
    kind and strength fixed by `seed`. Geometric kinds move the labels alike; the others keep them, since the
    lung is still there under an opacity or a device."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    kind = PERTURBATIONS[rng.integers(len(PERTURBATIONS))]
    rows, cols = pixels.shape
    low, high = np.percentile(pixels, (0.5, 99.5))
    span = max(high - low, 1e-6)
    lungs = np.argwhere((truth > 0) & (truth < 255))
    if kind in ("opacity", "occluder") and len(lungs):
        r, c = lungs[rng.integers(len(lungs))]  # somewhere on a lung
        if kind == "opacity":  # a consolidation: a smooth bright cloud
            sigma = rng.uniform(0.08, 0.2) * rows
            yy, xx = np.ogrid[:rows, :cols]
            cloud = np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * sigma ** 2))
            pixels = pixels + rng.uniform(0.5, 1.0) * span * cloud
        else:  # a device, markup or shield: a rectangle of bright or dark
            h, w = int(rng.uniform(0.1, 0.3) * rows), int(rng.uniform(0.1, 0.3) * cols)
            pixels = pixels.copy()
            pixels[max(r - h // 2, 0):r + h // 2, max(c - w // 2, 0):c + w // 2] = high if rng.random() < 0.7 else low
    elif kind == "rotation":
        angle = rng.choice([-1, 1]) * rng.uniform(15, 40)
        pixels = ndimage.rotate(pixels, angle, reshape=False, order=1, mode="constant", cval=float(low))
        truth = ndimage.rotate(truth, angle, reshape=False, order=0, mode="constant", cval=0)
    elif kind == "zoom_out":
        scale = rng.uniform(0.45, 0.75)
        small = (max(int(rows * scale), 8), max(int(cols * scale), 8))
        r0, c0 = rng.integers(0, rows - small[0] + 1), rng.integers(0, cols - small[1] + 1)
        zoom = (small[0] / rows, small[1] / cols)
        canvas, labels = np.full_like(pixels, low), np.zeros_like(truth)
        canvas[r0:r0 + small[0], c0:c0 + small[1]] = ndimage.zoom(pixels, zoom, order=1)[:small[0], :small[1]]
        labels[r0:r0 + small[0], c0:c0 + small[1]] = ndimage.zoom(truth, zoom, order=0)[:small[0], :small[1]]
        pixels, truth = canvas, labels
    elif kind == "crop":  # part of the chest cut off: the bottom, the top or one side
        side, cut = rng.integers(4), rng.uniform(0.15, 0.35)
        keep = [slice(None), slice(None)]
        keep[side % 2] = slice(int(cut * pixels.shape[side % 2]), None) if side < 2 else \
            slice(None, int((1 - cut) * pixels.shape[side % 2]))
        pixels, truth = pixels[tuple(keep)], truth[tuple(keep)]
    elif kind == "gamma":
        unit = np.clip((pixels - low) / span, 0, 1)
        gamma = rng.uniform(0.2, 0.4) if rng.random() < 0.5 else rng.uniform(2.5, 5.0)
        pixels = low + span * unit ** gamma
    elif kind == "noise":
        pixels = pixels + rng.normal(0, rng.uniform(0.1, 0.35) * span, pixels.shape)
    else:  # blur
        pixels = ndimage.gaussian_filter(pixels, rng.uniform(0.01, 0.03) * max(rows, cols))
    return np.ascontiguousarray(pixels, dtype=np.float32), np.ascontiguousarray(truth), kind


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
    import torch

    from ..inference.preprocess import model_input

    def u8_spread(maps, k):
        return None if maps is None else (maps[k] * UNCERTAINTY_SCALE).round().clamp(0, 255).to(torch.uint8).numpy()

    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        seen = []
        for case, variant in chunk:
            pixels, truth, kind = case_arrays(case, variant)
            seen.append((model_input(pixels, segmenter.size)[0], truth, kind))
        output = segmenter.predict(torch.stack([x[None] for x, _, _ in seen]), uncertainty=mode == "uncertainty")
        for k, item in enumerate(chunk):
            u8 = (output.probabilities[k] * 255).round().to(torch.uint8).numpy()
            yield item, (u8, u8_spread(output.uncertainty, k), u8_spread(output.member_spread, k)), seen[k]


def model_outputs(segmenter, items: list, mode: str, batch_size: int = 8) -> dict[str, tuple]:
    """`iter_outputs` by item key (`item_key`), for a cache."""
    return {item_key(*item): maps for item, maps, _ in iter_outputs(segmenter, items, mode, batch_size)}


def scored_row(case, variant: int, maps: tuple, dataset: str, groups: dict[str, str],
               seen: tuple | None = None) -> dict:
    """One item's row from the model's maps (`iter_outputs`): the features (EDGE_FEATURE too, from the network's
    input), the rule flags of each lung definition and the true Dice, with its perturbation, group (`read_groups`)
    and half. `seen` is what `iter_outputs` gave the model; without it (maps from a cache) the image is read and
    degraded again as the model saw it."""
    import torch

    from ..inference.postprocess import postprocess
    from ..inference.preprocess import model_input

    u8, spread, member_spread = (None if m is None else torch.from_numpy(m.astype(np.float32)) for m in maps)
    if seen is None:
        pixels, truth, kind = case_arrays(case, variant)
        seen = model_input(pixels, u8.shape[-1])[0], truth, kind
    model_image, truth, kind = seen
    prediction = postprocess(u8 / 255, truth.shape, None if spread is None else spread / UNCERTAINTY_SCALE,
                             member_spread=None if member_spread is None else member_spread / UNCERTAINTY_SCALE,
                             model_image=model_image)
    group = groups.get(case.image.name, case.image.name)
    return {"image": case.image.name, "perturbation": kind, "split": case.split, "group": group,
            "half": half_of(dataset, group), "dice": dice_both(prediction.label, truth),
            "features": quality_features(prediction, edges=True),
            # for PRIOR_FEATURE: the shape model is fitted on the fit half's real references, once the halves are
            # known (a degraded copy's reference is moved alike, no shape to learn)
            "shapes": lung_shapes(prediction.model_label).astype(np.float16),
            "reference_shapes": None if kind else lung_shapes(truth).astype(np.float16),
            "rules": {d: quality_flags(prediction.label, prediction.raw_label, prediction.uncertainty, d)
                      for d in DEFINITIONS}}


def scored_rows(outputs: dict[str, tuple], items: list, dataset: str, groups: dict[str, str]) -> list[dict]:
    """`scored_row` of each item, from the outputs by item key (`model_outputs`)."""
    return [scored_row(case, variant, outputs[item_key(case, variant)], dataset, groups) for case, variant in items]


def item_key(case, variant: int) -> str:
    return case.image.name + (f"~p{variant}" if variant else "")


def is_ensemble(card: dict) -> bool:
    return card["network"]["name"] == "ensemble"


# -- fitting and measuring -------------------------------------------------------------------------------------

NO_SPREAD = " without sample spread"  # an uncertainty-mode candidate that reads the averaged output alone
WITH_PRIOR = " with shape prior"  # a candidate that also reads PRIOR_FEATURE
WITH_EDGES = " with image edges"  # a candidate that also reads EDGE_FEATURE


def feature_names(mode: str, ensemble: bool = False, feature_set: str = "output+shape") -> tuple[str, ...]:
    """The regression's features: the set's, PRIOR_FEATURE where the name says WITH_PRIOR, EDGE_FEATURE where it
    says WITH_EDGES, the samples' spread in the uncertainty mode (unless the name ends in NO_SPREAD) and an
    ensemble's member spread."""
    spread = mode == "uncertainty" and not feature_set.endswith(NO_SPREAD)
    base = feature_set.removesuffix(NO_SPREAD)
    edges = base.endswith(WITH_EDGES)
    base = base.removesuffix(WITH_EDGES)
    prior = base.endswith(WITH_PRIOR)
    return FEATURE_SETS[base.removesuffix(WITH_PRIOR)] + ((PRIOR_FEATURE,) if prior else ()) + \
        ((EDGE_FEATURE,) if edges else ()) + (UNCERTAINTY_FEATURES if spread else ()) + \
        (MEMBER_FEATURES if ensemble else ())


def candidate_sets(mode: str, with_prior: bool, with_edges: bool = False) -> list[str]:
    """What `choose_regression` tries: every FEATURE_SETS set, each also with the shape prior where the rows have
    it, each of those also with the image's edges where the rows have them, and in the uncertainty mode each of
    those also without the samples' spread (it has to earn its place)."""
    sets = [*FEATURE_SETS, *((s + WITH_PRIOR for s in FEATURE_SETS) if with_prior else ())]
    sets += [s + WITH_EDGES for s in sets] if with_edges else []
    return [*sets, *((s + NO_SPREAD for s in sets) if mode == "uncertainty" else ())]


def reference_shape_prior(rows: list[dict], minimum: int) -> dict | None:
    """The shape model (`quality.fit_shape_prior`) of the references of the real images among `rows` (the fit
    half), each image once; None with fewer than `minimum` of them or rows scored without their shapes."""
    if not all("shapes" in r for r in rows):
        return None
    references = {(r.get("dataset", ""), r["image"]): r["reference_shapes"] for r in rows if not r["perturbation"]}
    return fit_shape_prior(np.stack(list(references.values()))) if len(references) >= minimum else None


def with_prior_feature(rows: list[dict], prior: dict) -> list[dict]:
    """The rows, each with PRIOR_FEATURE computed from its predicted lungs' shapes under `prior`."""
    distances = shape_prior_distances(np.stack([r["shapes"] for r in rows]), prior) if rows else []
    return [{**r, "features": {**r["features"], PRIOR_FEATURE: float(d)}} for r, d in zip(rows, distances)]


def flags(rows: list[dict], quality: np.ndarray, threshold: float, definition: str) -> np.ndarray:
    """What `lungseg segment` decides: check when a rule fired or the quality is below the threshold."""
    rules = np.array([bool(r["rules"][definition]) for r in rows], dtype=bool)
    return rules | (quality < threshold)


SCOPES = ("all", "own")
MIN_SUBSET = 20  # good images a data set needs before its false-flag rate is held to the budget on its own


def good_real_subsets(rows: list[dict], limit: float) -> dict[str, np.ndarray]:
    """The good real images whose false flags the threshold answers for, by name: all of them and the card's own
    model's (what its users get; the peers' outputs can be easier to judge), each over every data set and over
    each data set with at least MIN_SUBSET of them (the targets hold per data set: COVID-era films flagged at
    11 % do not pass because JSRT's are flagged at 2 %). A data set's subset holds the results of models that
    trained on it: `unet-512`'s own COVID-era results are out of its domain, and flagging its good ones there is
    no false alarm a user of that model should be spared (they count in the pooled subsets). Perturbed images with
    a Dice above the limit are degraded all the same, and count as neither right nor wrong flags."""
    dice = np.array([r["dice"] for r in rows])
    real = np.array([not r["perturbation"] for r in rows])
    own = np.array([r.get("role", "own") == "own" for r in rows])
    dataset = np.array([r.get("dataset", "") for r in rows])
    in_domain = np.array([r.get("in_domain", True) for r in rows])
    good = (dice >= limit) & real
    subsets = {}
    for scope, members in zip(SCOPES, (good, good & own)):
        subsets[scope] = members
        for name in sorted(set(dataset[members])):
            subset = members & in_domain & (dataset == name)
            if name and subset.sum() >= MIN_SUBSET:
                subsets[f"{scope}/{name}"] = subset
    return subsets


def false_flag_rates(flagged: np.ndarray, subsets: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float((flagged & subset).sum() / max(subset.sum(), 1)) for name, subset in subsets.items()}


def false_flag_budget(rows: list[dict], definition: str, max_false_flags: float,
                      limit: float) -> tuple[dict[str, float], dict[str, float]]:
    """(budgets, rules alone), per subset (`good_real_subsets`): the false-flag rate the threshold may reach is
    `max_false_flags`, unless the rules alone (a missing or tiny lung, fragments, an implausible area) already flag
    more of that subset's good images; then the threshold may not raise that rate (a model out of its domain:
    `unet-512`'s own results on COVID-era films). Each subset keeps its own budget: the own model's fragments do not
    let the threshold flag more of the peers' good results."""
    rules_only = flags(rows, np.ones(len(rows)), 0.0, definition)  # no quality is below 0
    rules_alone = false_flag_rates(rules_only, good_real_subsets(rows, limit))
    return {name: max(max_false_flags, rate) for name, rate in rules_alone.items()}, rules_alone


def fragments_false_flags(rows: list[dict], definition: str, limit: float) -> tuple[float, int]:
    """The share of the card's own model's good real results, on data sets it trained on, that the fragments rule
    (qc.FRAGMENTS) flags, and how many such results there are."""
    good = [r for r in rows if r.get("role", "own") == "own" and r.get("in_domain", True)
            and not r["perturbation"] and r["dice"] >= limit]
    flagged = sum(any(FRAGMENTS in reason for reason in r["rules"][definition]) for r in good)
    return flagged / max(len(good), 1), len(good)


def keeps_fragments_rule(rows: list[dict], definition: str, max_false_flags: float,
                         limit: float) -> tuple[bool, float]:
    """Whether the fragments rule stays a flag of its own for this model, and the share it flags
    (`fragments_false_flags`).

    A weakly trained model leaves stray lung fragments that the clean-up removes from results that are good after
    all; the rule then flags them past the false-flag budget, and the budget rises with it (`false_flag_budget`):
    measured, 16 of 33 good held-out JSRT results of a U-Net after 64 steps. It is turned off when it alone flags
    more than `max_false_flags` of at least MIN_SUBSET good results of the model's own, in its domain (fragments
    out of its domain are a warning worth keeping); the clean-up's change stays a feature of the quality."""
    rate, count = fragments_false_flags(rows, definition, limit)
    return count < MIN_SUBSET or rate <= max_false_flags, rate


def without_fragments_rule(rows: list[dict], definition: str) -> list[dict]:
    """The rows as a card without the fragments rule judges them: that rule's reason struck from their flags."""
    return [{**r, "rules": {**r["rules"], definition: [x for x in r["rules"][definition] if FRAGMENTS not in x]}}
            for r in rows]


def choose_threshold(rows: list[dict], quality: np.ndarray, definition: str, max_false_flags: float,
                     limit: float) -> float:
    """The threshold with the highest recall of Dice < limit on these rows (real and perturbed) whose false-flag
    rate on the good real images, rules included, stays within its budget in every subset (`false_flag_budget`:
    all of them and the card's own model's, each pooled and per data set); the lowest such threshold."""
    bad = np.array([r["dice"] < limit for r in rows])
    checked = good_real_subsets(rows, limit)
    budgets, _ = false_flag_budget(rows, definition, max_false_flags, limit)
    best = (-1.0, 0.5)
    for threshold in np.round(np.arange(0.50, 0.995, 0.0025), 4):
        flagged = flags(rows, quality, threshold, definition)
        recall = (flagged & bad).sum() / max(bad.sum(), 1)
        rates = false_flag_rates(flagged, checked)
        if all(rates[name] <= budgets[name] for name in budgets) and recall > best[0]:
            best = (recall, float(threshold))
    return best[1]


def fit_mode(fit_rows: list[dict], mode: str, definition: str, l2: float, max_false_flags: float, limit: float,
             perturbed_weight: float, ensemble: bool = False, feature_set: str = "output+shape"):
    names = feature_names(mode, ensemble, feature_set)
    real = [r for r in fit_rows if not r["perturbation"]] or fit_rows
    # the centre of good segmentations; a barely trained model may have none at 0.95, or even at the limit
    good = [r for r in real if r["dice"] >= 0.95] or [r for r in real if r["dice"] >= limit] or real
    centre = tuple(float(np.median([r["features"][n] for r in good])) if n in TWO_SIDED else 0.0 for n in names)
    x = np.stack([transform(r["features"], names, centre) for r in fit_rows])
    dice = np.array([r["dice"] for r in fit_rows])
    weight = np.array([perturbed_weight if r["perturbation"] else 1.0 for r in fit_rows])
    mean, scale, weights, bias = fit_regression(x, dice, l2=l2, sample_weight=weight)
    model = QualityModel(names, centre, tuple(mean), tuple(scale), tuple(weights), bias, threshold=0.0)
    quality = np.array([model.predict(r["features"]) for r in fit_rows])
    threshold = choose_threshold(fit_rows, quality, definition, max_false_flags, limit)
    return QualityModel(names, centre, tuple(mean), tuple(scale), tuple(weights), bias, threshold)


L2_GRID = (1.0, 3.0, 10.0, 30.0)


def choose_regression(fit_rows: list[dict], mode: str, definition: str, limit: float, perturbed_weight: float,
                      ensemble: bool, feature_sets=None, l2_grid=L2_GRID,
                      folds: int = 5) -> tuple[str, float, dict[str, dict[float, float]]]:
    """The feature set (quality.FEATURE_SETS) and ridge penalty whose predicted quality ranks the real images of
    the fit half best within each data set (the mean over the data sets with at least MIN_SUBSET of them of the
    Spearman with their Dice: the targets hold per data set, and a pooled Spearman also rewards telling JSRT from
    COVID-era films apart), by `folds`-fold cross-validation within the fit half, the folds keeping each patient
    (or image) whole. Each set is tried with and without the shape prior and the image's edges where the rows have
    them, and in the uncertainty mode with and without the samples' spread (`candidate_sets`). A tie goes to the
    smaller set, then to the smaller penalty. Few real images with many features (v7-full) need more shrinkage, or
    fewer features, than thousands of COVID-QU-Ex rows.
    Returns the set, the penalty and every candidate's score ({set: {penalty: Spearman}})."""
    from scipy.stats import spearmanr

    if feature_sets is None:
        feature_sets = candidate_sets(mode, all(PRIOR_FEATURE in r["features"] for r in fit_rows),
                                      all(EDGE_FEATURE in r["features"] for r in fit_rows))
    feature_sets = list(feature_sets)
    fold = [int(hashlib.sha1(f"l2/{r['group']}".encode()).hexdigest()[:8], 16) % folds for r in fit_rows]
    scores = {}
    for feature_set in feature_sets:
        for l2 in l2_grid:
            quality, dice, dataset = [], [], []
            for k in range(folds):
                train = [r for r, f in zip(fit_rows, fold) if f != k]
                model = fit_mode(train, mode, definition, l2, 1.0, limit, perturbed_weight, ensemble, feature_set)
                held = [r for r, f in zip(fit_rows, fold) if f == k and not r["perturbation"]]
                quality += [model.predict(r["features"]) for r in held]
                dice += [r["dice"] for r in held]
                dataset += [r.get("dataset", "") for r in held]
            quality, dice, dataset = np.array(quality), np.array(dice), np.array(dataset)
            per_set = [spearmanr(quality[dataset == d], dice[dataset == d])[0] for d in sorted(set(dataset))
                       if (dataset == d).sum() >= MIN_SUBSET]
            score = np.mean(per_set) if per_set else spearmanr(quality, dice)[0]
            scores.setdefault(feature_set, {})[l2] = round(float(score), 4)
    candidates = [(s, l2) for s in feature_sets for l2 in l2_grid]
    best = max(candidates, key=lambda c: (scores[c[0]][c[1]], -len(feature_names(mode, ensemble, c[0])), -c[1]))
    return best[0], best[1], scores


def measure(model, rows: list[dict], definition: str, limit: float) -> dict:
    """QC accuracy on rows: with the rules (what users get), the quality alone, and the rules alone."""
    dice = np.array([r["dice"] for r in rows])
    quality = np.array([model.predict(r["features"]) for r in rows])
    return {"qc": qc_accuracy(dice, flags(rows, quality, model.threshold, definition), quality, limit),
            "quality_only": qc_accuracy(dice, quality < model.threshold, None, limit),
            "rules_only": qc_accuracy(dice, flags(rows, quality, -1.0, definition), None, limit)}


def group_measures(model, pool: list[dict], definition: str, limit: float) -> dict:
    """The measure half, by group: `<set>` the card's own model on real images, `<set> (perturbed)` on degraded
    ones, `<set> (cross-validated)` its recipe's fold models on their held-out folds, `<set> / <model>` another
    model's outputs (peers and failure sources), `<set> (shipped models)` the
    real images segmented by every shipped model of the definition, `own` and `own+perturbed` the card's own
    model over every data set."""
    held_out = [r for r in pool if r["half"] == "measure"]
    groups = {"own": [r for r in held_out if r["role"] == "own" and not r["perturbation"]],
              "own+perturbed": [r for r in held_out if r["role"] == "own"]}
    for r in held_out:
        if r["role"] == "own":
            groups.setdefault(r["dataset"] + (" (perturbed)" if r["perturbation"] else ""), []).append(r)
        elif r["role"] == "cv":  # every image segmented by its recipe's fold model that never saw it
            groups.setdefault(f"{r['dataset']} (cross-validated)", []).append(r)
        else:
            groups.setdefault(f"{r['dataset']} / {r['source']}", []).append(r)
        if r["role"] in ("own", "peer") and not r["perturbation"]:  # every shipped model of the definition
            groups.setdefault(f"{r['dataset']} (shipped models)", []).append(r)
    # another model's outputs lack an ensemble's member features: its QC cannot be measured on them
    usable = {name: [r for r in rows if set(model.features) <= r["features"].keys()] for name, rows in groups.items()}
    return {name: measure(model, rows, definition, limit) for name, rows in sorted(usable.items()) if rows}


# -- the card's qc block ---------------------------------------------------------------------------------------

def merged_modes(old: dict | None, new: dict) -> dict:
    """`new`'s modes, and `old`'s other modes as they were, in each part (`modes`, `validation`)."""
    old = old or {}
    merged = dict(new)
    for part in ("modes", "validation"):
        both = {**(old.get(part) or {}), **new[part]}
        merged[part] = {mode: both[mode] for mode in MODES if mode in both}
    return merged


def merged_qc(old: dict | None, new: dict) -> dict:
    """The card's new qc block: the modes refit now, and the card's other modes as they were (each mode records
    its own fit in `fitted_on`), so that `--modes default` does not drop the uncertainty mode. A mode refit now
    drops its `swapped` measurement, which measured the fit it replaces: run `--swap-halves --write` again."""
    merged = merged_modes(old, new)
    merged["threshold"] = merged["modes"]["default"]["threshold"] if "default" in merged["modes"] else None
    merged.pop("swapped", None)
    swapped = (old or {}).get("swapped")
    if swapped:
        kept = {part: {m: v for m, v in swapped[part].items() if m not in new["modes"]}
                for part in ("modes", "validation")}
        if kept["modes"]:
            merged["swapped"] = kept
    return merged


# -- one card's fit ---------------------------------------------------------------------------------------------

def empty_qc_block(dice_limit: float, script: str) -> dict:
    """A card's `qc` block before its modes are fitted (`fit_qc_mode` fills `modes` and `validation`)."""
    return {"method": METHOD, "target": "both-lung Dice against masks of the card's lung definition",
            "dice_limit": dice_limit, "fitted": date.today().isoformat(), "script": script,
            "modes": {}, "validation": {}, "threshold": None}


def fit_qc_mode(pool: list[dict], mode: str, definition: str, *, ensemble: bool = False,
                dice_limit: float = DICE_LIMIT, perturbed_weight: float = 0.3, max_false_flags: float = 0.10,
                feature_sets=None, l2_grid=L2_GRID, fit_failure_sources: bool = False, command: str = "",
                half: str = "fit") -> tuple[dict, dict]:
    """One mode of a card's QC, fitted on the pool's `fit` half and measured on its `measure` half.

    Args:
        pool: scored rows (`scored_rows`) with their `dataset`, `source`, `role` ("own", "peer", "cv" or
            "failure") and `in_domain`.
        half: which half of the images the fit used, as the card records it ("measure" for a swapped fit).

    Returns:
        The mode's block for the card (the regression, its threshold and `fitted_on`: what it was fitted on and
        how it was chosen) and its measurements on the measure half (`group_measures`).
    """
    def fit_half(rows: list[dict]) -> list[dict]:
        return [r for r in rows if r["half"] == "fit" and (r["role"] != "failure" or fit_failure_sources)]

    fit_rows = fit_half(pool)
    below = int(sum(r["dice"] < dice_limit for r in fit_rows))
    if not below:
        raise LungSegError(f"no segmentation below Dice {dice_limit} among the {len(fit_rows)} results of the fit "
                           "half, so there is nothing to learn what a failure looks like from: add degraded "
                           "copies (--perturbations) or more images")
    fragments_rule, fragments_rate = keeps_fragments_rule(fit_rows, definition, max_false_flags, dice_limit)
    if not fragments_rule:  # fitted and measured as users will get it: without that rule
        pool = without_fragments_rule(pool, definition)
        fit_rows = fit_half(pool)
    prior = reference_shape_prior(fit_rows, MIN_SUBSET)
    if prior is not None:
        pool = with_prior_feature(pool, prior)
        fit_rows = fit_half(pool)
    elif any(WITH_PRIOR in s for s in feature_sets or ()):
        raise LungSegError(f"a feature set{WITH_PRIOR} needs the reference masks of at least {MIN_SUBSET} real "
                           "images in the fit half, to fit the shape model on; this fit half has fewer")
    if any(WITH_EDGES in s for s in feature_sets or ()) and not all(EDGE_FEATURE in r["features"] for r in pool):
        raise LungSegError(f"a feature set{WITH_EDGES} needs {EDGE_FEATURE} in every row: rows scored from the "
                           "network's input (`scored_row`)")
    feature_set, l2, cv_scores = choose_regression(fit_rows, mode, definition, dice_limit, perturbed_weight,
                                                   ensemble, feature_sets, l2_grid)
    model = fit_mode(fit_rows, mode, definition, l2, max_false_flags, dice_limit, perturbed_weight, ensemble,
                     feature_set)
    model = dataclasses.replace(model, fragments_rule=fragments_rule,
                                shape_prior=prior if PRIOR_FEATURE in model.features else None)
    budget, rules_alone = false_flag_budget(fit_rows, definition, max_false_flags, dice_limit)
    block = {**model.to_dict(), "fitted_on": {
        "command": command, "feature_set": feature_set, "l2": l2,
        "fragments_rule_false_flags": round(fragments_rate, 4),
        "shape_prior_references": prior["images"] if prior else 0,
        "cross_validated_spearman": {k: {str(l2): v for l2, v in row.items()} for k, row in cv_scores.items()},
        "images": len(fit_rows), "below_limit": below,
        "perturbed": int(sum(bool(r["perturbation"]) for r in fit_rows)),
        "perturbed_weight": perturbed_weight, "max_false_flags_fit": max_false_flags,
        "false_flag_budget": {k: round(v, 4) for k, v in budget.items()},
        "rules_alone_false_flags": {k: round(v, 4) for k, v in rules_alone.items()},
        "models": sorted({r["source"] for r in fit_rows}), "datasets": sorted({r["dataset"] for r in fit_rows}),
        "half": half, "date": date.today().isoformat()}}
    return block, group_measures(model, pool, definition, dice_limit)


DEFAULT_PERTURBATIONS = 4  # degraded copies of each image: the failures a good model's own images lack


def fit_card_qc(model: str, data: str | Path, *, split: str | None = None,
                perturbations: int = DEFAULT_PERTURBATIONS, uncertainty: bool = False, device: str = "auto",
                write: bool = False, overwrite: bool = False, max_false_flags: float = 0.10, batch_size: int = 4,
                command: str = "lungseg fit-qc") -> tuple[dict, list[str]]:
    """Fit a model's QC on a labelled data set and measure it on the half it was not fitted on (`lungseg fit-qc`).

    Args:
        model: a model name or card path (`models.read_card`).
        data: a data set folder as training reads it (`images/`, `masks/`, optionally `masks_right/`,
            `masks_left/`, `masks_ignore/` and `splits.csv` with a `patient` column to keep a patient's images in
            one half). Images of the splits the model trained on (its card's data entries for a set of this
            folder's name) are left out.
        split: only the images of this split of `splits.csv` (still never those the model trained on).
        perturbations: degraded copies of each image (`perturb`).
        uncertainty: also fit the `--uncertainty` mode (its test-time augmentation or latent samples).
        write: write the block into the model's card (only its `qc` block changes, never the weights); a mode the
            card already has is replaced only with `overwrite`.
        batch_size: images per forward pass, as `lungseg segment --batch-size` (the uncertainty mode runs each
            image's samples in the same pass).

    Returns:
        The qc block (each mode's regression, threshold and `fitted_on`, and its `validation` on the held-out half)
        and the images left out because they or their masks could not be used (`usable_cases`), each named with
        its problem (also printed).
    """
    import json

    from tqdm import tqdm

    from ..io.files import write_atomic_text
    from ..inference.segmenter import Segmenter

    data = Path(data)
    segmenter = Segmenter(model, device)
    card = segmenter.card
    modes = ["default", "uncertainty"] if uncertainty else ["default"]
    fitted = sorted(set(modes) & set(((card.get("qc") or {}).get("modes") or {})))
    if write and fitted and not overwrite:  # before minutes of segmenting, not after
        raise LungSegError(f"{card['card_path']}: the card already has a fitted QC for the {' and '.join(fitted)} "
                           f"mode ({(card['qc'] or {}).get('fitted', 'date unknown')}); --overwrite replaces it")
    if perturbations < 0:
        raise LungSegError(f"--perturbations {perturbations}: give 0 or more degraded copies per image")
    if not 0 <= max_false_flags < 1:
        raise LungSegError(f"--max-false-flags {max_false_flags}: give a share of the good results, from 0 to below 1")
    unseen = cases_for(card, data.name, data.parent)
    cases = [case for case in unseen if split is None or case.split == split]
    if not cases:
        known = sorted({case.split for case in list_cases(data)} - {""})
        if split and split not in known:
            raise LungSegError(f"{data}: no labelled image is in split '{split}' (splits.csv names "
                               f"{', '.join(known) or 'none'})")
        raise LungSegError(f"{data}: every labelled image" + (f" of split '{split}'" if split else "")
                           + f" is in a split that model '{card['name']}' trained on")
    cases, problems = usable_cases(cases)
    for problem in problems:
        print(f"lungseg: error: {problem}", file=sys.stderr)
    if not cases:
        raise LungSegError(f"{data}: none of its labelled images can be used (above)")
    items = [(case, variant) for case in cases for variant in range(perturbations + 1)]
    groups = read_groups(data)
    block = empty_qc_block(DICE_LIMIT, command)
    for mode in modes:  # row by row: the model's maps of thousands of images need not stay in memory
        outputs = tqdm(iter_outputs(segmenter, items, mode, batch_size), total=len(items),
                       desc=f"segmenting ({mode} mode)", unit="image")
        pool = [{**scored_row(case, variant, maps, data.name, groups, seen), "dataset": data.name,
                 "source": card["name"], "role": "own", "in_domain": True} for (case, variant), maps, seen in outputs]
        block["modes"][mode], block["validation"][mode] = fit_qc_mode(
            pool, mode, segmenter.definition, ensemble=is_ensemble(card), max_false_flags=max_false_flags,
            command=command)
    block["threshold"] = block["modes"]["default"]["threshold"]
    if write:
        path = Path(card["card_path"])
        stored = json.loads(path.read_text())
        stored["qc"] = merged_qc(stored.get("qc"), block)
        write_atomic_text(json.dumps(stored, indent=2) + "\n", path)
    return block, problems


def fit_summary(block: dict) -> list[str]:
    """One line per mode and measured group of the held-out half: threshold, recall, false flags, Spearman; and a
    line for each mode: the features it chose, and whether its fit turned the fragments rule off
    (`keeps_fragments_rule`)."""
    lines = []
    for mode, groups in block["validation"].items():
        threshold = block["modes"][mode]["threshold"]
        fitted = block["modes"][mode]["fitted_on"]
        references = fitted.get("shape_prior_references", 0)
        edges = any(WITH_EDGES in name for name in fitted.get("cross_validated_spearman", {}))
        lines.append(f"{mode} mode: features '{fitted['feature_set']}' (chosen by cross-validation within the fit "
                     "half; " + ("the image's edges were a candidate; " if edges else "")
                     + (f"the shape prior from {references} reference masks was a candidate)" if references
                        else "too few reference masks in the fit half for a shape prior)"))
        if not block["modes"][mode].get("fragments_rule", True):
            rate = fitted["fragments_rule_false_flags"]
            lines.append(f"{mode} mode: the fragments rule is off, for it alone flagged {rate:.1%} of the model's "
                         "good results in the fit half; the clean-up's change still counts in the quality")
        for group, measured in groups.items():
            if group in ("own", "own+perturbed") or " (shipped models)" in group:
                continue  # the same images as the data set's own group here
            lines.append(f"{mode} mode, threshold {threshold:.3f}, held-out {group} ({measured['qc']['images']} "
                         f"results): {qc_accuracy_text(measured['qc'])}")
    return lines
