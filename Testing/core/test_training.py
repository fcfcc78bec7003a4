"""Training smoke runs: a few real optimizer steps, checkpoints that reload safely, resume, and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from lungseg.errors import LungSegError
from lungseg.models.cards import load_network
from lungseg.training.config import load_config
from lungseg.training.export import build_card, export_run, run_environment
from lungseg.training.trainer import train


def make_dataset(root, n=8, size=64, seed=0):
    """Synthetic radiograph-like images: two dark elliptical 'lungs' on a bright body, with merged masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    rows = ["file,split,group"]
    for i in range(n):
        cx = 0.27 + rng.uniform(-0.03, 0.03)
        lungs = (((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1) | (
            ((xx - (1 - cx)) / 0.16) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1
        )
        image = 180 - 120 * lungs + rng.normal(0, 8, lungs.shape)
        name = f"case{i}.png"
        sitk.WriteImage(sitk.GetImageFromArray(np.clip(image, 0, 255).astype(np.uint8)), str(root / "images" / name))
        sitk.WriteImage(sitk.GetImageFromArray((lungs * 255).astype(np.uint8)), str(root / "masks" / name))
        rows.append(f"{name},{'val' if i < 2 else 'train'},synthetic")
    (root / "splits.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture
def config(tmp_path):
    make_dataset(tmp_path / "data" / "synthetic")
    cfg = load_config("unet")
    cfg["name"] = "smoke"
    cfg["input_size"] = 64
    cfg["network"]["params"] = {"channels": [8, 16, 32], "num_res_units": 1}
    cfg["data"] = {
        "root": str(tmp_path / "data"),
        "train": [{"set": "synthetic", "split": "train"}],
        "val": [{"set": "synthetic", "split": "val"}],
    }
    cfg["training"].update(epochs=2, samples_per_epoch=8, batch_size=4, num_workers=0)
    return cfg


def test_train_checkpoints_reload_and_resume(tmp_path, config, monkeypatch):
    monkeypatch.setenv("LUNGSEG_CACHE", str(tmp_path / "cache"))
    run = train(config, out_dir=tmp_path / "run", device="cpu", max_steps=2)
    last = torch.load(run / "last.pt", weights_only=True)
    best = torch.load(run / "best.pt", weights_only=True)
    assert (last["epoch"], last["step"]) == (1, 0) and set(last) >= {"model", "optimizer", "scheduler", "rng"}
    assert best["config"]["name"] == "smoke"
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])
    assert (run / "train.log").read_text().count('"epoch": 1') == 1
    assert list((run / "tensorboard").glob("events.out.tfevents.*")), "TensorBoard scalars"

    train(config, out_dir=run, device="cpu")  # resumes at epoch 2 and finishes
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert "resumed from" in (run / "train.log").read_text()
    environment = json.loads((run / "environment.json").read_text())  # one entry per start, for the model card
    assert [e["from_epoch"] for e in environment] == [1, 2] and environment[0]["hardware"].endswith("CPU x1")
    assert (run / "curves.png").stat().st_size > 10000 and (run / "cases.png").stat().st_size > 10000
    assert {"train/dice", "train/iou", "synthetic/loss", "synthetic/iou", "synthetic/dice_both"} <= set(history[-1])
    weights_changed = any(
        not torch.equal(a, b)
        for a, b in zip(last["model"].values(), torch.load(run / "last.pt", weights_only=True)["model"].values())
    )
    assert weights_changed


def test_export_writes_safetensors_and_a_measured_card(tmp_path, config, monkeypatch):
    """The exported weights are best.pt's, tensor by tensor, and the card's Dice is a measurement of them: a
    fresh evaluation of the exported file gives it again, while a randomly initialised network scores far off."""
    import onnx
    from safetensors.torch import load_file

    from lungseg.evaluation.evaluate import evaluate
    from lungseg.nets.networks import build_network
    from lungseg.training.export import write_model

    monkeypatch.setenv("LUNGSEG_CACHE", str(tmp_path / "cache"))
    config["training"].update(epochs=2, samples_per_epoch=64)  # 32 steps: val Dice ~0.95, random networks 0-0.7
    run = train(config, out_dir=tmp_path / "run", device="cpu")
    card_path = export_run(run, tmp_path / "models", device="cpu")
    card = json.loads(card_path.read_text())
    assert card["metrics"]["synthetic/val"]["images"] == 2
    # where it trained, as the run recorded it, not where it was exported
    assert card["training"]["hardware"] == json.loads((run / "environment.json").read_text())[0]["hardware"]
    (run / "environment.json").write_text(
        json.dumps(
            [
                {
                    "from_epoch": 1,
                    "hardware": "NVIDIA H100 80GB HBM3",
                    "processes": 1,
                    "torch": "2.11.0",
                    "monai": "1.6.1",
                }
            ]
        )
    )
    assert build_card(config, [], 0, run_environment(run))["training"]["hardware"] == "NVIDIA H100 80GB HBM3"
    carded = card["metrics"]["synthetic/val"]["both_dice"]["mean"]

    best = torch.load(run / "best.pt", weights_only=True)["model"]
    exported = load_file(str(card_path.with_suffix(".safetensors")))
    assert set(exported) == set(best)
    for key, tensor in best.items():
        assert torch.equal(exported[key], tensor), f"exported {key} is not best.pt's"

    data = tmp_path / "data" / "synthetic"

    def val_dice(model_card) -> float:
        return evaluate(data / "images", data / "masks", model=str(model_card), split="val", device="cpu")["both_dice"][
            "mean"
        ]

    assert val_dice(card_path) == pytest.approx(carded, abs=1e-6), "the card reports what its weights score"
    graph = onnx.load(card_path.parent / card["onnx"]["graphs"][0]["file"], load_external_data=False)
    assert card["onnx"]["weights"] == card_path.with_suffix(".safetensors").name
    assert graph.graph.initializer and all(  # the graph reads its weights from the safetensors: shipped once
        t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained = build_network(config["network"]["name"], **config["network"]["params"])
    random_card = write_model(untrained, dict(card, name="untrained"), tmp_path / "random")
    assert carded > val_dice(random_card) + 0.2, "the check tells the trained weights from random ones"

    model, loaded = load_network(card_path)
    assert loaded["sha256"] == card["sha256"]
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 3, 64, 64)

    # exporting again would replace the model, its measured card and any fitted QC: only when asked to
    stored = card_path.read_text()
    with pytest.raises(
        LungSegError, match=f"{card_path}: a model named '{card['name']}' is already there; --overwrite replaces it"
    ):
        export_run(run, tmp_path / "models", device="cpu")
    assert card_path.read_text() == stored
    assert export_run(run, tmp_path / "models", device="cpu", overwrite=True) == card_path
    # a shipped model's name would leave `--model unet` two models to choose from
    with pytest.raises(
        LungSegError,
        match="a model named 'unet' is already in .*lungseg/models/shipped; export this one under another name",
    ):
        export_run(run, tmp_path / "elsewhere", device="cpu", name="unet")
    assert not (tmp_path / "elsewhere").exists()


def test_two_runs_export_as_their_ensemble(tmp_path, config, monkeypatch):
    """Two runs make one model whose probabilities are the mean of its members' own, each member fed at the size it
    was trained at; its card is measured like any other and records both recipes and the speed. Runs of two lung
    definitions refuse to ensemble."""
    import torch.nn.functional as F

    from lungseg.evaluation.evaluate import evaluate
    from lungseg.training.export import ensemble_card, export_model, model_from_run

    monkeypatch.setenv("LUNGSEG_CACHE", str(tmp_path / "cache"))
    config["training"].update(epochs=1, samples_per_epoch=32)
    run_a = train(config, out_dir=tmp_path / "a", device="cpu")
    run_b = train(
        dict(config, input_size=96, training=dict(config["training"], seed=1)), out_dir=tmp_path / "b", device="cpu"
    )
    card_path = export_run([run_a, run_b], tmp_path / "models", device="cpu", name="smoke-ensemble")
    card = json.loads(card_path.read_text())
    assert card["name"] == "smoke-ensemble" and card["network"]["name"] == "ensemble" and card["input_size"] == 96
    assert [m["input_size"] for m in card["network"]["params"]["members"]] == [64, 96]
    assert [c["input_size"] for c in card["recipe"]["ensemble"]] == [64, 96] and len(card["training"]["members"]) == 2
    assert card["speed"]["forward_ms_per_image"] > 0 and card["speed"]["threads"] == 1

    ensemble, _ = load_network(card_path)
    a, b = model_from_run(run_a)[0].eval(), model_from_run(run_b)[0].eval()
    x = torch.rand(1, 1, 96, 96)
    with torch.no_grad():
        small = a(F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True))
        expected = (
            F.interpolate(torch.softmax(small, 1), size=(96, 96), mode="bilinear", align_corners=False)
            + torch.softmax(b(x), 1)
        ) / 2
        assert torch.allclose(torch.softmax(ensemble(x), 1), expected, atol=1e-5)
        assert not torch.allclose(expected, torch.softmax(b(x), 1), atol=1e-3), "member a changes the mean"

    data = tmp_path / "data" / "synthetic"
    measured = evaluate(data / "images", data / "masks", model=str(card_path), split="val", device="cpu")
    assert measured["both_dice"]["mean"] == pytest.approx(
        card["metrics"]["synthetic/val"]["both_dice"]["mean"], abs=1e-6
    )
    # `lungseg export --from-model` writes an ensemble's graphs again and measures it on its members' val sets
    card_path.with_suffix(".json").write_text(json.dumps(dict(card, metrics={})))
    assert export_model(str(card_path), device="cpu") == card_path
    again = json.loads(card_path.read_text())
    assert again["metrics"]["synthetic/val"]["both_dice"]["mean"] == pytest.approx(measured["both_dice"]["mean"])
    history = json.loads((run_a / "history.json").read_text())
    with pytest.raises(LungSegError, match="different lung definitions"):
        ensemble_card([(config, history, 0, None), (dict(config, definition="full-extent"), history, 0, None)], "mixed")


