"""Model inference on one radiograph or a batch: the loaded model and its forward passes.

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
import torch
import torch.nn.functional as F

from ..io.radiograph import reorient
from ..models.cards import DEFAULT_MODEL, load_model
from ..nets.networks import predict_logits, select_device
from .postprocess import Prediction, postprocess
from .preprocess import model_input

# (shift x, shift y as a fraction of the image, zoom, rotation in degrees); the identity comes first. No flips.
TTA_AFFINES = ((0, 0, 1, 0), (0.04, 0, 1, 0), (-0.04, 0, 1, 0), (0, 0.04, 1, 0), (0, -0.04, 1, 0),
               (0, 0, 1.08, 0), (0, 0, 0.92, 0), (0, 0, 1, 6), (0, 0, 1, -6))


def _affine_matrices(affines, batch: int) -> torch.Tensor:
    """2x3 sampling matrices (output -> input coordinates) for torch's affine_grid."""
    mats = []
    for dx, dy, zoom, deg in affines:
        a = math.radians(deg)
        rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / zoom
        mats.append(torch.cat([rot, torch.tensor([[2 * dx], [2 * dy]])], dim=1))
    return torch.stack(mats).repeat_interleave(batch, dim=0)


def _inverse(theta: torch.Tensor) -> torch.Tensor:
    full = torch.cat([theta, torch.tensor([[[0.0, 0.0, 1.0]]]).expand(len(theta), 1, 3)], dim=1)
    return torch.linalg.inv(full)[:, :2]


def sample_spread(samples: torch.Tensor) -> torch.Tensor:
    """(N, B, 3, S, S) probabilities of N samples -> (B, S, S): their standard deviation, the largest over the
    classes (0 where every sample agrees)."""
    return samples.std(0).amax(1)


class ModelOutput(NamedTuple):
    """One batch's model output: probabilities (B, 3, S, S); the sample spread of `--uncertainty` (B, S, S) or
    None; an ensemble's member spread (B, S, S) or None."""
    probabilities: torch.Tensor
    uncertainty: torch.Tensor | None
    member_spread: torch.Tensor | None

    def item(self, k: int) -> tuple:
        """Image k's maps, for `postprocess`: probabilities, uncertainty (or None), member spread (or None)."""
        return tuple(None if t is None else t[k] for t in self)


class Segmenter:
    """A loaded model and its forward passes; `segment(pixels)` returns the cleaned labelmap on the input's grid
    (post-processing itself is `postprocess.postprocess`)."""

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "auto"):
        self.device = select_device(device)
        self.model, self.card = load_model(model, self.device)
        self.size = int(self.card["input_size"])

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def definition(self) -> str:
        return self.card.get("definition", "")

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) model inputs -> (B, 3, S, S) softmax probabilities on the CPU."""
        x = batch.to(self.device)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            logits = predict_logits(self.model, x)
        return torch.softmax(logits.float(), dim=1).cpu()

    @torch.no_grad()
    def tta_samples(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> (T, B, 3, S, S): probabilities under each TTA affine, mapped back to the input frame."""
        b = len(batch)
        theta = _affine_matrices(TTA_AFFINES, b)
        inputs = batch.repeat(len(TTA_AFFINES), 1, 1, 1)
        warped = F.grid_sample(inputs, F.affine_grid(theta, inputs.shape, align_corners=False),
                               mode="bilinear", padding_mode="zeros", align_corners=False)
        probs = self.probabilities(warped)
        back = F.grid_sample(probs, F.affine_grid(_inverse(theta), probs.shape, align_corners=False),
                             mode="bilinear", padding_mode="border", align_corners=False)
        return back.reshape(len(TTA_AFFINES), b, *probs.shape[1:])

    def predict(self, batch: torch.Tensor, uncertainty: bool = False) -> "ModelOutput":
        """(B, 1, S, S) -> probabilities (B, 3, S, S), the uncertainty (B, S, S) if asked for, and for an ensemble
        its members' spread (B, S, S) (free in the default mode, whose output is the members' mean)."""
        members = self.member_samples(batch)
        spread = None if members is None else sample_spread(members)
        if not uncertainty:
            return ModelOutput(self.probabilities(batch) if members is None else members.mean(0), None, spread)
        samples = self.prior_samples(batch) if hasattr(self.model, "sample") else self.tta_samples(batch)
        return ModelOutput(samples.mean(0), sample_spread(samples), spread)

    @torch.no_grad()
    def member_samples(self, batch: torch.Tensor) -> torch.Tensor | None:
        """(M, B, 3, S, S) probabilities of each member of an ensemble; None for a single network."""
        if not hasattr(self.model, "member_probabilities"):
            return None
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            return self.model.member_probabilities(batch.to(self.device)).float().cpu()

    @torch.no_grad()
    def prior_samples(self, batch: torch.Tensor, n: int = 16) -> torch.Tensor:
        """(n, B, 3, S, S) probabilities from n latent draws of a probabilistic U-Net."""
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            logits = self.model.sample(batch.to(self.device), n)
        return torch.softmax(logits.float(), dim=2).cpu()

    def segment(self, pixels: np.ndarray, uncertainty: bool = False, keep_probabilities: bool = False,
                display_flips: tuple[bool, bool] = (False, False)) -> Prediction:
        """`display_flips` (from DICOM PatientOrientation, see `io.display_flips`) brings stored pixels to the
        standard view the model knows; the maps come back on the stored grid."""
        x = model_input(reorient(pixels, display_flips), self.size)
        probabilities, unc, spread = self.predict(x[None], uncertainty).item(0)
        return postprocess(probabilities, pixels.shape, unc, keep_probabilities, display_flips, spread, x[0])

    def confidence(self, pixels: np.ndarray) -> float:
        """Mean winning-class probability: low when the image is not what the model was trained on."""
        return float(self.probabilities(model_input(pixels, self.size)[None])[0].amax(0).mean())

    def needs_inversion(self, pixels: np.ndarray) -> bool:
        """True when the image looks inverted (air bright, e.g. MONOCHROME1 loaded without inversion):
        the model is clearly more confident on the inverted pixels."""
        return self.confidence(pixels.max() - pixels) > self.confidence(pixels) + 0.02
