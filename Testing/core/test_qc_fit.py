"""Fitting a card's QC (`lungseg.qc.fit`, `scripts/fit_quality.py`): the fragments rule, peers out of their domain,
merging the card's qc block, both directions of the halves, the per-data-set table, the shipped cards' fitted
blocks, and the fit's true Dice."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_script
from helpers import SHIPPED, synthetic_rows

from lungseg.errors import LungSegError
from lungseg.evaluation.metrics import both_lung_dice, image_metrics
from lungseg.models.cards import PACKAGE_MODELS, read_card, sha256_of
from lungseg.qc import selection
from lungseg.qc.features import PRIOR_FEATURE
from lungseg.qc.fit import fit_qc_mode, fit_summary, merged_qc
from lungseg.qc.model import quality_model


def fragmented_pool(share: float, in_domain: bool = True, n: int = 160) -> list[dict]:
    """Own real results in two halves, with failures to learn from, and the fragments rule firing on `share` of
    the good ones (as after 64 steps of training: 16 of 33 good held-out JSRT results)."""
    rows = synthetic_rows("expected_dice", n=n)
    good = [i for i, r in enumerate(rows) if r["dice"] >= 0.90]
    fragmented = set(good[: round(share * len(good))])
    return [
        dict(
            r,
            half="fit" if i % 2 else "measure",
            role="own",
            source="weak",
            dataset="jsrt",
            in_domain=in_domain,
            rules={"lung-fields": ["3 large lung components before clean-up (expected 2)"] if i in fragmented else []},
        )
        for i, r in enumerate(rows)
    ]


def test_a_fragments_rule_that_flags_the_models_good_results_is_turned_off_by_its_fit():
    """A weakly trained model leaves stray fragments that the clean-up removes from good results: the rule that
    flags them flagged 16 of 33 good held-out JSRT results of a U-Net after 64 steps, and raised the threshold's
    budget with it. The fit turns the rule off where it alone flags more than the false-flag limit of the model's
    own good results in its domain, and fits and measures without it; the card records the choice."""
    block, validation = fit_qc_mode(fragmented_pool(0.3), "default", "lung-fields")
    assert block["fragments_rule"] is False and block["fitted_on"]["fragments_rule_false_flags"] > 0.2
    assert block["fitted_on"]["rules_alone_false_flags"]["own"] == 0.0, "the budget no longer rises with it"
    assert validation["jsrt"]["qc"]["false_flag_rate"] <= 0.15, "measured as users get it: without the rule"
    assert validation["jsrt"]["rules_only"]["flagged_at_or_above"] == 0
    assert quality_model({"qc": {"modes": {"default": block}}})[0].fragments_rule is False
    summary = fit_summary({"modes": {"default": block}, "validation": {"default": validation}})
    assert summary[0].startswith(f"default mode: features '{block['fitted_on']['feature_set']}'")
    assert summary[1].startswith("default mode: the fragments rule is off, for it alone flagged 2")
    from lungseg.cli import _qc_status  # what `lungseg models` prints

    assert _qc_status(
        {"qc": {"modes": {"default": block}, "threshold": block["threshold"], "fitted": "today"}}
    ).endswith("; fragments rule off in the default mode")
    kept, measured = fit_qc_mode(fragmented_pool(0.05), "default", "lung-fields")
    assert kept["fragments_rule"] is True and measured["jsrt"]["rules_only"]["flagged_at_or_above"] > 0
    # out of its domain (`unet-512` on COVID-era films) fragments are a warning worth keeping
    assert fit_qc_mode(fragmented_pool(0.3, in_domain=False), "default", "lung-fields")[0]["fragments_rule"] is True
    few = [r for r in fragmented_pool(0.3) if r["dice"] < 0.90 or r["group"] < "p3"]  # too few good results
    assert selection.fragments_false_flags([r for r in few if r["half"] == "fit"], "lung-fields", 0.90)[1] < 20
    assert fit_qc_mode(few, "default", "lung-fields")[0]["fragments_rule"] is True


def test_a_peer_out_of_its_domain_is_a_failure_source_there_and_not_fitted_on():
    """`unet-512` never trained on COVID-QU-Ex: as a peer of `unet` its COVID-era results (a third below Dice 0.90,
    a third of its good ones fragmented) would train `unet`'s regression and spend its false-flag budget (measured:
    `unet`'s threshold fell to 0.80 and flagged none of its own 7 failures). There it is a failure source; on JSRT,
    which it trained on, it stays a peer. Every other lung-field model trained on both sets."""
    fit_quality = load_script("fit_quality")
    wide = read_card("unet-512")
    assert fit_quality.role_on("peer", wide, "covid-qu-ex") == "failure"
    assert fit_quality.role_on("peer", wide, "jsrt") == "peer"
    assert fit_quality.role_on("own", wide, "covid-qu-ex") == "own", "the card's own model is always its own"
    for name in ("unet", "prob_unet", "unetpp"):
        assert {fit_quality.role_on("peer", read_card(name), s) for s in ("jsrt", "covid-qu-ex")} == {"peer"}, name


def test_refitting_one_mode_keeps_the_cards_other_mode():
    """`fit_quality.py --modes default --write` rewrites the default mode's regression, threshold and measures and
    keeps the card's uncertainty mode as it was fitted; the block's threshold is the default mode's."""
    old = read_card("unet")["qc"]
    assert set(old["modes"]) == set(old["validation"]) == {"default", "uncertainty"}
    new = {
        **old,
        "modes": {"default": {**old["modes"]["default"], "threshold": 0.9}},
        "validation": {"default": {"jsrt": {}}},
        "threshold": 0.9,
    }
    merged = merged_qc(old, new)
    assert list(merged["modes"]) == list(merged["validation"]) == ["default", "uncertainty"]
    assert merged["modes"]["uncertainty"] == old["modes"]["uncertainty"]
    assert merged["validation"] == {"default": {"jsrt": {}}, "uncertainty": old["validation"]["uncertainty"]}
    assert merged["threshold"] == merged["modes"]["default"]["threshold"] == 0.9
    assert merged_qc(None, new)["modes"].keys() == {"default"}


