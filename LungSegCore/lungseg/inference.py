"""Model inference on one radiograph or a batch: preprocess, forward, resize back, clean up."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .labels import clean_labelmap
from .models import DEFAULT_MODEL, load_model
from .networks import predict_logits, select_device
from .transforms import model_input


@dataclass
class Prediction:
    label: np.ndarray           # (rows, columns) uint8: 0 background, 1 right lung, 2 left lung
    probabilities: np.ndarray   # (3, rows, columns) float32 softmax on the input grid


class Segmenter:
    """A loaded model; `segment(pixels)` returns the cleaned labelmap on the input's grid."""

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "auto"):
        self.device = select_device(device)
        self.model, self.card = load_model(model, self.device)
        self.size = int(self.card["input_size"])

    @property
    def name(self) -> str:
        return self.card["name"]

    def prepare(self, pixels: np.ndarray) -> torch.Tensor:
        return model_input(pixels, self.size)

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) model inputs -> (B, 3, S, S) softmax probabilities on the CPU."""
        x = batch.to(self.device)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            logits = predict_logits(self.model, x)
        return torch.softmax(logits.float(), dim=1).cpu()

    @staticmethod
    def finish(probabilities: torch.Tensor, shape: tuple[int, int]) -> Prediction:
        """(3, S, S) probabilities -> cleaned labelmap and probabilities on the (rows, columns) grid."""
        full = F.interpolate(probabilities[None], size=shape, mode="bilinear", align_corners=False)[0]
        label = clean_labelmap(full.argmax(0).to(torch.uint8).numpy())
        return Prediction(label=label, probabilities=full.numpy())

    def segment(self, pixels: np.ndarray) -> Prediction:
        probs = self.probabilities(self.prepare(pixels)[None])[0]
        return self.finish(probs, pixels.shape)