def test_seed_option_trains_another_member_of_the_recipe(tmp_path, config, monkeypatch):
    """`lungseg train --seed N` keeps the recipe and changes only its seed and name (runs/<name>-seedN), so the two
    runs differ and export as an ensemble."""
    import yaml

    from lungseg.cli import main

    monkeypatch.setenv("LUNGSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", "smoke.yaml", "--seed", "3", "--max-steps", "2", "--device", "cpu"]) == 0
    saved = torch.load(tmp_path / "runs" / "smoke-seed3" / "best.pt", weights_only=True)["config"]
    assert saved["training"]["seed"] == 3 and saved["name"] == "smoke-seed3"
    assert {k: v for k, v in saved.items() if k not in ("name", "training")} == {
        k: v for k, v in config.items() if k not in ("name", "training")
    }


@pytest.mark.parametrize("name", ["dice_ce", "bce_dice", "bce_iou"])
def test_losses_from_config_fall_as_the_prediction_improves(name):
    from lungseg.training.losses import build_loss

    loss_fn = build_loss(name)
    y = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    y[..., 8:24, 4:14], y[..., 8:24, 18:28] = 1, 2
    perfect = torch.nn.functional.one_hot(y[:, 0], 3).permute(0, 3, 1, 2).float() * 20 - 10
    assert loss_fn(perfect, y) < loss_fn(torch.zeros(1, 3, 32, 32), y) < loss_fn(-perfect, y)


