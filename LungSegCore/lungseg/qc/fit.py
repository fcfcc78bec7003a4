"""Fitting a model's predicted quality (`model.py`) on labelled images, and measuring it on others.

`lungseg fit-qc` fits a model's card on a labelled data set (`fit_card_qc`): a model you trained, or a shipped one
on your own cohort. `scripts/fit_quality.py` fits the shipped cards on ../shared/data with more sources (peer
models, failure sources, cross-validation folds) and a cache. Both go through the same steps:

1. segment the labelled images the model never trained on, and degraded copies of them (`perturb.py`: an opacity
   or occluder over a lung, rotation, zoom-out, crop, gamma, noise, blur, the reference moved alike), which give
   the failures that good validation images lack (`pool.py`: the cases and their scored rows);
2. split them in two halves by a hash of the image (of the patient where `splits.csv` names one);
3. on the `fit` half, keep or turn off the fragments rule (`keeps_fragments_rule`), choose the feature set and
   ridge penalty by cross-validation (`choose_regression`), fit the regression and choose the threshold
   (`fit_mode`: the highest recall of Dice < 0.90 whose false-flag rate on real images, rules included, stays
   within the budget), all in `selection.py`;
4. measure it on the `measure` half (`group_measures`): every number a card's `validation` holds is from images
   the fit never saw.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import date
from pathlib import Path

from ..errors import LungSegError
from ..io.labelled import list_cases
from .features import EDGE_FEATURE, PRIOR_FEATURE
from .pool import cases_for, is_ensemble, iter_outputs, read_groups, scored_row, usable_cases
from .selection import (
    L2_GRID,
    MIN_SUBSET,
    WITH_EDGES,
    WITH_PRIOR,
    choose_regression,
    false_flag_budget,
    fit_mode,
    group_measures,
    keeps_fragments_rule,
    reference_shape_prior,
    with_prior_feature,
    without_fragments_rule,
)
from .stats import DICE_LIMIT, qc_accuracy_text

MODES = ("default", "uncertainty")
METHOD = (
    "fractional logistic regression (quasi-binomial GLM, IRLS; feature set and L2 chosen by cross-validation "
    "within the fit half) of the both-lung Dice on features of the model's own output (lungseg/quality.py); "
    "flag below the threshold"
)  # as every fitted card holds it: a refit keeps the same words


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
        kept = {
            part: {m: v for m, v in swapped[part].items() if m not in new["modes"]} for part in ("modes", "validation")
        }
        if kept["modes"]:
            merged["swapped"] = kept
    return merged


# -- one card's fit ---------------------------------------------------------------------------------------------


def empty_qc_block(dice_limit: float, script: str) -> dict:
    """A card's `qc` block before its modes are fitted (`fit_qc_mode` fills `modes` and `validation`)."""
    return {
        "method": METHOD,
        "target": "both-lung Dice against masks of the card's lung definition",
        "dice_limit": dice_limit,
        "fitted": date.today().isoformat(),
        "script": script,
        "modes": {},
        "validation": {},
        "threshold": None,
    }


