"""The QC tables of the README and of the QC record (`LungSegCore/docs/quality-control.md`), built from the cards'
fitted `qc` blocks (`scripts/fit_quality.py --table` prints them), and the one-line summary of a fit.
"""

from __future__ import annotations

from ..models.cards import read_card
from .fit import MODES
from .pool import trained_on
from .selection import MIN_SUBSET
from .stats import qc_accuracy_text

# the lung definition each labelled set's masks follow
DATASETS = {"jsrt": "lung-fields", "covid-qu-ex": "lung-fields", "v7-full": "full-extent"}


def summary_line(name: str, measured: dict) -> str:
    """A fit's measures on the held-out half, one line per group (not per failure source)."""
    parts = [f"{group}: {qc_accuracy_text(measured[group]['qc'])}" for group in measured if " / " not in group]
    return f"  {name}: " + "\n  ".join(parts)


def markdown_table(names: list[str]) -> str:
    """The QC record's per-card table (`LungSegCore/docs/quality-control.md`), from the cards' `validation` blocks
    (the measure half): per card, mode and group."""
    lines = [
        "| model | mode | measured on (held-out half) | images | Dice < 0.90 | flagged (recall) | false flags | "
        "Spearman |",
        "|---|---|---|---|---|---|---|---|",
    ]
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
                lines.append(
                    f"| {name} | {mode} (threshold {threshold:.3f}) | {group} | {qc['images']} | "
                    f"{qc['below']} | {recall} | {qc['false_flag_rate']:.1%} | {rho} |"
                )
    return "\n".join(lines)


def dataset_table(names: list[str], validations: list[dict] | None = None) -> str:
    """What users get, per data set and mode: each shipped model that trained on the set judged by its own card,
    on the real images of the measure half (and, where a card has them, its recipe's cross-validated fold models
    on the images they never saw), recall and false flags pooled over the models (counts from the cards'
    `validation` blocks), and each model's Spearman where it was measured on at least MIN_SUBSET images (a rank
    correlation of 7 images says nothing). `validations` ({name: validation block} each, default the cards' own)
    adds up the counts of several measurements: both directions of `--swap-halves`."""
    lines = [
        "| data set | mode | models (own card each) | images | Dice < 0.90 | flagged (recall) | false flags | "
        "Spearman per model |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cards = {name: read_card(name) for name in names}
    if validations is None:
        validations = [{name: (card.get("qc") or {}).get("validation") or {} for name, card in cards.items()}]
    for dataset, group in ((d, d + suffix) for d in DATASETS for suffix in ("", " (cross-validated)")):
        for mode in MODES:
            measured = [
                (name, validation[name][mode][group]["qc"])
                for validation in validations
                for name, card in cards.items()
                if trained_on(card, dataset) and group in validation.get(name, {}).get(mode, {})
            ]
            if not measured:
                continue
            total = {
                k: sum(qc[k] for _, qc in measured)
                for k in ("images", "below", "flagged_below", "at_or_above", "flagged_at_or_above")
            }
            recall = (
                f"{total['flagged_below']} ({total['flagged_below'] / total['below']:.2f})" if total["below"] else "-"
            )
            rhos = [
                qc["spearman"] for _, qc in measured if qc.get("spearman") is not None and qc["images"] >= MIN_SUBSET
            ]
            low, high = (f"{min(rhos):.2f}", f"{max(rhos):.2f}") if rhos else ("-", "-")
            rho = low if low == high else f"{low}–{high}"
            models = ", ".join(dict.fromkeys(name for name, _ in measured))
            lines.append(
                f"| {group} | {mode} | {models} | {total['images']} | {total['below']} | "
                f"{recall} | {total['flagged_at_or_above'] / max(total['at_or_above'], 1):.1%} | {rho} |"
            )
    return "\n".join(lines)


def both_directions_table(names: list[str]) -> str:
    """The per-data-set table over both directions of the two-fold cross-fitting: the cards' own measurements on
    the measure half plus their `swapped` ones (fitted on the measure half, measured on the fit half), so that
    every image is held out once."""
    qc = {name: read_card(name).get("qc") or {} for name in names}
    return dataset_table(
        names,
        [
            {name: block.get("validation") or {} for name, block in qc.items()},
            {name: (block.get("swapped") or {}).get("validation") or {} for name, block in qc.items()},
        ],
    )
