"""Predicted quality of one segmentation: a predicted Dice in [0, 1], and the decision to check it.

Nobody can look at 50,000 segmentations. Each one therefore gets `quality`, an estimate of its both-lung Dice
against a reference mask of the model's own lung definition, from the features of the model's output
(`features.py`). A fractional logistic regression (a quasi-binomial GLM: sigmoid of a weighted sum of standardized
features, fitted to the Dice by IRLS, `stats.fit_regression`) turns them into the predicted Dice. Its parameters,
the threshold below which a result is flagged, and the validation numbers sit in the model card's `qc` block,
written by `scripts/fit_quality.py` or `lungseg fit-qc` (fitted on one half of the images, measured on the other).
`assess` is the one entry point: the batch, `lungseg evaluate` and the Slicer module all call it with the
Prediction and the model (or its card), for every image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..definitions import DEFAULT_DEFINITION
from .features import EDGE_FEATURE, PRIOR_FEATURE, SHAPE_FEATURES, TWO_SIDED, quality_features
from .rules import quality_flags

# What a person reads in `qc_reasons` for the features that pulled the predicted quality down the most.
FEATURE_TEXT = {
    "expected_dice": "the model is unsure of its own outline",
    "uncertain_mass": "much lung probability near 0.5",
    "entropy": "high entropy inside the lungs",
    "outside_mass": "lung probability outside the kept lungs",
    "confidence": "low confidence over the image",
    "cleanup_change": "clean-up removed or filled much",
    "lung_fraction": "unusual lung area",
    "right_left_ratio": "unusual right/left ratio",
    "box_fill": "irregular lung shape",
    "outline": "ragged lung outline",
    "centre_x": "lungs off the centre",
    "centre_y": "lungs too high or too low",
    "height": "unusual lung height",
    "solidity": "a lung with a bite out of it",
    "height_ratio": "one lung shorter than the other",
    PRIOR_FEATURE: "a lung shaped unlike the reference lungs",
    EDGE_FEATURE: "an outline off the lung's edge in the image",
    "uncertainty_mean": "high sample spread",
    "uncertain_border": "samples disagree on the outline",
    "member_spread": "the ensemble's members disagree inside the lungs",
    "member_disagreement": "the ensemble's members disagree on the outline",
}


@dataclass(frozen=True)
class QualityModel:
    """One fitted regression of the card's `qc` block (one per mode: default, and uncertainty)."""

    features: tuple[str, ...]
    centre: tuple[float, ...]  # two-sided features: centre of good segmentations; others 0 (unused)
    mean: tuple[float, ...]  # standardization of the transformed features
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    threshold: float  # quality below this: check
    # whether the fragments rule (rules.FRAGMENTS) still flags on its own: a fit turns it off when it flags too many
    # of the model's good results (selection.keeps_fragments_rule); cards fitted before it was a choice keep it
    fragments_rule: bool = True
    # the shape model (`fit_shape_prior`) of a regression that reads PRIOR_FEATURE, else None
    shape_prior: dict | None = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, block: dict) -> QualityModel:
        return cls(
            tuple(block["features"]),
            tuple(block["centre"]),
            tuple(block["mean"]),
            tuple(block["scale"]),
            tuple(block["weights"]),
            float(block["bias"]),
            float(block["threshold"]),
            bool(block.get("fragments_rule", True)),
            block.get("shape_prior"),
        )

    def to_dict(self) -> dict:
        return {
            "features": list(self.features),
            "centre": [round(v, 6) for v in self.centre],
            "mean": [round(v, 6) for v in self.mean],
            "scale": [round(v, 6) for v in self.scale],
            "weights": [round(v, 6) for v in self.weights],
            "bias": round(self.bias, 6),
            "threshold": round(self.threshold, 4),
            "fragments_rule": self.fragments_rule,
            **({"shape_prior": self.shape_prior} if self.shape_prior is not None else {}),
        }

    def standardized(self, values: dict[str, float]) -> np.ndarray:
        return standardize(transform(values, self.features, self.centre), self.mean, self.scale)

    def predict(self, values: dict[str, float]) -> float:
        z = float(self.standardized(values) @ np.asarray(self.weights) + self.bias)
        return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))

    def lowering(self, values: dict[str, float], top: int = 2) -> list[str]:
        """The features that pulled this prediction down the most (below the average fitted case)."""
        pulls = self.standardized(values) * np.asarray(self.weights)
        order = [i for i in np.argsort(pulls) if pulls[i] < -0.5][:top]
        return [self.features[i] for i in order]


