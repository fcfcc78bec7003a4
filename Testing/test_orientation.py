"""Orientation states (D4 x inversion): transforms and inverses, preprocessing, and a tiny train / resume / export.

No research data needed: the training test writes a few synthetic films.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from lungseg.training import orientation as T

G = T.G  # lungseg.inference.orientation (loaded from its file while lungseg/inference.py shadows the package)


def asymmetric(shape=(5, 7), dtype=np.uint8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape).astype(dtype)


def test_sixteen_distinct_states_with_stable_indices():
    assert len(G.STATES) == 16 and len(set(G.STATES)) == 16
    assert [s.index for s in G.STATES] == list(range(16))
    assert G.STATES[0].upright and sum(s.upright for s in G.STATES) == 1
    assert len(set(G.STATE_NAMES)) == 16
    x = asymmetric((6, 6))
    outs = {G.apply(s, x).tobytes() for s in G.STATES}
    assert len(outs) == 16  # an asymmetric image gives 16 different stored images


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_undo_apply_round_trip_all_states(dtype):
    x = asymmetric(dtype=dtype)
    labels = np.random.default_rng(1).integers(0, 3, (5, 7)).astype(np.uint8)
    for s in G.STATES:
        stored = G.apply(s, x)
        assert stored.dtype == x.dtype and stored.shape == (x.shape if s.k % 2 == 0 else x.shape[::-1])
        np.testing.assert_array_equal(G.undo(s, stored), x)
        np.testing.assert_array_equal(G.to_upright_labels(s, G.to_stored_labels(s, labels)), labels)
        np.testing.assert_array_equal(G.to_stored_labels(s, G.to_upright_labels(s, labels)), labels)
        inv = s.geometric_inverse()
        np.testing.assert_array_equal(G.apply_geometry(inv, G.apply_geometry(s, x)), x)
        assert set(np.unique(G.to_stored_labels(s, labels))) == set(np.unique(labels))  # values kept


def test_rotation_and_mirror_meaning():
    x = np.zeros((4, 6), np.uint8)
    x[0, 0] = 1  # film's top-left corner (apex side, patient's right)
    assert G.apply(G.State(1), x)[-1, 0] == 1  # rot90 ccw: top edge -> left edge, top-left -> bottom-left
    assert G.apply(G.State(3), x)[0, -1] == 1  # 270 ccw: top-left -> top-right
    assert G.apply(G.State(2), x)[-1, -1] == 1
    assert G.apply(G.State(0, mirrored=True), x)[0, -1] == 1
    # mirrored then rotated 90 ccw: top-left -> top-right (mirror) -> top-left (rotation)
    assert G.apply(G.State(1, mirrored=True), x)[0, 0] == 1
    np.testing.assert_array_equal(G.apply(G.State(0, inverted=True), np.array([[0, 10], [200, 255]], np.uint8)),
                                  [[255, 245], [55, 0]])


def test_preprocess_deterministic_and_shape():
    rng = np.random.default_rng(0)
    for img in (rng.integers(0, 4096, (300, 200)).astype(np.uint16), rng.random((90, 140, 3)),
                rng.integers(0, 256, (64, 64)).astype(np.uint8)):
        a, b = G.preprocess(img, 128), G.preprocess(img.copy(), 128)
        assert a.shape == (128, 128) and a.dtype == np.float32
        assert 0 <= a.min() and a.max() <= 1
        np.testing.assert_array_equal(a, b)
    assert G.preprocess(np.full((50, 80), 7.0), 32).max() == 0  # flat input: zeros, no NaN


def test_states_commute_with_preprocessing():
    """Training applies states to preprocessed films; inference preprocesses the stored film: the two must agree."""
    img = np.random.default_rng(3).integers(0, 256, (256, 256)).astype(np.uint8)
    base = G.preprocess(img, 64)
    for s in G.STATES:
        np.testing.assert_allclose(G.preprocess(G.apply(s, img), 64), T.apply_state_normalized(s.index, base),
                                   atol=1e-5)


def make_films(root, n=6, size=80, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    (root / "images").mkdir(parents=True)
    rows = ["file,split,group"]
    for i in range(n):
        lungs = (((xx - 0.3) / 0.15) ** 2 + ((yy - 0.45) / 0.3) ** 2 < 1) | \
                (((xx - 0.7) / 0.13) ** 2 + ((yy - 0.45) / 0.3) ** 2 < 1)
        heart = ((xx - 0.6) / 0.12) ** 2 + ((yy - 0.65) / 0.1) ** 2 < 1
        img = 190 - 130 * (lungs & ~heart) + rng.normal(0, 6, lungs.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"f{i}.png")
        rows.append(f"f{i}.png,{'val' if i < 2 else 'train'},synthetic")
    (root / "splits.csv").write_text("\n".join(rows) + "\n")


def test_tiny_training_resumes_evaluates_and_exports(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    make_films(tmp_path / "data" / "syn")
    overrides = [f"data.root={tmp_path / 'data'}", "data.train=[{set: syn, split: train}]",
                 "data.heldout=[{set: syn, split: val}]", "data.demo_films=null", "data.dicom_films=null", "data.dedup_correlation=null",
                 "input_size=32", "network.params.channels=[4, 8, 16]", "network.params.strides=[2, 2, 2]",
                 "training.epochs=2", "training.steps_per_epoch=2", "training.batch_size=4",
                 "training.warmup_steps=1"]
    quiet = lambda *a: None  # noqa: E731
    T.train(tmp_path / "a", overrides=overrides, log=quiet)  # uninterrupted
    T.train(tmp_path / "b", overrides=overrides, stop_after_epoch=1, log=quiet)  # interrupted after epoch 1
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    T.train(tmp_path / "b", log=quiet)  # resumes from its checkpoint and config
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k])  # resuming reproduces the uninterrupted run
    rows = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("1,") and rows[2].startswith("2,")

    full = T.nonchest_inputs
    monkeypatch.setattr(T, "nonchest_inputs", lambda: {k: v for k, v in full().items() if "RG3" not in k})  # speed
    res = T.evaluate(tmp_path / "b", log=quiet)
    m = res["sets"]["syn"]
    assert m["n_films"] == 2 and m["n_copies"] == 32 and np.array(m["confusion"]).sum() == 32
    assert all(0 <= v["max_prob"] <= 1 for v in res["nonchest"].values()) and "uniform_noise_0" in res["nonchest"]
    weights = T.export(tmp_path / "b")
    card = json.loads((weights.parent / "orientation.json").read_text())
    assert card["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert card["data"]["train_counts"] == {"syn": 4} and card["classes"][0] == "upright"
    model = T.build_model(T.load_config(tmp_path / "b" / "config.yaml"))
    model.load_state_dict(load_file(str(weights)))
