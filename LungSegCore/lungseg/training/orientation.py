"""Training and held-out evaluation of the orientation classifier (a MONAI Classifier over the 16 states).

    python -m lungseg.training.orientation train    --run runs/orientation [--config orientation]
    python -m lungseg.training.orientation evaluate --run runs/orientation
    python -m lungseg.training.orientation export   --run runs/orientation [--out DIR]

A run folder holds config.yaml (the recipe), cache.npz, checkpoint.pt (written every epoch; `train` resumes from
it), log.csv, TensorBoard events, evaluation.json and the export. The model is the last epoch of a fixed schedule.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from ..inference.orientation import STATES, UPRIGHT, apply_to_input
from ..inference.orientation_classifier import (
    INPUT_SIZE,
    MIN_PROBABILITY,
    MIRROR_PROBABILITY,
    combine_mirror,
    decide,
    two_passes,
)
from ..io.files import save_checkpoint, write_atomic_text
from .config import initial_weights, load_config
from .orientation_data import Batches, build_cache

MIRRORED = np.array([s.mirrored for s in STATES])
TURNS = np.array([s.k for s in STATES])
INVERTED = np.array([s.inverted for s in STATES])


def build_model(cfg: dict) -> torch.nn.Module:
    from monai.networks.nets import Classifier

    return Classifier(in_shape=(1, INPUT_SIZE, INPUT_SIZE), classes=len(STATES), **cfg["network"]["params"])


def learning_rate(step: int, training: dict) -> float:
    """Linear warm-up, then a cosine decay to 0 at the last step."""
    total = training["epochs"] * training["steps_per_epoch"]
    warm = min(training.get("warmup_steps", 0), total - 1)
    if step < warm:
        return training["lr"] * (step + 1) / warm
    return training["lr"] * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


@torch.inference_mode()
def logits_of(model: torch.nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """(N, 16) logits of (N, 128, 128) classifier inputs."""
    model.eval()
    chunks = [
        model(torch.from_numpy(np.asarray(x[i : i + batch], np.float32)[:, None])) for i in range(0, len(x), batch)
    ]
    return torch.cat(chunks).double().numpy() if chunks else np.zeros((0, len(STATES)))


def state_probabilities(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """(N, 16) probabilities as inference computes them: the input and its mirror image, combined."""
    return combine_mirror(logits_of(model, x), logits_of(model, np.ascontiguousarray(x[..., ::-1])))


def share(mask: np.ndarray, hit: np.ndarray) -> float | None:
    return float(hit[mask].mean()) if mask.any() else None


def state_metrics(true: np.ndarray, probabilities: np.ndarray, mirrored: np.ndarray) -> dict:
    """The decisions inference makes (`decide`) on copies in the `true` states: on the films as stored, how many
    were corrected and how many flagged; on the changed copies, how many were corrected exactly; and the swaps:
    a mirror decision that is wrong, and among them the silent ones (not flagged)."""
    findings = [decide(p, m) for p, m in zip(probabilities, mirrored)]
    applied = np.array([f.applied.index for f in findings])
    flagged = np.array([bool(f.reasons) for f in findings])
    stored, wrong_side = true == UPRIGHT.index, MIRRORED[applied] != MIRRORED[true]
    return {
        "films": int(stored.sum()),
        "stored_called_changed": share(stored, applied != UPRIGHT.index),
        "stored_flagged": share(stored, flagged),
        "mirrored_recognised": share(MIRRORED[true], MIRRORED[applied]),
        "turned_corrected": share(TURNS[true] != 0, TURNS[applied] == TURNS[true]),
        "inverted_corrected": share(INVERTED[true], INVERTED[applied]),
        "exact_state": float((applied == true).mean()),
        "swaps": int(wrong_side.sum()),
        "silent_swaps": int((wrong_side & ~flagged).sum()),
    }


def copies(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every film in every state, and the states."""
    return np.stack([apply_to_input(s, f) for f in x for s in STATES]), np.tile(np.arange(len(STATES)), len(x))


def heldout_metrics(model: torch.nn.Module, cache: dict, cap: int | None = None) -> dict:
    """state_metrics per held-out set (at most `cap` films of each, evenly spaced)."""
    out = {}
    for name in dict.fromkeys(cache["heldout_set"].tolist()):
        idx = np.flatnonzero(cache["heldout_set"] == name)
        if cap and len(idx) > cap:
            idx = idx[np.linspace(0, len(idx) - 1, cap).round().astype(int)]
        x, true = copies(cache["heldout_x"][idx].astype(np.float32))
        out[name] = state_metrics(true, *two_passes(lambda images: state_probabilities(model, images), x))
    return out


def start_run(run: Path, config: str | None) -> dict:
    """The run's recipe: its config.yaml when resuming, else the named config, copied there."""
    run.mkdir(parents=True, exist_ok=True)
    if (run / "config.yaml").exists():
        return load_config(run / "config.yaml")
    cfg = load_config(config or "orientation")
    write_atomic_text(yaml.safe_dump(cfg, sort_keys=False), run / "config.yaml")
    return cfg