def test_swapping_the_halves_fits_on_the_measure_half_and_a_refit_drops_that_measurement():
    """`--swap-halves` is the second direction of a two-fold cross-fitting: every row changes half, so the fit reads
    what the card was measured on and the measurement reads what it was fitted on. It is kept in the card's
    `qc.swapped` beside the regression users get, and a mode refit later drops its stale swapped measurement."""
    fit_quality = load_script("fit_quality")
    rows = [{"half": "fit", "name": "a"}, {"half": "measure", "name": "b"}]
    assert [r["half"] for r in fit_quality.swap_halves(rows)] == ["measure", "fit"]
    assert fit_quality.swap_halves(fit_quality.swap_halves(rows)) == rows
    old = read_card("unet")["qc"]
    assert set(old["swapped"]["modes"]) == set(old["swapped"]["validation"]) == set(old["modes"])
    new = {**old, "modes": {"default": old["modes"]["default"]}, "validation": {"default": {}}}
    merged = merged_qc(old, new)
    assert list(merged["swapped"]["modes"]) == list(merged["swapped"]["validation"]) == ["uncertainty"]
    both = {**old, "validation": {mode: {} for mode in old["modes"]}}
    assert "swapped" not in merged_qc(old, both), "every mode refit: no swapped measurement is left"


def test_the_per_data_set_table_adds_up_the_counts_of_both_directions():
    """`--table`'s both-directions table: the counts add up per data set (every image held out once), so the rates
    are those of the summed counts and the models are named once; a model's Spearman counts only where it was
    measured on at least MIN_SUBSET images."""
    from lungseg.qc import tables

    own = {name: read_card(name)["qc"]["validation"] for name in SHIPPED}
    once = [row.split(" | ") for row in tables.dataset_table(SHIPPED, [own]).splitlines()[2:]]
    twice = [row.split(" | ") for row in tables.dataset_table(SHIPPED, [own, own]).splitlines()[2:]]
    assert tables.dataset_table(SHIPPED, [own]) == tables.dataset_table(SHIPPED)
    assert len(once) == len(twice) > 0
    for a, b in zip(once, twice):
        assert b[:3] == a[:3] and b[6:] == a[6:], "the same models, rates and Spearman range"
        assert (int(b[3]), int(b[4])) == (2 * int(a[3]), 2 * int(a[4])), "twice the images and the failures"
    few = {
        name: {
            mode: {"jsrt": {"qc": {**groups["jsrt"]["qc"], "images": selection.MIN_SUBSET - 1}}}
            for mode, groups in validation.items()
            if "jsrt" in groups
        }
        for name, validation in own.items()
    }
    assert all(row.endswith("| - |") for row in tables.dataset_table(SHIPPED, [few]).splitlines()[2:]), (
        "no Spearman from fewer images than MIN_SUBSET per model"
    )
    enough = {
        name: {
            mode: {"jsrt": {"qc": {**groups["jsrt"]["qc"], "images": selection.MIN_SUBSET}}}
            for mode, groups in validation.items()
            if "jsrt" in groups
        }
        for name, validation in own.items()
    }
    assert not any(row.endswith("| - |") for row in tables.dataset_table(SHIPPED, [enough]).splitlines()[2:])


