"""The orientation classifier's training: a tiny run on synthetic films that resumes exactly, evaluates and exports
an ONNX graph that the inference side loads, checksummed."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lungseg.inference.orientation_classifier import OrientationClassifier
from lungseg.training import orientation as training
from lungseg.training.config import load_config
from lungseg.training.orientation_export import export


def synthetic_films(root, n=6, size=96, seed=0):
    """Films with two lung fields and a heart on the image's right, and a splits.csv."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size] / size
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = ["file,split"]
    for i in range(n):
        lungs = (((cols - 0.3) / 0.15) ** 2 + ((rows - 0.45) / 0.3) ** 2 < 1) | (
            ((cols - 0.7) / 0.13) ** 2 + ((rows - 0.45) / 0.3) ** 2 < 1
        )
        heart = ((cols - 0.6) / 0.12) ** 2 + ((rows - 0.65) / 0.1) ** 2 < 1
        film = 190 - 130 * (lungs & ~heart) + rng.normal(0, 6, lungs.shape)
        Image.fromarray(np.clip(film, 0, 255).astype(np.uint8)).save(root / "images" / f"f{i}.png")
        Image.fromarray((lungs * 255).astype(np.uint8)).save(root / "masks" / f"f{i}.png")
        lines.append(f"f{i}.png,{'val' if i < 2 else 'train'}")
    (root / "splits.csv").write_text("\n".join(lines) + "\n")


def tiny_config(tmp_path):
    cfg = load_config("orientation-stage1")
    cfg["network"]["params"].update(channels=[4, 8, 16], strides=[2, 2, 2])
    cfg["data"].update(
        root=str(tmp_path / "data"),
        train=[{"set": "syn", "split": "train"}],
        heldout=[{"set": "syn", "split": "val"}],
        dicom_films=[],
        dedup_correlation=None,  # the synthetic films are near copies of each other
    )
    cfg["training"].update(epochs=2, steps_per_epoch=2, batch_size=4, warmup_steps=1)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tiny_training_resumes_exactly_evaluates_and_exports(tmp_path):
    torch.set_num_threads(1)
    synthetic_films(tmp_path / "data" / "syn")
    config = tiny_config(tmp_path)
    training.train(tmp_path / "a", config)  # uninterrupted
    training.train(tmp_path / "b", config, stop_after=1)  # stopped after epoch 1
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    training.train(tmp_path / "b")  # resumes from its own checkpoint and config.yaml
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=False) for run in "ab")
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key])  # resuming reproduces the uninterrupted run
    assert len((tmp_path / "b" / "log.csv").read_text().splitlines()) == 3

    card_path = export(tmp_path / "b", tmp_path / "model")
    card = json.loads(card_path.read_text())
    evaluation = card["heldout"]
    assert evaluation["syn"]["films"] == 2 and evaluation["demo"]["films"] == 3  # the demo films are always held out
    assert card["data"]["train_counts"] == {"syn": 4} and card["classes"][0] == "upright"
    graph = card["onnx"]["graphs"][0]
    assert graph["sha256"] == hashlib.sha256((card_path.parent / graph["file"]).read_bytes()).hexdigest()
    assert graph["max_logit_difference"] < 1e-3
    classifier = OrientationClassifier("cpu", 1, card_path)
    probabilities = classifier.probabilities(np.random.default_rng(0).random((2, 1, 128, 128), dtype=np.float32))
    assert probabilities.shape == (2, 16) and np.allclose(probabilities.sum(1), 1)


@pytest.mark.data
@pytest.mark.parametrize("name", ["orientation-stage1", "orientation"])
def test_the_orientation_recipes_build_and_find_their_data(name):
    from conftest import SHARED_DATA, require_or_skip

    from lungseg.io.selection import entry_cases
    from lungseg.training.orientation_data import heldout_films

    cfg = load_config(name)
    logits = training.build_model(cfg).eval()(torch.zeros(2, 1, 128, 128))
    assert logits.shape == (2, 16)
    if not SHARED_DATA.is_dir():
        require_or_skip(f"research data not found at {SHARED_DATA}")
    cfg["data"]["root"] = str(SHARED_DATA)
    for entry in cfg["data"]["train"] + cfg["data"]["heldout"]:
        assert entry_cases(SHARED_DATA, entry), entry
    assert {s for s, _ in heldout_films(cfg)} == {"jsrt", "covid-qu-ex", "v7-full", "demo", "dicom"}