# size: the fit of one mode as one procedure, step by step (features, subset search, rules, accuracy)
def fit_qc_mode(
    pool: list[dict],
    mode: str,
    definition: str,
    *,
    ensemble: bool = False,
    dice_limit: float = DICE_LIMIT,
    perturbed_weight: float = 0.3,
    max_false_flags: float = 0.10,
    feature_sets=None,
    l2_grid=L2_GRID,
    fit_failure_sources: bool = False,
    command: str = "",
    half: str = "fit",
) -> tuple[dict, dict]:
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
        raise LungSegError(
            f"no segmentation below Dice {dice_limit} among the {len(fit_rows)} results of the fit "
            "half, so there is nothing to learn what a failure looks like from: add degraded "
            "copies (--perturbations) or more images"
        )
    fragments_rule, fragments_rate = keeps_fragments_rule(fit_rows, definition, max_false_flags, dice_limit)
    if not fragments_rule:  # fitted and measured as users will get it: without that rule
        pool = without_fragments_rule(pool, definition)
        fit_rows = fit_half(pool)
    prior = reference_shape_prior(fit_rows, MIN_SUBSET)
    if prior is not None:
        pool = with_prior_feature(pool, prior)
        fit_rows = fit_half(pool)
    elif any(WITH_PRIOR in s for s in feature_sets or ()):
        raise LungSegError(
            f"a feature set{WITH_PRIOR} needs the reference masks of at least {MIN_SUBSET} real "
            "images in the fit half, to fit the shape model on; this fit half has fewer"
        )
    if any(WITH_EDGES in s for s in feature_sets or ()) and not all(EDGE_FEATURE in r["features"] for r in pool):
        raise LungSegError(
            f"a feature set{WITH_EDGES} needs {EDGE_FEATURE} in every row: rows scored from the "
            "network's input (`scored_row`)"
        )
    feature_set, l2, cv_scores = choose_regression(
        fit_rows, mode, definition, dice_limit, perturbed_weight, ensemble, feature_sets, l2_grid
    )
    model = fit_mode(
        fit_rows, mode, definition, l2, max_false_flags, dice_limit, perturbed_weight, ensemble, feature_set
    )
    model = dataclasses.replace(
        model, fragments_rule=fragments_rule, shape_prior=prior if PRIOR_FEATURE in model.features else None
    )
    budget, rules_alone = false_flag_budget(fit_rows, definition, max_false_flags, dice_limit)
    block = {
        **model.to_dict(),
        "fitted_on": {
            "command": command,
            "feature_set": feature_set,
            "l2": l2,
            "fragments_rule_false_flags": round(fragments_rate, 4),
            "shape_prior_references": prior["images"] if prior else 0,
            "cross_validated_spearman": {k: {str(l2): v for l2, v in row.items()} for k, row in cv_scores.items()},
            "images": len(fit_rows),
            "below_limit": below,
            "perturbed": int(sum(bool(r["perturbation"]) for r in fit_rows)),
            "perturbed_weight": perturbed_weight,
            "max_false_flags_fit": max_false_flags,
            "false_flag_budget": {k: round(v, 4) for k, v in budget.items()},
            "rules_alone_false_flags": {k: round(v, 4) for k, v in rules_alone.items()},
            "models": sorted({r["source"] for r in fit_rows}),
            "datasets": sorted({r["dataset"] for r in fit_rows}),
            "half": half,
            "date": date.today().isoformat(),
        },
    }
    return block, group_measures(model, pool, definition, dice_limit)


DEFAULT_PERTURBATIONS = 4  # degraded copies of each image: the failures a good model's own images lack


# size: a keyword-only signature of the fit's options and their checks before the long segmentation
def fit_card_qc(
    model: str,
    data: str | Path,
    *,
    split: str | None = None,
    perturbations: int = DEFAULT_PERTURBATIONS,
    uncertainty: bool = False,
    device: str = "auto",
    write: bool = False,
    overwrite: bool = False,
    max_false_flags: float = 0.10,
    batch_size: int = 4,
    command: str = "lungseg fit-qc",
) -> tuple[dict, list[str]]:
    """Fit a model's QC on a labelled data set and measure it on the half it was not fitted on (`lungseg fit-qc`).

    Args:
        model: a model name or card path (`models.read_card`).
        data: a data set folder as training reads it (`images/`, `masks/`, optionally `masks_right/`,
            `masks_left/`, `masks_ignore/` and `splits.csv` with a `patient` column to keep a patient's images in
            one half). Images of the splits the model trained on (its card's data entries for a set of this
            folder's name) are left out.
        split: only the images of this split of `splits.csv` (still never those the model trained on).
        perturbations: degraded copies of each image (`perturb.perturb`).
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
    from ..inference.segmenter import Segmenter

    data = Path(data)
    segmenter = Segmenter(model, device)
    card = segmenter.card
    modes = ["default", "uncertainty"] if uncertainty else ["default"]
    check_fit_options(card, modes, write, overwrite, perturbations, max_false_flags)
    cases, problems = usable_cases(unseen_cases(card, data, split))
    for problem in problems:
        print(f"lungseg: error: {problem}", file=sys.stderr)
    if not cases:
        raise LungSegError(f"{data}: none of its labelled images can be used (above)")
    items = [(case, variant) for case in cases for variant in range(perturbations + 1)]
    groups = read_groups(data)
    block = empty_qc_block(DICE_LIMIT, command)
    for mode in modes:
        pool = own_pool(segmenter, items, mode, data.name, groups, batch_size)
        block["modes"][mode], block["validation"][mode] = fit_qc_mode(
            pool,
            mode,
            segmenter.definition,
            ensemble=is_ensemble(card),
            max_false_flags=max_false_flags,
            command=command,
        )
    block["threshold"] = block["modes"]["default"]["threshold"]
    if write:
        write_card_qc(card, block)
    return block, problems


def check_fit_options(
    card: dict, modes: list[str], write: bool, overwrite: bool, perturbations: int, max_false_flags: float
) -> None:
    """`fit_card_qc`'s options, checked before minutes of segmenting, not after."""
    fitted = sorted(set(modes) & set((card.get("qc") or {}).get("modes") or {}))
    if write and fitted and not overwrite:
        raise LungSegError(
            f"{card['card_path']}: the card already has a fitted QC for the {' and '.join(fitted)} "
            f"mode ({(card['qc'] or {}).get('fitted', 'date unknown')}); --overwrite replaces it"
        )
    if perturbations < 0:
        raise LungSegError(f"--perturbations {perturbations}: give 0 or more degraded copies per image")
    if not 0 <= max_false_flags < 1:
        raise LungSegError(f"--max-false-flags {max_false_flags}: give a share of the good results, from 0 to below 1")


