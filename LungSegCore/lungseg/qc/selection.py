"""Choosing a card's QC on the fit half: the regression's feature set and ridge penalty (by cross-validation),
the fragments rule kept or turned off, the threshold within the false-flag budgets; and measuring the result on
the measure half, by group.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .features import (
    EDGE_FEATURE,
    FEATURE_SETS,
    MEMBER_FEATURES,
    PRIOR_FEATURE,
    TWO_SIDED,
    UNCERTAINTY_FEATURES,
    fit_shape_prior,
    shape_prior_distances,
)
from .model import QualityModel, transform
from .rules import FRAGMENTS
from .stats import fit_regression, qc_accuracy

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
    return (
        FEATURE_SETS[base.removesuffix(WITH_PRIOR)]
        + ((PRIOR_FEATURE,) if prior else ())
        + ((EDGE_FEATURE,) if edges else ())
        + (UNCERTAINTY_FEATURES if spread else ())
        + (MEMBER_FEATURES if ensemble else ())
    )


def candidate_sets(mode: str, with_prior: bool, with_edges: bool = False) -> list[str]:
    """What `choose_regression` tries: every FEATURE_SETS set, each also with the shape prior where the rows have
    it, each of those also with the image's edges where the rows have them, and in the uncertainty mode each of
    those also without the samples' spread (it has to earn its place)."""
    sets = [*FEATURE_SETS, *((s + WITH_PRIOR for s in FEATURE_SETS) if with_prior else ())]
    sets += [s + WITH_EDGES for s in sets] if with_edges else []
    return [*sets, *((s + NO_SPREAD for s in sets) if mode == "uncertainty" else ())]


def reference_shape_prior(rows: list[dict], minimum: int) -> dict | None:
    """The shape model (`features.fit_shape_prior`) of the references of the real images among `rows` (the fit
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


def false_flag_budget(
    rows: list[dict], definition: str, max_false_flags: float, limit: float
) -> tuple[dict[str, float], dict[str, float]]:
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
    (rules.FRAGMENTS) flags, and how many such results there are."""
    good = [
        r
        for r in rows
        if r.get("role", "own") == "own" and r.get("in_domain", True) and not r["perturbation"] and r["dice"] >= limit
    ]
    flagged = sum(any(FRAGMENTS in reason for reason in r["rules"][definition]) for r in good)
    return flagged / max(len(good), 1), len(good)


def keeps_fragments_rule(rows: list[dict], definition: str, max_false_flags: float, limit: float) -> tuple[bool, float]:
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
    return [
        {**r, "rules": {**r["rules"], definition: [x for x in r["rules"][definition] if FRAGMENTS not in x]}}
        for r in rows
    ]


def choose_threshold(
    rows: list[dict], quality: np.ndarray, definition: str, max_false_flags: float, limit: float
) -> float:
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


def fit_mode(
    fit_rows: list[dict],
    mode: str,
    definition: str,
    l2: float,
    max_false_flags: float,
    limit: float,
    perturbed_weight: float,
    ensemble: bool = False,
    feature_set: str = "output+shape",
):
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


def choose_regression(
    fit_rows: list[dict],
    mode: str,
    definition: str,
    limit: float,
    perturbed_weight: float,
    ensemble: bool,
    feature_sets=None,
    l2_grid=L2_GRID,
    folds: int = 5,
) -> tuple[str, float, dict[str, dict[float, float]]]:
    """The feature set (features.FEATURE_SETS) and ridge penalty whose predicted quality ranks the real images of
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
        feature_sets = candidate_sets(
            mode,
            all(PRIOR_FEATURE in r["features"] for r in fit_rows),
            all(EDGE_FEATURE in r["features"] for r in fit_rows),
        )
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
            per_set = [
                spearmanr(quality[dataset == d], dice[dataset == d])[0]
                for d in sorted(set(dataset))
                if (dataset == d).sum() >= MIN_SUBSET
            ]
            score = np.mean(per_set) if per_set else spearmanr(quality, dice)[0]
            scores.setdefault(feature_set, {})[l2] = round(float(score), 4)
    candidates = [(s, l2) for s in feature_sets for l2 in l2_grid]
    best = max(candidates, key=lambda c: (scores[c[0]][c[1]], -len(feature_names(mode, ensemble, c[0])), -c[1]))
    return best[0], best[1], scores


def measure(model, rows: list[dict], definition: str, limit: float) -> dict:
    """QC accuracy on rows: with the rules (what users get), the quality alone, and the rules alone."""
    dice = np.array([r["dice"] for r in rows])
    quality = np.array([model.predict(r["features"]) for r in rows])
    return {
        "qc": qc_accuracy(dice, flags(rows, quality, model.threshold, definition), quality, limit),
        "quality_only": qc_accuracy(dice, quality < model.threshold, None, limit),
        "rules_only": qc_accuracy(dice, flags(rows, quality, -1.0, definition), None, limit),
    }


def group_measures(model, pool: list[dict], definition: str, limit: float) -> dict:
    """The measure half, by group: `<set>` the card's own model on real images, `<set> (perturbed)` on degraded
    ones, `<set> (cross-validated)` its recipe's fold models on their held-out folds, `<set> / <model>` another
    model's outputs (peers and failure sources), `<set> (shipped models)` the
    real images segmented by every shipped model of the definition, `own` and `own+perturbed` the card's own
    model over every data set."""
    held_out = [r for r in pool if r["half"] == "measure"]
    groups = {
        "own": [r for r in held_out if r["role"] == "own" and not r["perturbation"]],
        "own+perturbed": [r for r in held_out if r["role"] == "own"],
    }
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