def test_resume_mid_epoch_continues_at_the_same_step(tmp_path, config, monkeypatch):
    """Killed after 3 of 4 steps, resumed: the same weights as a run that was never interrupted."""
    monkeypatch.setenv("LUNGSEG_CACHE", str(tmp_path / "cache"))
    config["training"].update(epochs=1, samples_per_epoch=16, checkpoint_every_steps=1)
    straight = train(config, out_dir=tmp_path / "straight", device="cpu")
    interrupted = train(config, out_dir=tmp_path / "interrupted", device="cpu", max_steps=3)
    state = torch.load(interrupted / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 3)
    train(config, out_dir=interrupted, device="cpu")
    assert (
        "resumed from" in (interrupted / "train.log").read_text()
        and "step 3" in (interrupted / "train.log").read_text()
    )
    a = torch.load(straight / "last.pt", weights_only=True)["model"]
    b = torch.load(interrupted / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_with_gloo(tmp_path, config):
    """`torchrun --nproc_per_node=2 -m lungseg train`: both ranks train, rank 0 alone validates and writes."""
    import subprocess
    import sys

    import yaml

    config["training"].update(epochs=1, samples_per_epoch=16, num_workers=0)
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(config))
    env = dict(__import__("os").environ, LUNGSEG_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "lungseg",
            "train",
            "--config",
            str(tmp_path / "smoke.yaml"),
            "--device",
            "cpu",
            "-o",
            str(tmp_path / "ddp"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "ddp" / "history.json").read_text())
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])
    assert (tmp_path / "ddp" / "train.log").read_text().count('"epoch": 1') == 1, "only rank 0 logs"
    state = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 0)