def unseen_cases(card: dict, data: Path, split: str | None) -> list:
    """The labelled cases of the folder `data` that the model never trained on, of `split` where one is given; an
    error that says why where there are none."""
    unseen = cases_for(card, data.name, data.parent)
    cases = [case for case in unseen if split is None or case.split == split]
    if not cases:
        known = sorted({case.split for case in list_cases(data)} - {""})
        if split and split not in known:
            raise LungSegError(
                f"{data}: no labelled image is in split '{split}' (splits.csv names {', '.join(known) or 'none'})"
            )
        raise LungSegError(
            f"{data}: every labelled image"
            + (f" of split '{split}'" if split else "")
            + f" is in a split that model '{card['name']}' trained on"
        )
    return cases


def own_pool(segmenter, items: list, mode: str, dataset: str, groups: dict[str, str], batch_size: int) -> list[dict]:
    """The scored rows of the model's own outputs on `items`, made row by row: the model's maps of thousands of
    images need not stay in memory."""
    from tqdm import tqdm

    outputs = tqdm(
        iter_outputs(segmenter, items, mode, batch_size),
        total=len(items),
        desc=f"segmenting ({mode} mode)",
        unit="image",
    )
    return [
        {
            **scored_row(case, variant, maps, dataset, groups, seen),
            "dataset": dataset,
            "source": segmenter.card["name"],
            "role": "own",
            "in_domain": True,
        }
        for (case, variant), maps, seen in outputs
    ]


def write_card_qc(card: dict, block: dict) -> None:
    """The card's file with `block` merged into its qc block (`merged_qc`); nothing else in it changes."""
    from ..io.files import write_atomic_text

    path = Path(card["card_path"])
    stored = json.loads(path.read_text())
    stored["qc"] = merged_qc(stored.get("qc"), block)
    write_atomic_text(json.dumps(stored, indent=2) + "\n", path)


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
        lines.append(
            f"{mode} mode: features '{fitted['feature_set']}' (chosen by cross-validation within the fit "
            "half; "
            + ("the image's edges were a candidate; " if edges else "")
            + (
                f"the shape prior from {references} reference masks was a candidate)"
                if references
                else "too few reference masks in the fit half for a shape prior)"
            )
        )
        if not block["modes"][mode].get("fragments_rule", True):
            rate = fitted["fragments_rule_false_flags"]
            lines.append(
                f"{mode} mode: the fragments rule is off, for it alone flagged {rate:.1%} of the model's "
                "good results in the fit half; the clean-up's change still counts in the quality"
            )
        for group, measured in groups.items():
            if group in ("own", "own+perturbed") or " (shipped models)" in group:
                continue  # the same images as the data set's own group here
            lines.append(
                f"{mode} mode, threshold {threshold:.3f}, held-out {group} ({measured['qc']['images']} "
                f"results): {qc_accuracy_text(measured['qc'])}"
            )
    return lines
