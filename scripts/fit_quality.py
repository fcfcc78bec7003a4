#!/usr/bin/env python
"""Fit the predicted quality (`lungseg/quality.py`) of shipped models and write each card's `qc` block.

    .venv/bin/python scripts/fit_quality.py --model unet-full-extent --write   # one retrained card
    .venv/bin/python scripts/fit_quality.py --write                            # every shipped card
    .venv/bin/python scripts/fit_quality.py --modes default --report qc.json   # measure only, write nothing

For each card:
1. Segments the labelled images of the card's lung definition (JSRT and COVID-QU-Ex for lung fields, v7-full for the
   full extent) that lie outside the model's training splits, with the card's model (`own`) and with the other
   shipped models of the same definition (`peers`), and the same images degraded on purpose (`perturbed`, own
   model only): a bright opacity or an occluder over a lung, strong rotation, zoom-out, a crop, extreme gamma,
   noise or blur, with the reference mask moved alike. Those give the card's own model failures in numbers that
   its validation images alone do not hold (a few per hundred).
2. Splits the images in two halves by a hash of their name (of the patient for v7-full), the same for every model
   and perturbation: the regression and its threshold are fitted on the `fit` half only, and every number in the
   card's `validation` is measured on the `measure` half, on images the fit never saw.
3. Fits the fractional logistic regression of the Dice on the features, per mode (`default`; `uncertainty` with the
   test-time augmentation or latent samples of `--uncertainty`), with the feature set (the boundary's
   uncertainty, the output's whole confidence, or with the shape's plausibility; in the uncertainty mode, each
   with or without the samples' spread) and the ridge penalty that rank the fit half's real images best within
   each data set under cross-validation within that half, chooses the threshold on the fit half (the highest
   recall of Dice < 0.90 whose false-flag rate, rules included, stays within `--max-false-flags`, pooled and per
   data set), and writes the `qc` block (only that block: the weights and their SHA-256 are untouched).
4. Also measures the card's QC on *failure sources* it was not fitted on: the shipped models of the other lung
   definition, and the weaker models in `--sources-dir` (a U-Net trained on JSRT alone and its early checkpoints,
   made with `scripts/quality-source-jsrt-only.yaml` and `--add-source`). `--fit-failure-sources` also fits on them;
   measured here, that hurt the shipped models' QC (README, "Quality control").

`--swap-halves` runs the same fit with the halves exchanged, the second direction of a two-fold cross-fitting, so
that every image is held out once; with `--write` it writes only the card's `qc.swapped` (what that fit measured on
the fit half), never the regression users get, and `--table` adds both directions up.

Model outputs are cached per model weights, data set, perturbation and mode under `--cache` (compressed uint8
softmax), so refitting after a card was retrained segments only with that model, and the features can change
without segmenting again.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# the lung definition each labelled set's masks follow
DATASETS = {"jsrt": "lung-fields", "covid-qu-ex": "lung-fields", "v7-full": "full-extent"}
MODES = ("default", "uncertainty")


# -- images, halves and the sources -------------------------------------------------------------------------

def read_groups(root: Path) -> dict[str, str]:
    """File -> the unit the halves keep together: the patient where splits.csv names one, else the file."""
    from lungseg.data import read_split_table

    return {name: row.get("patient") or name for name, row in read_split_table(root).items()}


def half_of(dataset: str, group: str) -> str:
    """"fit" or "measure", by a hash of the data set and the group: fixed, and the same for every model."""
    return "fit" if int(hashlib.sha1(f"{dataset}/{group}".encode()).hexdigest()[:8], 16) % 2 == 0 else "measure"


def swap_halves(rows: list[dict]) -> list[dict]:
    """The rows with the halves exchanged: the same procedure fitted on the measure half and measured on the fit
    half, a second held-out estimate over as many other images (two-fold cross-fitting)."""
    other = {"fit": "measure", "measure": "fit"}
    return [{**r, "half": other[r["half"]]} for r in rows]


def training_entries(card: dict) -> list[dict]:
    """The data entries a model trained on, from its card."""
    return (card.get("data") or {}).get("train") or (card.get("recipe") or {}).get("data", {}).get("train") or []


def trained_on(card: dict, dataset: str) -> bool:
    """Whether the model trained on (part of) `dataset`: the data set is in its domain."""
    return any(entry["set"] == dataset for entry in training_entries(card))


def cases_for(card: dict, dataset: str, root: Path, limit: int) -> list:
    """The labelled images of `dataset` that the model never trained on (whole splits, or a cross-validation
    fold's held-out part), at most `limit` (a fixed subset chosen by hash, so that both halves keep their share)."""
    from lungseg.data import entry_cases, list_cases

    seen = {case.image.name for entry in training_entries(card) if entry["set"] == dataset
            for case in entry_cases(root, entry)}
    cases = [c for c in list_cases(root / dataset) if c.image.name not in seen]
    if len(cases) > limit:
        cases = sorted(cases, key=lambda c: hashlib.sha1(c.image.name.encode()).hexdigest())[:limit]
        cases.sort(key=lambda c: c.image.name)
    return cases


def add_source(run_dir: Path, name: str, sources_dir: Path, checkpoint: str = "last.pt") -> Path:
    """A training run's checkpoint as a model (safetensors and card) in the sources folder."""
    from lungseg.export import model_from_run
    from lungseg.models import save_model

    model, state, config = model_from_run(run_dir, checkpoint)
    card = {"name": name, "version": "qc-source", "definition": config.get("definition", "lung-fields"),
            "network": config["network"], "input_size": config["input_size"], "data": config["data"],
            "recipe": config, "training": {"checkpoint": checkpoint, "epoch": int(state.get("epoch", 0)),
                                           "step": int(state.get("step", 0)), "run": str(run_dir)},
            "note": "a failure source for scripts/fit_quality.py, not a model to use"}
    sources_dir.mkdir(parents=True, exist_ok=True)
    return save_model(model, card, sources_dir)


# -- features and Dice per image ----------------------------------------------------------------------------

def dice_both(label: np.ndarray, truth: np.ndarray) -> float:
    """Both-lung Dice as `lungseg evaluate` scores it, IGNORE pixels (devices, markup) left out."""
    from lungseg.definitions import IGNORE

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


def case_arrays(case, variant: int, need_pixels: bool = True) -> tuple[np.ndarray | None, np.ndarray, str]:
    """Pixels (stored view; the data sets hold no display flips), reference labels and the perturbation of one
    image: variant 0 is the image itself, variant k > 0 its k-th perturbation."""
    from lungseg.data import case_label
    from lungseg.io import read_radiograph

    truth = case_label(case)
    if variant == 0:
        return (read_radiograph(case.image).pixels if need_pixels else None), truth, ""
    pixels = read_radiograph(case.image).pixels
    seed = int(hashlib.sha1(f"{case.image.name}/{variant}".encode()).hexdigest()[:8], 16)
    return perturb(pixels, truth, seed)


UNCERTAINTY_SCALE = 500.0  # the spread (a std of probabilities, at most 0.5) stored as uint8


def model_outputs(card_path: str, items: list, mode: str, batch_size: int = 8) -> dict[str, tuple]:
    """The model's softmax (3, S, S), its spread in the uncertainty mode (S, S) and an ensemble's member spread
    (S, S), as uint8, per item key. The batch quantizes the softmax the same way before resizing it, so nothing
    that matters is lost."""
    from lungseg.inference import Segmenter
    from lungseg.transforms import model_input

    def u8_spread(maps, k):
        return None if maps is None else (maps[k] * UNCERTAINTY_SCALE).round().clamp(0, 255).to(torch.uint8).numpy()

    segmenter = Segmenter(card_path, "cpu")
    out = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        x = torch.stack([model_input(case_arrays(case, variant)[0], segmenter.size) for case, variant in chunk])
        output = segmenter.predict(x, uncertainty=mode == "uncertainty")
        for k, item in enumerate(chunk):
            u8 = (output.probabilities[k] * 255).round().to(torch.uint8).numpy()
            out[item_key(*item)] = (u8, u8_spread(output.uncertainty, k), u8_spread(output.member_spread, k))
    return out


def item_key(case, variant: int) -> str:
    return case.image.name + (f"~p{variant}" if variant else "")


def is_ensemble(card: dict) -> bool:
    return card["network"]["name"] == "ensemble"


def cached_outputs(card_path: str, card: dict, dataset: str, items: list, mode: str, cache: Path) -> dict:
    """`model_outputs` through a cache per model weights, data set and mode (a compressed .npz): items that an
    earlier run segmented (with any limit) are not segmented again, and the features can change freely."""
    path = cache / f"{card['name']}-{card['sha256'][:12]}-{dataset}-{mode}.npz"
    maps = ("probabilities",) + (("spread",) if mode == "uncertainty" else ()) + \
        (("member_spread",) if is_ensemble(card) else ())
    known = {}
    if path.exists():
        with np.load(path) as data:  # each data[key] decompresses the whole array: once per key
            if all(m in data for m in maps):  # else written before a map was kept: segment again
                names, arrays = data["names"], {m: data[m] for m in maps}
                for i, name in enumerate(names):
                    known[str(name)] = tuple(arrays[m][i] if m in arrays else None
                                             for m in ("probabilities", "spread", "member_spread"))
    missing = [it for it in items if item_key(*it) not in known]
    if missing:
        t0 = time.perf_counter()
        known.update(model_outputs(card_path, missing, mode))
        names = sorted(known)
        arrays = {"names": np.array(names)}
        for i, m in enumerate(("probabilities", "spread", "member_spread")):
            if m in maps:
                arrays[m] = np.stack([known[n][i] for n in names])
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
        print(f"  {card['name']} on {dataset} ({mode}): {len(missing)} images in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    return known


def scored_rows(card_path: str, dataset: str, root: Path, mode: str, limit: int, variants: int,
                cache: Path) -> list[dict]:
    """One model on the chosen images of one data set (and `variants` perturbations of each): the features, the
    rule flags and the Dice of each."""
    from lungseg.definitions import DEFINITIONS
    from lungseg.models import read_card
    from lungseg.postprocess import postprocess
    from lungseg.qc import quality_flags
    from lungseg.quality import quality_features

    card = read_card(card_path)
    cases = cases_for(card, dataset, root, limit)
    items = [(case, v) for case in cases for v in range(variants + 1)]
    outputs = cached_outputs(card_path, card, dataset, items, mode, cache)
    groups = read_groups(root / dataset)
    rows = []
    for case, variant in items:
        u8, spread, member_spread = (None if m is None else torch.from_numpy(m.astype(np.float32))
                                     for m in outputs[item_key(case, variant)])
        _, truth, kind = case_arrays(case, variant, need_pixels=False)
        prediction = postprocess(u8 / 255, truth.shape, None if spread is None else spread / UNCERTAINTY_SCALE,
                                 member_spread=None if member_spread is None else member_spread / UNCERTAINTY_SCALE)
        group = groups.get(case.image.name, case.image.name)
        rows.append({"image": case.image.name, "perturbation": kind, "split": case.split, "group": group,
                     "half": half_of(dataset, group), "dice": dice_both(prediction.label, truth),
                     "features": quality_features(prediction),
                     "rules": {d: quality_flags(prediction.label, prediction.raw_label, prediction.uncertainty, d)
                               for d in DEFINITIONS}})
    return rows


# -- fitting and measuring ----------------------------------------------------------------------------------

NO_SPREAD = " without sample spread"  # an uncertainty-mode candidate that reads the averaged output alone


def feature_names(mode: str, ensemble: bool = False, feature_set: str = "output+shape") -> tuple[str, ...]:
    """The regression's features: the set's, the samples' spread in the uncertainty mode (unless the set's name
    ends in NO_SPREAD) and an ensemble's member spread."""
    from lungseg.quality import FEATURE_SETS, MEMBER_FEATURES, UNCERTAINTY_FEATURES

    spread = mode == "uncertainty" and not feature_set.endswith(NO_SPREAD)
    return FEATURE_SETS[feature_set.removesuffix(NO_SPREAD)] + (UNCERTAINTY_FEATURES if spread else ()) + \
        (MEMBER_FEATURES if ensemble else ())


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
    from lungseg.quality import TWO_SIDED, QualityModel, fit_regression, transform

    names = feature_names(mode, ensemble, feature_set)
    good = [r for r in fit_rows if r["dice"] >= 0.95 and not r["perturbation"]]
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
    (or image) whole. In the uncertainty mode each set is tried with and without the samples' spread (NO_SPREAD).
    A tie goes to the smaller set, then to the smaller penalty. Few real
    images with many features (v7-full) need more shrinkage, or fewer features, than thousands of COVID-QU-Ex rows.
    Returns the set, the penalty and every candidate's score ({set: {penalty: Spearman}})."""
    from scipy.stats import spearmanr

    from lungseg.quality import FEATURE_SETS

    if feature_sets is None:  # in the uncertainty mode, the samples' spread has to earn its place too
        feature_sets = [*FEATURE_SETS, *((s + NO_SPREAD for s in FEATURE_SETS) if mode == "uncertainty" else ())]
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
    from lungseg.quality import qc_accuracy

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


def cv_fold_cards(run_dir: Path) -> list[str]:
    """The fold models (cards) of a `scripts/cross_validate.py` run, each to be scored on its held-out fold."""
    cards = sorted(str(p) for p in run_dir.glob("fold-*/model-last/*.json") if p.with_suffix(".safetensors").exists())
    if not cards:
        raise SystemExit(f"fit_quality: {run_dir} holds no scored fold (fold-K/model-last/); run cross_validate.py")
    return cards


def cross_validated(card: dict, dataset: str) -> bool:
    return any(e["set"] == dataset and "folds" in e for e in training_entries(card))


def role_on(role: str, source_card: dict, dataset: str) -> str:
    """A peer that never trained on `dataset` is out of its domain there (`unet-512`, trained on JSRT alone, on
    COVID-era films): like the other definition's models, it is a failure source on that set, measured and not
    fitted, so that its failures neither train the card's regression nor spend the card's false-flag budget."""
    if role == "peer" and not trained_on(source_card, dataset):
        return "failure"
    return role


def pool_for(card: dict, peers: list[str], failures: list[str], root: Path, mode: str, limits: dict,
             source_limits: dict[str, int], variants: dict[str, int], cache: Path,
             folds: list[str] = ()) -> list[dict]:
    """Rows of the card's own model (real and perturbed images), its peers, the fold models of its recipe's
    cross-validation (`folds`, each on its held-out images only) and, in the default mode, the failure sources on
    every data set of the card's definition."""
    from lungseg.models import read_card

    pool = []
    for role, sources in (("own", [card["card_path"]]), ("peer", peers), ("cv", folds), ("failure", failures)):
        for source in sources:
            source_card = read_card(source)
            for dataset, definition in DATASETS.items():
                if definition != card["definition"] or not (root / dataset / "images").is_dir():
                    continue
                role_here = role_on(role, source_card, dataset)
                if role_here == "failure" and mode != "default":
                    continue  # the failure sources are measured in the default mode only
                if role == "cv" and not cross_validated(source_card, dataset):
                    continue  # a fold model stands in for the card's own model on its held-out fold only
                limit = min(limits["failure" if role_here == "failure" else mode],
                            source_limits.get(source_card["name"], limits[mode]))
                if not cases_for(source_card, dataset, root, 1):
                    continue
                count = variants.get(dataset, 1) if role == "own" else 0
                for row in scored_rows(source, dataset, root, mode, limit, count, cache):
                    pool.append({**row, "dataset": dataset, "source": source_card["name"], "role": role_here,
                                 "source_definition": source_card.get("definition", ""),
                                 "in_domain": trained_on(source_card, dataset)})
    return pool


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


def summary_line(name: str, measured: dict) -> str:
    parts = []
    for group in [g for g in measured if " / " not in g]:
        qc = measured[group]["qc"]
        parts.append(f"{group}: {qc['flagged_below']}/{qc['below']} flagged, false flags {qc['false_flag_rate']}, "
                     f"Spearman {qc['spearman']}")
    return f"  {name}: " + "\n  ".join(parts)


def markdown_table(names: list[str]) -> str:
    """The README's QC table, from the cards' `validation` blocks (the measure half): per card, mode and group."""
    from lungseg.models import read_card

    lines = ["| model | mode | measured on (held-out half) | images | Dice < 0.90 | flagged (recall) | false flags | "
             "Spearman |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        block = read_card(name).get("qc") or {}
        for mode, groups in (block.get("validation") or {}).items():
            threshold = block["modes"][mode]["threshold"]
            for group, measured in groups.items():
                if group in ("own", "own+perturbed") or " / " in group:  # per failure source: in the card
                    continue
                qc = measured["qc"]
                recall = f"{qc['flagged_below']} ({qc['recall']:.2f})" if qc["recall"] is not None else "-"
                rho = f"{qc['spearman']:.2f}" if qc.get("spearman") is not None else "-"
                lines.append(f"| {name} | {mode} (threshold {threshold:.3f}) | {group} | {qc['images']} | "
                             f"{qc['below']} | {recall} | {qc['false_flag_rate']:.1%} | {rho} |")
    return "\n".join(lines)


def dataset_table(names: list[str], validations: list[dict] | None = None) -> str:
    """What users get, per data set and mode: each shipped model that trained on the set judged by its own card,
    on the real images of the measure half (and, where a card has them, its recipe's cross-validated fold models
    on the images they never saw), recall and false flags pooled over the models (counts from the cards'
    `validation` blocks), and each model's Spearman. `validations` ({name: validation block} each, default the
    cards' own) adds up the counts of several measurements: both directions of `--swap-halves`."""
    from lungseg.models import read_card

    lines = ["| data set | mode | models (own card each) | images | Dice < 0.90 | flagged (recall) | false flags | "
             "Spearman per model |", "|---|---|---|---|---|---|---|---|"]
    cards = {name: read_card(name) for name in names}
    if validations is None:
        validations = [{name: (card.get("qc") or {}).get("validation") or {} for name, card in cards.items()}]
    for dataset, group in ((d, d + suffix) for d in DATASETS for suffix in ("", " (cross-validated)")):
        for mode in MODES:
            measured = [(name, validation[name][mode][group]["qc"]) for validation in validations
                        for name, card in cards.items()
                        if trained_on(card, dataset) and group in validation.get(name, {}).get(mode, {})]
            if not measured:
                continue
            total = {k: sum(qc[k] for _, qc in measured)
                     for k in ("images", "below", "flagged_below", "at_or_above", "flagged_at_or_above")}
            recall = f"{total['flagged_below']} ({total['flagged_below'] / total['below']:.2f})" \
                if total["below"] else "-"
            rhos = [qc["spearman"] for _, qc in measured if qc.get("spearman") is not None]
            low, high = (f"{min(rhos):.2f}", f"{max(rhos):.2f}") if rhos else ("-", "-")
            rho = low if low == high else f"{low}–{high}"
            models = ", ".join(dict.fromkeys(name for name, _ in measured))
            lines.append(f"| {group} | {mode} | {models} | {total['images']} | {total['below']} | "
                         f"{recall} | {total['flagged_at_or_above'] / max(total['at_or_above'], 1):.1%} | {rho} |")
    return "\n".join(lines)


def both_directions_table(names: list[str]) -> str:
    """The per-data-set table over both directions of the two-fold cross-fitting: the cards' own measurements on
    the measure half plus their `swapped` ones (fitted on the measure half, measured on the fit half), so that
    every image is held out once."""
    from lungseg.models import read_card

    qc = {name: read_card(name).get("qc") or {} for name in names}
    return dataset_table(names, [{name: block.get("validation") or {} for name, block in qc.items()},
                                 {name: (block.get("swapped") or {}).get("validation") or {}
                                  for name, block in qc.items()}])


def build_parser() -> argparse.ArgumentParser:
    from lungseg.quality import FEATURE_SETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="shipped model(s) to fit (default: every shipped model)")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--sources-dir", default=str(REPO.parent / "runs" / "quality-sources" / "models"),
                        help="failure-source models (cards and safetensors), see --add-source")
    parser.add_argument("--cache", default=str(REPO.parent / "runs" / "quality-cache"))
    parser.add_argument("--modes", nargs="+", default=["default", "uncertainty"], choices=MODES)
    parser.add_argument("--max-images", type=int, default=1000, help="per model and data set, default mode")
    parser.add_argument("--max-images-uncertainty", type=int, default=120,
                        help="per model and data set, uncertainty mode (9-16 forward passes per image)")
    parser.add_argument("--max-images-failure", type=int, default=400, help="per failure source and data set")
    parser.add_argument("--source-limit", action="append", default=["unetpp=150"], metavar="NAME=N",
                        help="fewer images for a slow model (default: unetpp=150, 16x the U-Net's forward cost)")
    parser.add_argument("--perturbations", action="append", default=["jsrt=6", "covid-qu-ex=1", "v7-full=4"],
                        metavar="SET=K", help="perturbed copies of each image of a data set, own model only")
    parser.add_argument("--cv-run", action="append", default=[], metavar="NAME=RUN",
                        help="the cross-validation run (scripts/cross_validate.py -o RUN) of model NAME's recipe: "
                             "its fold models on their held-out images join the fit and are measured apart")
    parser.add_argument("--no-peers", action="store_true", help="fit on the card's own model alone")
    parser.add_argument("--fit-failure-sources", action="store_true", help="also fit on the failure sources")
    parser.add_argument("--no-failure-sources", action="store_true", help="do not measure the failure sources")
    parser.add_argument("--l2", default="auto", help="ridge penalty of the regression; auto (default): chosen "
                        f"from {', '.join(map(str, L2_GRID))} by cross-validation within the fit half")
    parser.add_argument("--features", default="auto",
                        choices=("auto", *FEATURE_SETS, *(f + NO_SPREAD for f in FEATURE_SETS)),
                        help="feature set of the regression (lungseg.quality.FEATURE_SETS; in the uncertainty mode "
                        f"with the samples' spread unless it ends in '{NO_SPREAD}'); auto (default): chosen with the "
                        "penalty by cross-validation within the fit half")
    parser.add_argument("--perturbed-weight", type=float, default=0.3,
                        help="weight of a perturbed image in the regression (a real one weighs 1)")
    parser.add_argument("--max-false-flags", type=float, default=0.10,
                        help="the highest false-flag rate on real images (rules included) allowed on the fit half")
    parser.add_argument("--dice-limit", type=float, default=0.90)
    parser.add_argument("--write", action="store_true", help="write the qc block into each card")
    parser.add_argument("--report", help="also write the full report (JSON) here")
    parser.add_argument("--add-source", nargs=2, metavar=("RUN_DIR", "NAME"),
                        help="only turn RUN_DIR/last.pt into a failure-source model NAME in --sources-dir")
    parser.add_argument("--dump-rows", help="also save every scored row (features, rules, Dice) to this pickle, "
                        "for studying the method offline")
    parser.add_argument("--table", action="store_true", help="only print the README's QC table from the cards")
    parser.add_argument("--swap-halves", action="store_true",
                        help="fit on the measure half and measure on the fit half; --write then writes only the "
                        "card's qc.swapped, for the both-directions table of --table")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def main() -> int:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)

    from lungseg.files import write_atomic_text
    from lungseg.models import PACKAGE_MODELS, read_card

    sources_dir = Path(args.sources_dir)
    if args.table:
        names = args.model or sorted(p.stem for p in PACKAGE_MODELS.glob("*.json"))
        print(markdown_table(names) + "\n\n" + dataset_table(names) + "\n\n" + both_directions_table(names))
        return 0
    if args.add_source:
        print(add_source(Path(args.add_source[0]), args.add_source[1], sources_dir))
        return 0
    root, cache = Path(args.data_root), Path(args.cache)
    shipped = sorted(p.stem for p in PACKAGE_MODELS.glob("*.json") if p.with_suffix(".safetensors").exists())
    extra = sorted(str(p) for p in sources_dir.glob("*.json") if p.with_suffix(".safetensors").exists()) \
        if sources_dir.is_dir() else []
    limits = {"default": args.max_images, "uncertainty": args.max_images_uncertainty,
              "failure": args.max_images_failure}
    source_limits = {k: int(v) for k, v in (item.split("=") for item in args.source_limit)}
    variants = {k: int(v) for k, v in (item.split("=") for item in args.perturbations)}
    cv_runs = {k: Path(v) for k, v in (item.split("=", 1) for item in args.cv_run)}
    report = {}
    for name in args.model or shipped:
        card = read_card(name)
        definition = card["definition"]
        peers = [] if args.no_peers else [read_card(s)["card_path"] for s in shipped
                                          if s != name and read_card(s).get("definition") == definition]
        failures = [] if args.no_failure_sources else \
            [read_card(s)["card_path"] for s in shipped if read_card(s).get("definition") != definition] + extra
        block = {"method": "fractional logistic regression (quasi-binomial GLM, IRLS; feature set and L2 chosen by "
                           "cross-validation within the fit half) of the both-lung Dice on features of the model's "
                           "own output (lungseg/quality.py); flag below the threshold",
                 "target": "both-lung Dice against masks of the card's lung definition",
                 "dice_limit": args.dice_limit, "fitted": date.today().isoformat(),
                 "script": f"scripts/fit_quality.py --model {name} --write", "modes": {}, "validation": {}}
        for mode in args.modes:
            print(f"fit_quality: {name}, {mode} mode", file=sys.stderr)
            pool = pool_for(card, peers, failures, root, mode, limits, source_limits,
                            variants, cache, cv_fold_cards(cv_runs[name]) if name in cv_runs else [])
            if args.swap_halves:
                pool = swap_halves(pool)
            if args.dump_rows:
                import pickle

                Path(args.dump_rows).write_bytes(pickle.dumps({"card": name, "mode": mode, "rows": pool}))
            fit_rows = [r for r in pool if r["half"] == "fit" and (r["role"] != "failure" or args.fit_failure_sources)]
            if not any(r["dice"] < args.dice_limit for r in fit_rows):
                print(f"fit_quality: {name}: no segmentation below Dice {args.dice_limit} to fit on", file=sys.stderr)
                return 1
            feature_set, l2, cv_scores = choose_regression(
                fit_rows, mode, definition, args.dice_limit, args.perturbed_weight, is_ensemble(card),
                None if args.features == "auto" else [args.features],
                L2_GRID if args.l2 == "auto" else (float(args.l2),))
            model = fit_mode(fit_rows, mode, definition, l2, args.max_false_flags, args.dice_limit,
                             args.perturbed_weight, is_ensemble(card), feature_set)
            budget, rules_alone = false_flag_budget(fit_rows, definition, args.max_false_flags, args.dice_limit)
            block["modes"][mode] = {**model.to_dict(), "fitted_on": {
                "command": shlex.join(["scripts/fit_quality.py", *sys.argv[1:]]),  # the options of this fit
                "feature_set": feature_set, "l2": l2,
                "cross_validated_spearman": {k: {str(l2): v for l2, v in row.items()} for k, row in cv_scores.items()},
                "images": len(fit_rows), "below_limit": int(sum(r["dice"] < args.dice_limit for r in fit_rows)),
                "perturbed": int(sum(bool(r["perturbation"]) for r in fit_rows)),
                "perturbed_weight": args.perturbed_weight, "max_false_flags_fit": args.max_false_flags,
                "false_flag_budget": {k: round(v, 4) for k, v in budget.items()},
                "rules_alone_false_flags": {k: round(v, 4) for k, v in rules_alone.items()},
                "models": sorted({r["source"] for r in fit_rows}),
                "datasets": sorted({r["dataset"] for r in fit_rows}),
                "half": "measure" if args.swap_halves else "fit", "date": date.today().isoformat()}}
            block["validation"][mode] = group_measures(model, pool, definition, args.dice_limit)
            print(f"  threshold {model.threshold:.4f}\n" + summary_line(name, block["validation"][mode]),
                  file=sys.stderr)
        block["threshold"] = block["modes"]["default"]["threshold"] if "default" in block["modes"] else None
        report[name] = block
        if args.write:
            path = Path(card["card_path"])
            data = json.loads(path.read_text())
            if args.swap_halves:  # only the other direction's measurements, never the regression users get
                swapped = {"modes": {mode: {**{k: fit["fitted_on"][k] for k in ("command", "feature_set", "l2")},
                                            "threshold": fit["threshold"]} for mode, fit in block["modes"].items()},
                           "validation": block["validation"]}
                data["qc"]["swapped"] = merged_modes(data["qc"].get("swapped"), swapped)
            else:
                data["qc"] = merged_qc(data.get("qc"), block)  # only this block changes, never the weights
            write_atomic_text(json.dumps(data, indent=2) + "\n", path)
            print(f"fit_quality: wrote the qc block of {path}", file=sys.stderr)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
