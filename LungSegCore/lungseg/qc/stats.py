"""Offline statistics of the predicted quality: the regression's fit (IRLS), Spearman's correlation and how well
QC flags found the bad segmentations of a labelled set. Used by the fit (`fit.py`, `selection.py`) and `lungseg
evaluate`, never per image in the batch.
"""

from __future__ import annotations

import math

import numpy as np

from .features import EPS

DICE_LIMIT = 0.90  # the line between a usable and a bad segmentation; flags aim below it


def fit_regression(
    x: np.ndarray, dice: np.ndarray, l2: float = 1.0, sample_weight: np.ndarray | None = None, iterations: int = 100
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Fractional logistic regression of the Dice on the features (quasi-binomial GLM, Papke and Wooldridge
    1996): Newton steps (iteratively reweighted least squares) on the Bernoulli quasi-likelihood with an L2
    penalty on the standardized weights, halving a step whenever it would not lower the penalized loss (the loss
    is convex, so this converges).

    Args:
        x: (n, k) transformed features (`model.transform`), one row per segmentation.
        dice: (n,) the true Dice of each, in [0, 1].
        l2: ridge penalty (the intercept is not penalized).
        sample_weight: (n,) optional weight of each row.

    Returns:
        mean, scale (the standardization), weights and bias: quality = sigmoid(((x - mean) / scale) @ w + b).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.clip(np.asarray(dice, dtype=np.float64), 0.0, 1.0)
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-9] = 1.0
    design = np.column_stack([(x - mean) / scale, np.ones(len(x))])
    weight = np.ones(len(x)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    penalty = np.full(design.shape[1], float(l2))
    penalty[-1] = 0.0

    def loss(beta: np.ndarray) -> float:
        eta = design @ beta  # -log-likelihood = sum(log(1 + e^eta) - y * eta), computed stably
        return float(weight @ (np.logaddexp(0, eta) - y * eta) + 0.5 * penalty @ beta**2)

    beta = np.zeros(design.shape[1])
    beta[-1] = math.log((y.mean() + EPS) / (1 - y.mean() + EPS))
    current = loss(beta)
    for _ in range(iterations):
        mu = 1 / (1 + np.exp(-np.clip(design @ beta, -30, 30)))
        gradient = design.T @ (weight * (mu - y)) + penalty * beta
        hessian = design.T @ (design * (weight * np.maximum(mu * (1 - mu), 1e-9))[:, None]) + np.diag(penalty)
        step = np.linalg.solve(hessian + 1e-9 * np.eye(len(beta)), gradient)
        size = 1.0
        while size > 1e-6 and loss(beta - size * step) > current:
            size /= 2
        if size <= 1e-6:
            break
        beta = beta - size * step
        new = loss(beta)
        if current - new < 1e-10 * max(abs(current), 1.0):
            current = new
            break
        current = new
    return mean, scale, beta[:-1], float(beta[-1])


def spearman(a, b) -> float:
    """Spearman's rank correlation (NaN when either side is constant or there are fewer than 3 values)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def qc_accuracy(dice, flagged, quality=None, limit: float = DICE_LIMIT, severe: float = 0.80) -> dict:
    """How well QC flags found the bad segmentations of a labelled set.

    Args:
        dice: true both-lung Dice per image.
        flagged: True where QC said "check".
        quality: predicted Dice per image (for the correlation and the error), or None.
        limit: a segmentation below this Dice should be flagged.
        severe: also count the flags among the images below this Dice (the clearly failed ones).

    Returns:
        images; below (Dice < limit) and how many of them were flagged (recall); at_or_above and how many of
        them were flagged (false_flag_rate); Spearman's correlation of quality with the Dice and the mean
        absolute error of quality, where given. Rates are None when their group is empty.
    """
    dice = np.asarray(dice, dtype=np.float64)
    flagged = np.asarray(flagged, dtype=bool)
    bad = dice < limit
    out = {
        "images": int(dice.size),
        "dice_limit": limit,
        "below": int(bad.sum()),
        "flagged_below": int((flagged & bad).sum()),
        "recall": round(float((flagged & bad).sum() / bad.sum()), 4) if bad.any() else None,
        "at_or_above": int((~bad).sum()),
        "flagged_at_or_above": int((flagged & ~bad).sum()),
        "false_flag_rate": round(float((flagged & ~bad).sum() / (~bad).sum()), 4) if (~bad).any() else None,
        "flagged": int(flagged.sum()),
        "severe_limit": severe,
        "below_severe": int((dice < severe).sum()),
        "flagged_below_severe": int((flagged & (dice < severe)).sum()),
    }
    if quality is not None:
        quality = np.asarray(quality, dtype=np.float64)
        rho = spearman(quality, dice)
        out["spearman"] = None if math.isnan(rho) else round(rho, 4)
        out["mean_abs_error"] = round(float(np.abs(quality - dice).mean()), 4) if dice.size else None
    return out


def qc_accuracy_text(qc: dict) -> str:
    """`qc_accuracy`'s result in words: `7 of 8 below Dice 0.90 flagged (recall 0.88; 3 of 3 below 0.80), false
    flags 3.1% (12 of 390), Spearman(quality, Dice) 0.71` (a part without its numbers left out). The clear failures
    are counted apart: most of a weak model's results below 0.90 lie just under it."""
    severe = (
        f"; {qc['flagged_below_severe']} of {qc['below_severe']} below {qc['severe_limit']:.2f}"
        if qc.get("below_severe")
        else ""
    )
    parts = [
        f"{qc['flagged_below']} of {qc['below']} below Dice {qc['dice_limit']:.2f} flagged"
        + (f" (recall {qc['recall']:.2f}{severe})" if qc["recall"] is not None else "")
    ]
    if qc["false_flag_rate"] is not None:
        parts.append(f"false flags {qc['false_flag_rate']:.1%} ({qc['flagged_at_or_above']} of {qc['at_or_above']})")
    if qc.get("spearman") is not None:
        parts.append(f"Spearman(quality, Dice) {qc['spearman']:.2f}")
    return ", ".join(parts)
