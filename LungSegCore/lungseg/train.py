"""Training from a YAML config: `lungseg train --config unet.yaml`.

Each epoch draws `samples_per_epoch` images from the training sets by their weights, so a small set (JSRT) is
not drowned by a large one (COVID-QU-Ex). `last.pt` is written after every epoch and a rerun resumes from it;
`best.pt` keeps the epoch with the best mean validation Dice.
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from .data import ArrayDataset, list_cases, load_arrays
from .losses import build_loss
from .metrics import batch_dice
from .networks import build_network, predict_logits, select_device
from .transforms import training_augmentation

log = logging.getLogger("lungseg.train")

PACKAGE_CONFIGS = Path(__file__).parent / "configs"


def load_config(path: str | Path) -> dict:
    """Read a YAML config; a bare name such as `unet` means the packaged `configs/unet.yaml`."""
    path = Path(path)
    if not path.exists() and (PACKAGE_CONFIGS / f"{path.name}.yaml").exists():
        path = PACKAGE_CONFIGS / f"{path.name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: config file not found")
    with open(path) as f:
        return yaml.safe_load(f)


def _set_sources(cfg: dict, root: Path, key: str) -> list[tuple[str, list]]:
    sources = []
    for entry in cfg["data"][key]:
        cases = list_cases(root / entry["set"], entry.get("split"))
        cases = cases[:: entry.get("every", 1)]
        sources.append((entry, cases))
    return sources


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def validate(model, val_sets, size: int, device: torch.device, batch_size: int = 16) -> dict[str, float]:
    """Mean Dice (both lungs, right, left) per validation set."""
    model.eval()
    scores = {}
    with torch.no_grad():
        for name, (images, labels) in val_sets.items():
            per_region = {"both": [], "right": [], "left": []}
            for i in range(0, len(images), batch_size):
                x = images[i:i + batch_size].float().to(device)
                pred = predict_logits(model, x).argmax(1, keepdim=True).cpu()
                for region in per_region:
                    per_region[region].append(batch_dice(pred, labels[i:i + batch_size], region))
            for region, values in per_region.items():
                scores[f"{name}/dice_{region}"] = float(torch.cat(values).mean())
    model.train()
    return scores


def _summary_writer(folder: Path):
    """TensorBoard scalars when tensorboard is installed (the `train` extra); training runs without it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed; no TensorBoard scalars for this run")
        return None
    return SummaryWriter(str(folder))


def training_loss(model, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Segmentation loss; averaged over deep-supervision outputs; plus the network's own term (the
    probabilistic U-Net's beta * KL), for networks that see the labels in training."""
    if getattr(model, "uses_labels_in_training", False):
        return loss_fn(model(x, y), y) + model.auxiliary_loss()
    logits = model(x)
    if isinstance(logits, (list, tuple)):
        return sum(loss_fn(o, y) for o in logits) / len(logits)
    return loss_fn(logits, y)


def train(config: dict, data_root: str | Path | None = None, out_dir: str | Path | None = None,
          device: str = "auto", max_steps: int | None = None, resume: bool = True) -> Path:
    """Train the network described by `config`; returns the run folder holding `best.pt` and `last.pt`."""
    from monai.data import DataLoader
    from monai.utils import set_determinism
    from tqdm import tqdm

    tcfg = config["training"]
    size = int(config["input_size"])
    root = Path(data_root or config["data"]["root"])
    out = Path(out_dir or Path("runs") / config["name"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "config.yaml", "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    set_determinism(seed=int(tcfg.get("seed", 0)))
    dev = select_device(device)

    train_sources = _set_sources(config, root, "train")
    images, labels, weights = [], [], []
    for entry, cases in train_sources:
        x, y = load_arrays(cases, size, desc=f"{entry['set']}-{entry.get('split', 'all')}")
        images.append(x)
        labels.append(y)
        weights.append(torch.full((len(cases),), float(entry.get("weight", 1.0)) / len(cases), dtype=torch.double))
    val_sets = {}
    for entry, cases in _set_sources(config, root, "val"):
        val_sets[entry["set"]] = load_arrays(cases, size, desc=f"{entry['set']}-{entry.get('split', 'all')}"
                                             f"-every{entry.get('every', 1)}")
    aug = dict(config.get("augment", {}), size=size)
    dataset = ArrayDataset(torch.cat(images), torch.cat(labels), training_augmentation(aug))
    sample_weights = torch.cat(weights)

    net_cfg = config["network"]
    model = build_network(net_cfg["name"], **net_cfg.get("params", {})).to(dev)
    loss_cfg = tcfg.get("loss", "dice_ce")
    loss_fn = build_loss(loss_cfg) if isinstance(loss_cfg, str) else build_loss(loss_cfg["name"], **loss_cfg.get("params", {}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(tcfg["lr"]), weight_decay=float(tcfg.get("weight_decay", 0)))
    epochs = int(tcfg["epochs"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    use_amp = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, best, history, stale = 0, -1.0, [], 0
    last = out / "last.pt"
    if resume and last.exists():
        state = torch.load(last, weights_only=True, map_location=dev)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start_epoch, best, stale = state["epoch"] + 1, state["best"], state["stale"]
        history = json.loads((out / "history.json").read_text()) if (out / "history.json").exists() else []
        log.info("resumed from %s at epoch %d", last, start_epoch)

    board = _summary_writer(out / "tensorboard")
    samples = int(tcfg["samples_per_epoch"])
    batch_size = int(tcfg["batch_size"])
    patience = int(tcfg.get("early_stopping_patience", epochs))
    steps = 0
    for epoch in range(start_epoch, epochs):
        generator = torch.Generator().manual_seed(int(tcfg.get("seed", 0)) * 1000 + epoch)
        sampler = torch.utils.data.WeightedRandomSampler(sample_weights, samples, replacement=True, generator=generator)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=int(tcfg.get("num_workers", 0)),
                            drop_last=True, persistent_workers=False)
        t0, running = time.time(), []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for batch in bar:
            x, y = batch["image"].to(dev), batch["label"].to(dev)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, enabled=use_amp):
                loss = training_loss(model, loss_fn, x, y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            running.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(running[-20:]):.4f}")
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        scheduler.step()
        scores = validate(model, val_sets, size, dev)
        score = float(np.mean([v for k, v in scores.items() if k.endswith("dice_both")]))
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(running)), "val_score": score,
                  "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0, **scores}
        history.append(record)
        if board is not None:
            for key, value in record.items():
                if key != "epoch":
                    board.add_scalar(key, value, epoch + 1)
            board.flush()
        log.info(json.dumps(record))
        print(json.dumps(record), flush=True)
        improved = score > best
        if improved:
            best, stale = score, 0
            torch.save({"model": model.state_dict(), "epoch": epoch, "scores": scores, "config": config},
                       out / "best.pt.tmp")
            (out / "best.pt.tmp").replace(out / "best.pt")
        else:
            stale += 1
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "rng": _rng_state(), "epoch": epoch, "best": best, "stale": stale}
        torch.save(state, out / "last.pt.tmp")
        (out / "last.pt.tmp").replace(last)
        (out / "history.json").write_text(json.dumps(history, indent=1))
        if (max_steps is not None and steps >= max_steps) or stale >= patience:
            break
    log.removeHandler(handler)
    if board is not None:
        board.close()
    return out