def resume(run: Path, cfg: dict, model, optimizer, rng: np.random.Generator) -> int:
    """Load run/checkpoint.pt when there is one, else `init_from`; returns the first epoch to train."""
    path = run / "checkpoint.pt"
    if not path.exists():
        if cfg["training"].get("init_from"):
            model.load_state_dict(initial_weights(cfg["training"]["init_from"]))
        return 1
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own checkpoint: it holds RNG states
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    return state["epoch"] + 1


def train_epoch(model, optimizer, batches: Batches, epoch: int, training: dict) -> dict:
    """One epoch: cross-entropy on the films, and on the non-chest inputs the distance from a uniform answer."""
    model.train()
    weight = (training.get("outlier_exposure") or {}).get("weight", 0.0)
    totals, t0 = np.zeros(3), time.time()
    for i in range(training["steps_per_epoch"]):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate((epoch - 1) * training["steps_per_epoch"] + i, training)
        x, y, outliers = batches.next()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits[: len(y)], y)
        spread = -torch.log_softmax(logits[len(y) :], 1).mean() - math.log(len(STATES)) if outliers else 0 * loss
        optimizer.zero_grad(set_to_none=True)
        (loss + weight * spread).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), training.get("grad_clip", 1.0))
        optimizer.step()
        totals += (loss.item(), spread.item(), (logits[: len(y)].argmax(1) == y).float().mean().item())
    loss, spread, accuracy = totals / training["steps_per_epoch"]
    return {
        "epoch": epoch,
        "loss": round(loss, 4),
        "outlier_loss": round(spread, 4),
        "train_accuracy": round(accuracy, 4),
        "seconds": round(time.time() - t0, 1),
    }


def log_epoch(run: Path, row: dict, monitor: dict, writer) -> None:
    flat = {**row, **{f"{s}:{k}": v for s, m in monitor.items() for k, v in m.items()}}
    new = not (run / "log.csv").exists()
    with open(run / "log.csv", "a", newline="") as f:
        out = csv.DictWriter(f, list(flat))
        if new:
            out.writeheader()
        out.writerow(flat)
    for key, value in flat.items():
        if key != "epoch" and isinstance(value, (int, float)):
            writer.add_scalar(key.replace(":", "/"), value, row["epoch"])
    writer.flush()
    print(time.strftime("%H:%M:%S"), json.dumps(flat), flush=True)


def train(run: str | Path, config: str | None = None, stop_after: int | None = None) -> Path:
    """Train into `run`, resuming from its checkpoint; `stop_after` ends this call after that epoch."""
    from torch.utils.tensorboard import SummaryWriter

    run = Path(run)
    cfg = start_run(run, config)
    training = cfg["training"]
    torch.manual_seed(training["seed"])
    rng = np.random.default_rng(training["seed"])
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training["lr"], weight_decay=training["weight_decay"])
    first = resume(run, cfg, model, optimizer, rng)
    cache = build_cache(cfg, run)
    batches = Batches(cache, cfg, rng)
    with SummaryWriter(str(run / "tb")) as writer:
        for epoch in range(first, training["epochs"] + 1):
            row = train_epoch(model, optimizer, batches, epoch, training)
            monitor = heldout_metrics(model, cache, cfg["data"].get("monitor_max_per_set"))
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
            save_checkpoint(
                {**state, "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()},
                run / "checkpoint.pt",
            )
            log_epoch(run, row, monitor, writer)
            if stop_after is not None and epoch >= stop_after:
                break
    return run / "checkpoint.pt"


def trained(run: Path) -> tuple[torch.nn.Module, dict, int]:
    cfg = load_config(run / "config.yaml")
    model = build_model(cfg)
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, state["epoch"]


def evaluate(run: str | Path) -> dict:
    """Every held-out film in all 16 states; writes run/evaluation.json."""
    run = Path(run)
    model, cfg, epoch = trained(run)
    cache = build_cache(cfg, run)
    sets = heldout_metrics(model, cache)
    thresholds = {"min_probability": MIN_PROBABILITY, "mirror_probability": MIRROR_PROBABILITY}
    result = {"epoch": epoch, **thresholds, "sets": sets}
    write_atomic_text(json.dumps(result, indent=1), run / "evaluation.json")
    for name, metrics in sets.items():
        print(name, json.dumps(metrics))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lungseg.training.orientation", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["train", "evaluate", "export"])
    parser.add_argument("--run", required=True, help="run folder (resumed when it holds checkpoint.pt)")
    parser.add_argument("--config", help="recipe for a new run (default: the packaged orientation.yaml)")
    parser.add_argument("--out", help="export folder (default RUN/export)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.command == "train":
        train(args.run, args.config)
    elif args.command == "evaluate":
        evaluate(args.run)
    else:
        from .orientation_export import export

        print(export(Path(args.run), args.out))


if __name__ == "__main__":
    main()
