"""The orientation classifier: which of the 16 states (`orientation.py`) a stored film is in, and what to do about it.

It reads the segmentation network's own input, shrunk to 128², so it needs no second read of the image. A first pass
finds the turn and the inversion; a second pass, on the input with those undone, tells a mirrored from an upright film
(`two_passes`). Each pass runs the graph on the input and on its mirror image and combines the two answers (the
mirror's states mapped back), so that a film and its mirror copy get mirror-image answers: two forward passes of a
3.4 MB graph per upright film, four for one that is turned or inverted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import log_softmax

from ..models.cards import ORIENTATION_CARD, load_graphs
from .orientation import ALL_CORRECTIONS, STATES, UPRIGHT, Corrections, State, undo_on_input
from .preprocess import resize
from .runtime import run

BASE_SIZE = 256  # the classifier sees a 256² model input averaged in 2 x 2 blocks
INPUT_SIZE = 128
# Chosen on the held-out copies (LungSegCore/docs/orientation.md): below MIN_PROBABILITY the pixels do not say how
# the film is turned, and nothing is corrected (no non-chest input reached it); a film is called mirrored, or not, at
# MIRROR_PROBABILITY, and flagged in between.
MIN_PROBABILITY = 0.7
MIRROR_PROBABILITY = 0.8
# the state of the mirror image of a film stored in state s (mirroring turns the other way: k -> -k)
MIRROR_OF = np.array([State((-s.k) % 4, not s.mirrored, s.inverted).index for s in STATES])


def classifier_input(model_inputs: np.ndarray) -> np.ndarray:
    """(B, 1, S, S) segmentation inputs -> (B, 1, 128, 128) classifier inputs."""
    x = np.asarray(model_inputs, dtype=np.float32)
    if x.shape[-1] != BASE_SIZE:
        x = resize(x, (BASE_SIZE, BASE_SIZE), antialias=x.shape[-1] > BASE_SIZE)
    blocks = x.reshape(len(x), 1, INPUT_SIZE, 2, INPUT_SIZE, 2)
    # the 2 x 2 mean summed as NumPy's mean sums it (the same floats), a tenth of its time
    top = blocks[:, :, :, 0, :, 0] + blocks[:, :, :, 0, :, 1]
    return (top + (blocks[:, :, :, 1, :, 0] + blocks[:, :, :, 1, :, 1])) * np.float32(0.25)


def combine_mirror(logits: np.ndarray, mirror_logits: np.ndarray) -> np.ndarray:
    """(B, 16) state probabilities from the logits of the images and of their mirror images (geometric mean)."""
    log_p = log_softmax(np.asarray(logits, np.float64), axis=1)
    log_p += log_softmax(np.asarray(mirror_logits, np.float64), axis=1)[:, MIRROR_OF]
    return np.exp(log_softmax(log_p / 2, axis=1))


@dataclass(frozen=True)
class Finding:
    """One film's orientation: the most probable turn and inversion with its probability, whether it is mirrored
    with that probability, the state undone before segmenting, and the reasons for `qc=check` it adds."""

    state: State
    probability: float
    mirrored_probability: float = 0.0
    applied: State = UPRIGHT
    reasons: tuple[str, ...] = ()

    @property
    def corrected(self) -> str:
        """What was corrected, for results.csv."""
        return "" if self.applied.upright else f"{self.applied.name} (from the pixels)"

    @property
    def found(self) -> str:
        """What the classifier found, for results.csv."""
        return f"{self.state.name} (p={self.probability:.2f}; mirrored p={self.mirrored_probability:.2f})"


def orientation_corrected(flips: tuple[bool, bool], finding: Finding | None) -> str:
    """What was corrected before segmenting, for results.csv and evaluation.csv: the DICOM header's display flips,
    then what the pixels showed."""
    flip_rows, flip_cols = flips
    header = "mirrored" if flip_cols else ("upside-down" if flip_rows else "")
    return "; ".join(part for part in (header, finding.corrected if finding else "") if part)


def mirrored_reason(corrected: bool) -> str:
    if corrected:
        return (
            "looks mirrored (heart on the image's left): Right and Left follow the anatomy; "
            "confirm it is not dextrocardia or situs inversus"
        )
    return "looks mirrored (heart on the image's left): Right and Left may be swapped (mirror correction is off)"


def pose(probabilities: np.ndarray) -> tuple[State, float]:
    """The most probable turn and inversion (mirroring left open) and its probability, from 16 state probabilities."""
    by_pose = np.asarray(probabilities, dtype=np.float64).reshape(2, 2, 4).sum(axis=1)  # inverted, quarter turns
    inverted, k = np.unravel_index(int(by_pose.argmax()), by_pose.shape)
    return State(int(k), False, bool(inverted)), float(by_pose[inverted, k])


def two_passes(probabilities_of, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 16) state probabilities of classifier inputs (N, ..., 128, 128), and the probability that each is
    mirrored. That one comes from a second pass on the input with its turn and inversion undone: the classifier
    tells mirrored from upright films best when they stand upright. A film that already stands upright (most do)
    needs no second pass: its first pass is the same computation."""
    first = probabilities_of(images)
    poses = [pose(p)[0] for p in first]
    second = first.copy()
    moved = [i for i, state in enumerate(poses) if not state.upright]
    if moved:
        second[moved] = probabilities_of(np.stack([undo_on_input(poses[i], images[i]) for i in moved]))
    mirrored = State(mirrored=True).index
    return first, second[:, mirrored] / np.maximum(second[:, UPRIGHT.index] + second[:, mirrored], 1e-12)


