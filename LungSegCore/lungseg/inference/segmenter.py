"""Model inference on one radiograph or a batch: the model's ONNX graphs and their forward passes (no torch).

Uncertainty is the per-pixel standard deviation of the class probabilities across samples, the largest over the
classes (0 = every sample agrees). The samples are latent draws for the probabilistic U-Net, and test-time
augmentation without flips (small shifts, zooms and rotations, each undone on the probabilities) otherwise. An
ensemble's members give the same spread for free on every image (`member_spread`), which the predicted quality
uses.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from ..io.radiograph import reorient
from ..models.cards import DEFAULT_MODEL, load_graphs
from .orientation import ALL_CORRECTIONS, Corrections
from .orientation_classifier import OrientationClassifier, upright_inputs
from .postprocess import Prediction, postprocess
from .preprocess import model_input, resize
from .runtime import device_name, run

# (shift x, shift y as a fraction of the image, zoom, rotation in degrees); the identity comes first. No flips.
TTA_AFFINES = (
    (0, 0, 1, 0),
    (0.04, 0, 1, 0),
    (-0.04, 0, 1, 0),
    (0, 0.04, 1, 0),
    (0, -0.04, 1, 0),
    (0, 0, 1.08, 0),
    (0, 0, 0.92, 0),
    (0, 0, 1, 6),
    (0, 0, 1, -6),
)
LATENT_DRAWS = 16
LATENT_SEED = 0  # the same draws for every image: its uncertainty does not depend on its batch


def tta_transform(affine: tuple, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, offset) in (row, column) pixels that scipy's affine_transform takes for one TTA affine: the output
    pixel's source, with half-pixel centres (torch's affine_grid with align_corners=False)."""
    dx, dy, zoom, deg = affine
    cos, sin = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    matrix = np.array([[cos, sin], [-sin, cos]]) / zoom
    centre = np.full(2, (size - 1) / 2)
    return matrix, centre + size * np.array([dy, dx]) - matrix @ centre


def softmax(logits: np.ndarray, axis: int) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)  # in place: the batch's model process spends its time here, not in allocations
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted


def sample_spread(samples: np.ndarray) -> np.ndarray:
    """(N, B, 3, S, S) probabilities of N samples -> (B, S, S): their standard deviation (N - 1 in the
    denominator), the largest over the classes (0 where every sample agrees)."""
    return samples.std(0, ddof=1).max(1)


def mean_of_members(members: np.ndarray) -> np.ndarray:
    """(M, B, 3, S, S) -> (B, 3, S, S); one member's maps as they are (its mean, without the copy)."""
    return members[0] if len(members) == 1 else members.mean(0)


class ModelOutput(NamedTuple):
    """One batch's model output: probabilities (B, 3, S, S); the sample spread of `--uncertainty` (B, S, S) or
    None; an ensemble's member spread (B, S, S) or None."""

    probabilities: np.ndarray
    uncertainty: np.ndarray | None
    member_spread: np.ndarray | None

    def item(self, k: int) -> tuple:
        """Image k's maps, for `postprocess`: probabilities, uncertainty (or None), member spread (or None)."""
        return tuple(None if a is None else np.ascontiguousarray(a[k]) for a in self)