def transform(values: dict[str, float], names, centre) -> np.ndarray:
    """The regression's inputs: two-sided features as their distance from the centre, the others as they are."""
    return np.array(
        [abs(values[n] - c) if n in TWO_SIDED else values[n] for n, c in zip(names, centre)], dtype=np.float64
    )


def standardize(x: np.ndarray, mean, scale) -> np.ndarray:
    return (x - np.asarray(mean)) / np.asarray(scale)


@dataclass
class Assessment:
    """The QC of one segmentation: `qc` is "check" when any rule fired or `quality` is below the threshold."""

    quality: float | None  # predicted Dice; None when the model card has no fitted `qc` block
    threshold: float | None
    reasons: list[str] = field(default_factory=list)
    mode: str = "default"  # the card's regression used: "default", or "uncertainty"

    @property
    def qc(self) -> str:
        return "check" if self.reasons else "ok"


def quality_model(card: dict, uncertainty: bool = False) -> tuple[QualityModel | None, str]:
    """The card's fitted regression for this mode (falling back on the default mode), and the mode's name."""
    block = (card or {}).get("qc") or {}
    modes = block.get("modes") or {}
    for mode in ("uncertainty", "default") if uncertainty else ("default",):
        if mode in modes:
            return QualityModel.from_dict(modes[mode]), mode
    return None, "default"


def reads_image(card: dict, uncertainty: bool = False) -> bool:
    """Whether the card's regression for this mode reads the network's input (EDGE_FEATURE)."""
    fitted, _ = quality_model(card, uncertainty)
    return fitted is not None and EDGE_FEATURE in fitted.features


def _card_of(model) -> dict:
    """A Segmenter, or its card (a dict)."""
    return model if isinstance(model, dict) else getattr(model, "card", {}) or {}


def assess(prediction, model) -> Assessment:
    """Quality control of one segmentation: the predicted Dice and every reason to look at it.

    Args:
        prediction: a `postprocess.Prediction` (from `Segmenter.segment` or the batch); with an uncertainty map
            (the `--uncertainty` mode) the card's uncertainty regression is used when it has one.
        model: the `inference.Segmenter` that made it, or its model card (a dict).

    Returns:
        The Assessment: `quality` (None without a fitted card), the card's threshold, and the reasons (what the
        orientation classifier found, the rules of `rules.quality_flags` for the card's lung definition, then a
        low predicted quality); its `qc` is "check" when there is any reason.
    """
    card = _card_of(model)
    fitted, mode = quality_model(card, prediction.model_uncertainty is not None)
    predicted = fitted is not None and prediction.model_probabilities is not None
    orientation = list(prediction.orientation.reasons) if prediction.orientation else []
    reasons = orientation + quality_flags(
        prediction.label,
        prediction.raw_label,
        prediction.uncertainty,
        card.get("definition") or DEFAULT_DEFINITION,  # an unknown one falls back there
        fragments=not predicted or fitted.fragments_rule,
    )  # off only where quality stands in
    if not predicted:
        return Assessment(None, None, reasons, mode)
    values = quality_features(
        prediction,
        shape=any(name in SHAPE_FEATURES for name in fitted.features),
        prior=fitted.shape_prior,
        edges=EDGE_FEATURE in fitted.features,
    )
    quality = fitted.predict(values)
    if quality < fitted.threshold:
        why = ", ".join(FEATURE_TEXT[name] for name in fitted.lowering(values)) or "several weak signals"
        reasons.append(f"low predicted quality {quality:.2f} (threshold {fitted.threshold:.2f}): {why}")
    return Assessment(round(quality, 4), fitted.threshold, reasons, mode)