@pytest.mark.data
@pytest.mark.parametrize(
    "name",
    sorted(
        p.stem
        for p in __import__("lungseg.training.config", fromlist=["x"]).PACKAGE_CONFIGS.glob("*.yaml")
        if not p.stem.startswith("orientation")  # the orientation classifier's: test_orientation_training.py
    ),
)
def test_packaged_configs_build_and_find_their_data(name):
    from conftest import SHARED_DATA, require_or_skip

    from lungseg.training.augment import training_augmentation
    from lungseg.training.config import data_sources

    cfg = load_config(name)
    assert cfg["definition"] in ("lung-fields", "full-extent")
    model = build_network_from(cfg)
    size = cfg["input_size"]
    from lungseg.nets.networks import predict_logits

    assert predict_logits(model.eval(), torch.zeros(1, 1, size, size)).shape == (1, 3, size, size)
    training_augmentation(dict(cfg.get("augment", {}), size=size))
    if not SHARED_DATA.is_dir():
        require_or_skip(f"research data not found at {SHARED_DATA}")
    for key in ("train", "val", "test"):
        for entry, cases in data_sources(cfg, SHARED_DATA, key):
            assert cases, (name, key, entry)


def build_network_from(cfg):
    from lungseg.nets.networks import build_network

    return build_network(cfg["network"]["name"], **cfg["network"].get("params", {}))


def test_ignored_pixels_count_neither_way():
    from lungseg.inference.labels import IGNORE
    from lungseg.training.losses import build_loss
    from lungseg.training.validation import overlap

    y = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    y[..., 4:12, 2:7], y[..., 4:12, 9:14] = 1, 2
    y[..., :3, :] = IGNORE
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    build_loss("dice_ce_ignore")(x, y).backward()
    assert x.grad[..., :3, :].abs().sum() == 0 and x.grad[..., 3:, :].abs().sum() > 0
    pred = torch.where(y == IGNORE, torch.ones_like(y), y)  # "lung" painted over the ignored band
    assert overlap(pred, y)[0].item() == pytest.approx(1.0)


def test_a_second_stage_starts_from_the_first_stages_weights(tmp_path, config, monkeypatch):
    from lungseg.training.trainer import Trainer

    monkeypatch.setenv("LUNGSEG_CACHE", str(tmp_path / "cache"))
    first = train(config, out_dir=tmp_path / "stage1", device="cpu", max_steps=2)
    second = dict(config, name="smoke-stage2", training=dict(config["training"], init_from=str(first / "best.pt")))
    trainer = Trainer(second, out_dir=tmp_path / "stage2", device="cpu")
    start = torch.load(first / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(start[k], v) for k, v in trainer.core.state_dict().items())
    fresh = Trainer(config, out_dir=tmp_path / "fresh", device="cpu")
    assert not all(torch.equal(start[k], v) for k, v in fresh.core.state_dict().items())
    # the shipped UNet++ is such a two-stage recipe, both stages packaged
    assert load_config("unetpp")["training"]["init_from"] == "runs/unetpp-stage1/best.pt"
    assert load_config("unetpp-stage1")["network"] == load_config("unetpp")["network"]