class Segmenter:
    """A loaded model and its forward passes; `segment(pixels)` returns the cleaned labelmap on the input's grid
    (post-processing itself is `postprocess.postprocess`). With `orientation` (the default) the orientation
    classifier checks each film first, and what it finds is corrected as `corrections` allow."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "auto",
        threads: int | None = None,
        orientation: bool = True,
        corrections: Corrections = ALL_CORRECTIONS,
    ):
        self.graphs, self.card = load_graphs(model, device, threads)
        # one thread: the classifier is small, and the batch's reader and finisher processes want the other cores
        self.classifier = OrientationClassifier(device, 1) if orientation else None
        self.corrections = corrections
        self.size = int(self.card["input_size"])
        self.device = device_name(self.graphs[0][0])
        inputs = self.graphs[0][0].get_inputs()  # a probabilistic U-Net's graph also takes (N, B, L) latent draws
        self.latent_dim = int(inputs[1].shape[2]) if len(inputs) == 2 else 0

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def definition(self) -> str:
        return self.card.get("definition", "")

    @property
    def latent(self) -> bool:
        """A probabilistic U-Net: its graph takes latent draws."""
        return self.latent_dim > 0

    def member_probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(B, 1, S, S) model inputs -> (M, B, 3, S, S): each graph's softmax at the input's size. Each member sees
        the input resized to the size it was trained at."""
        out = []
        for session, size in self.graphs:
            x = batch if size == self.size else resize(batch, (size, size), antialias=size < self.size)
            if self.latent:
                mean = np.zeros((1, len(batch), self.latent_dim))  # the prior's mean: the default prediction
                probs = softmax(run(session, image=x, noise=mean), axis=2)[0]
            else:
                probs = softmax(run(session, image=x), axis=1)
            out.append(probs if size == self.size else resize(probs, (self.size, self.size)))
        return out[0][None] if len(out) == 1 else np.stack(out)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(B, 1, S, S) model inputs -> (B, 3, S, S) softmax probabilities (an ensemble's mean)."""
        return mean_of_members(self.member_probabilities(batch))

    def tta_samples(self, batch: np.ndarray) -> np.ndarray:
        """(B, 1, S, S) -> (T, B, 3, S, S): probabilities under each TTA affine, mapped back to the input frame."""
        transforms = [tta_transform(affine, self.size) for affine in TTA_AFFINES]
        warped = np.stack(
            [
                [ndimage.affine_transform(image[0], m, o, order=1, mode="constant", prefilter=False) for image in batch]
                for m, o in transforms
            ]
        )
        probs = self.probabilities(warped.reshape(-1, 1, self.size, self.size)).reshape(
            len(transforms), len(batch), -1, self.size, self.size
        )
        for (matrix, offset), sample in zip(transforms, probs):
            back = np.linalg.inv(matrix)
            for maps in sample:
                for c, plane in enumerate(maps):
                    maps[c] = ndimage.affine_transform(
                        plane, back, -back @ offset, order=1, mode="nearest", prefilter=False
                    )
        return probs

    def prior_samples(self, batch: np.ndarray, n: int = LATENT_DRAWS) -> np.ndarray:
        """(n, B, 3, S, S) probabilities from n latent draws of a probabilistic U-Net."""
        draws = np.random.default_rng(LATENT_SEED).standard_normal((n, 1, self.latent_dim))
        logits = run(self.graphs[0][0], image=batch, noise=np.broadcast_to(draws, (n, len(batch), self.latent_dim)))
        return softmax(logits, axis=2)

    def predict(self, batch: np.ndarray, uncertainty: bool = False) -> ModelOutput:
        """(B, 1, S, S) -> probabilities (B, 3, S, S), the uncertainty (B, S, S) if asked for, and for an ensemble
        its members' spread (B, S, S) (free in the default mode, whose output is the members' mean)."""
        members = self.member_probabilities(batch)
        spread = sample_spread(members) if len(members) > 1 else None
        if not uncertainty:
            return ModelOutput(mean_of_members(members), None, spread)
        samples = self.prior_samples(batch) if self.latent else self.tta_samples(batch)
        return ModelOutput(samples.mean(0), sample_spread(samples), spread)

    def segment(
        self,
        pixels: np.ndarray,
        uncertainty: bool = False,
        keep_probabilities: bool = False,
        display_flips: tuple[bool, bool] = (False, False),
        orientation_stated: bool = False,
        corrections: Corrections | None = None,
    ) -> Prediction:
        """`display_flips` (from DICOM PatientOrientation, see `io.display_flips`) brings stored pixels to the
        standard view the model knows; `orientation_stated`: that header said how the film lies, so the classifier
        only checks it; `corrections` overrides the segmenter's own. The maps come back on the stored grid;
        `Prediction.orientation` says what was found."""
        x = model_input(reorient(pixels, display_flips), self.size)[None]
        x, findings = self.orient(x, [orientation_stated], corrections)
        probabilities, unc, spread = self.predict(x, uncertainty).item(0)
        finding = findings[0] if findings else None
        return postprocess(
            probabilities, pixels.shape, unc, keep_probabilities, display_flips, spread, x[0, 0], finding
        )

    def orient(
        self, model_inputs: np.ndarray, stated: list[bool], corrections: Corrections | None = None
    ) -> tuple[np.ndarray, list]:
        """A batch of model inputs with what the orientation classifier found undone, for the network, and the
        findings (the inputs as they are, and no findings, without the classifier). `stated[i]`: input i's DICOM
        header states how it lies."""
        if self.classifier is None:
            return model_inputs, []
        findings = self.classifier.findings(model_inputs, corrections or self.corrections, stated)
        return upright_inputs(model_inputs, findings), findings