def decide(
    probabilities: np.ndarray,
    mirrored: float,
    corrections: Corrections = ALL_CORRECTIONS,
    header: bool = False,
) -> Finding:
    """What to do with one film, from its 16 state probabilities and the probability that it is mirrored
    (`two_passes`). The turn and inversion are corrected at MIN_PROBABILITY; the film is called mirrored, or not,
    at MIRROR_PROBABILITY, and flagged in between. `header`: its DICOM PatientOrientation states how it lies, and
    that wins; pixels that clearly disagree are flagged."""
    turned, probability = pose(probabilities)
    mirrored = float(mirrored)
    state = State(turned.k, mirrored >= 0.5, turned.inverted)
    if probability < MIN_PROBABILITY:
        reason = f"orientation unclear from the pixels (p={probability:.2f})"
        return Finding(state, probability, mirrored, reasons=(reason,))
    sure = max(mirrored, 1 - mirrored) >= MIRROR_PROBABILITY
    seen = State(state.k, state.mirrored and sure, state.inverted)
    if header:
        if seen.upright:
            return Finding(state, probability, mirrored)
        reason = f"the pixels look {seen.name} (p={probability:.2f}) but PatientOrientation says otherwise"
        return Finding(state, probability, mirrored, reasons=(reason + "; the header was followed",))
    applied = seen.without(not corrections.mirroring, not corrections.turns, not corrections.inversion)
    reasons = [mirrored_reason(applied.mirrored)] if seen.mirrored else []
    if not sure:
        reasons.append(
            f"cannot tell from the pixels whether the film is mirrored (p={mirrored:.2f}): check Right and Left"
        )
    left = State(seen.k, False, seen.inverted).without(turns=applied.k == seen.k, inversion=applied.inverted)
    if not left.upright:
        reasons.append(f"looks {left.name}; not corrected (the correction is off)")
    return Finding(state, probability, mirrored, applied, tuple(reasons))


class OrientationClassifier:
    """The shipped orientation graph on ONNX Runtime."""

    def __init__(self, device: str = "auto", threads: int | None = None, model: str | Path = ORIENTATION_CARD):
        graphs, self.card = load_graphs(model, device, threads)
        self.session = graphs[0][0]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(B, 1, 128, 128) classifier inputs -> (B, 16) state probabilities."""
        logits = run(self.session, image=np.concatenate([images, images[..., ::-1]]))
        return combine_mirror(logits[: len(images)], logits[len(images) :])

    def findings(self, model_inputs: np.ndarray, corrections: Corrections, headers) -> list[Finding]:
        """One Finding per (1, S, S) segmentation input; `headers[i]`: whether input i's DICOM header states its
        orientation."""
        probabilities, mirrored = two_passes(self.probabilities, classifier_input(model_inputs))
        return [decide(p, m, corrections, h) for p, m, h in zip(probabilities, mirrored, headers)]


def upright_inputs(model_inputs: np.ndarray, findings: list[Finding]) -> np.ndarray:
    """(B, 1, S, S) inputs with each finding's correction undone: what the segmentation network sees."""
    return np.stack([undo_on_input(f.applied, x) for f, x in zip(findings, model_inputs)])