def test_the_qc_fit_scores_the_dice_as_evaluate_does(jsrt):
    """The fit's true Dice (`both_lung_dice`, on labels that mark ignored pixels IGNORE) is `lungseg evaluate`'s
    both_dice (`image_metrics` with the ignore mask) to the last bit: shifted, cut short, a lung lost, or empty."""
    from lungseg.definitions import IGNORE
    from lungseg.io.labelled import case_label, list_cases

    for case in list_cases(jsrt, "val")[:4]:
        truth = case_label(case)
        truth[:40, :40] = IGNORE  # as masks_ignore/ marks a device
        plain = np.where(truth == IGNORE, 0, truth)
        base_cut = np.where(np.arange(len(plain))[:, None] < len(plain) * 2 // 3, plain, 0)
        for pred in (plain, np.roll(plain, 9, axis=1), base_cut, np.where(plain == 2, 0, plain), np.zeros_like(plain)):
            expected = image_metrics(pred, truth, None, regions=("both",), ignore=truth == IGNORE)["both_dice"]
            assert both_lung_dice(pred, truth) == expected
    assert both_lung_dice(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)) == 1.0, "both empty"


def fit_options(command: str) -> dict:
    """The options of a fit_quality.py command as its own parser reads them, less those that say where it writes
    and which half it fits on."""
    import shlex

    options = vars(load_script("fit_quality").build_parser().parse_args(shlex.split(command)[1:]))
    return {k: v for k, v in options.items() if k not in ("write", "report", "swap_halves")}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_card_has_a_fitted_qc_block_and_unchanged_weights(name):
    card = read_card(name)
    assert sha256_of(PACKAGE_MODELS / f"{name}.safetensors") == card["sha256"]
    block = card["qc"]
    assert 0.5 < block["threshold"] < 1.0 and block["method"] and block["script"].startswith("scripts/fit_quality.py")
    default = block["modes"]["default"]
    ensemble = card["network"]["name"] == "ensemble"  # its members' spread joins every set

    def read_by(mode: dict, name: str) -> tuple:
        """The features that the mode's chosen set names (`selection.feature_names`); a mode that reads the shape
        prior carries the shape model, fitted on enough references, and only such a mode does."""
        chosen = selection.feature_names(name, ensemble, mode["fitted_on"]["feature_set"])  # chosen by CV
        assert ("shape_prior" in mode) == (PRIOR_FEATURE in chosen), "the shape model exactly where it is read"
        if PRIOR_FEATURE in chosen:
            assert mode["fitted_on"]["shape_prior_references"] >= selection.MIN_SUBSET
            assert mode["shape_prior"]["images"] == mode["fitted_on"]["shape_prior_references"]
        return chosen

    assert tuple(default["features"]) == read_by(default, "default") and default["threshold"] == block["threshold"]
    assert len(default["weights"]) == len(default["features"]) == len(default["mean"]) == len(default["scale"])
    cv = default["fitted_on"]["cross_validated_spearman"]
    assert (
        max(v for row in cv.values() for v in row.values())
        == cv[default["fitted_on"]["feature_set"]][str(default["fitted_on"]["l2"])]
    )
    assert default["fitted_on"]["below_limit"] > 0, "fitted on real failures, not only on good segmentations"
    for mode in block["modes"].values():  # the command that made each mode's fit, to reproduce it
        assert mode["fitted_on"]["command"].startswith(f"scripts/fit_quality.py --model {name} ")
        assert "--swap-halves" not in mode["fitted_on"]["command"] and mode["fitted_on"]["half"] == "fit"
    for mode, swapped in block["swapped"]["modes"].items():  # the same options, the halves exchanged
        assert "--swap-halves" in swapped["command"]
        assert fit_options(swapped["command"]) == fit_options(block["modes"][mode]["fitted_on"]["command"])
    fitted = default["fitted_on"]
    budget, rules_alone = fitted["false_flag_budget"], fitted["rules_alone_false_flags"]  # per subset
    assert set(budget) == set(rules_alone) >= {"all", "own"}
    assert {s.split("/")[1] for s in budget if "/" in s} <= set(fitted["datasets"]), "per data set, by name"
    assert all(budget[s] == max(fitted["max_false_flags_fit"], rules_alone[s]) for s in budget)
    if "uncertainty" in block["modes"]:
        uncertainty = block["modes"]["uncertainty"]  # with the samples' spread, or without when CV said so
        assert tuple(uncertainty["features"]) == read_by(uncertainty, "uncertainty")
        assert len(uncertainty["weights"]) == len(uncertainty["features"])
    measured = block["validation"]["default"]["own+perturbed"]["qc"]  # the held-out half, never fitted on
    assert measured["images"] > 0 and measured["below"] > 0 and measured["spearman"] > 0.5


def test_fit_qc_without_a_failure_to_learn_from_is_a_clear_error():
    rows = [
        dict(r, dice=max(r["dice"], 0.95), half="fit", role="own", source="m", dataset="d", in_domain=True)
        for r in synthetic_rows("expected_dice")
    ]
    with pytest.raises(LungSegError, match=r"no segmentation below Dice 0.9 among the 80 .*--perturbations"):
        fit_qc_mode(rows, "default", "lung-fields")
