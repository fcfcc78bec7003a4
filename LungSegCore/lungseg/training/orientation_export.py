"""Export of a trained orientation classifier: its ONNX graph (what inference runs) and safetensors weights, each
with its SHA-256, and a card with the data, both stages' recipes and the measured held-out results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..inference.orientation import STATES
from ..inference.orientation_classifier import INPUT_SIZE, MIN_PROBABILITY, MIRROR_PROBABILITY
from ..models.cards import save_card, save_weights
from .config import load_config
from .export_onnx import export_graphs
from .orientation import evaluate, trained


def recipes(cfg: dict) -> list[dict]:
    """The run's recipe and those of the runs it started from (`init_from` checkpoints), oldest first."""
    chain = [cfg]
    source = cfg["training"].get("init_from")
    while source and str(source).endswith(".pt") and (Path(source).parent / "config.yaml").exists():
        chain.insert(0, load_config(Path(source).parent / "config.yaml"))
        source = chain[0]["training"].get("init_from")
    return chain


def card_for(run: Path, cfg: dict, epoch: int, evaluation: dict) -> dict:
    with np.load(run / "cache.npz", allow_pickle=False) as cache:
        train_counts = {s: int(n) for s, n in zip(*np.unique(cache["train_set"], return_counts=True))}
        heldout_counts = {s: int(n) for s, n in zip(*np.unique(cache["heldout_set"], return_counts=True))}
        dropped = cache["dropped"].tolist()
    return {
        "name": "orientation",
        "task": "orientation of a frontal chest radiograph: 16 states (quarter turns x mirroring x inversion)",
        "network": {"name": "monai.networks.nets.Classifier", "params": cfg["network"]["params"]},
        "input_size": INPUT_SIZE,
        "input": "the segmentation input at 256² (lungseg.inference.preprocess.model_input) averaged in 2 x 2 blocks",
        "classes": [s.name for s in STATES],
        "class_index": "8 * inverted + 4 * mirrored + k (lungseg/inference/orientation.py)",
        "decision": "the graph runs on the input and its mirror image (combined). The turn and inversion are "
        f"corrected at probability {MIN_PROBABILITY} or more (else the film is flagged); mirroring is called at "
        f"{MIRROR_PROBABILITY} either way (in between the film is flagged)",
        "epoch": epoch,
        "data": {"train_counts": train_counts, "heldout_counts": heldout_counts, "dropped_as_copies": dropped},
        "recipes": recipes(cfg),
        "heldout": evaluation["sets"],
        "versions": {"torch": torch.__version__, "monai": __import__("monai").__version__},
    }


def export(run: Path, out: str | Path | None = None) -> Path:
    """Write orientation.{onnx,safetensors,json} into `out` (default RUN/export); returns the card's path."""
    out = Path(out) if out else run / "export"
    out.mkdir(parents=True, exist_ok=True)
    model, cfg, epoch = trained(run)
    path = run / "evaluation.json"
    evaluation = json.loads(path.read_text()) if path.exists() else {}
    if evaluation.get("epoch") != epoch:
        evaluation = evaluate(run)
    card = save_weights(model, card_for(run, cfg, epoch, evaluation), out)
    card["onnx"] = export_graphs(model, card, out)  # the graph reads the weights just written
    return save_card(card, out)
