"""Training from a YAML config: `lungseg train --config unet.yaml` (also `scripts/train.py`, and under `torchrun`).

Each epoch draws `samples_per_epoch` images from the training sets by their weights, so a small set (JSRT) is
not drowned by a large one (COVID-QU-Ex). The draw is seeded per epoch, so a run killed mid-epoch resumes at the
same epoch and step from `last.pt` (written every `checkpoint_every_steps` and at each epoch end) with the optimizer,
scheduler, scaler and RNG states. `best.pt` keeps the epoch with the best mean validation Dice. Each epoch logs
loss, IoU and Dice for train, val and (if configured) test, to `history.json`, `train.log` and TensorBoard; the
end of training draws `curves.png` and `cases.png` (worst and best validation cases).

Multi-GPU and multi-node: `torchrun --nproc_per_node=N -m lungseg train --config ...` (PyTorch DDP; NCCL on
CUDA, gloo on CPU). Each rank takes every N-th sample of the epoch's draw; rank 0 validates and writes.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from .data import ArrayDataset, EpochSamples, list_cases, load_arrays, split_by_ratio
from .labels import IGNORE
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


def data_sources(cfg: dict, root: Path, key: str) -> list[tuple[dict, list]]:
    """The cases of each entry of `data.<key>`: a `split` of splits.csv, or a seeded `ratios` split."""
    sources = []
    for entry in cfg["data"].get(key) or []:
        if "ratios" in entry:
            cases = split_by_ratio(list_cases(root / entry["set"]), entry["ratios"], int(entry.get("seed", 0)))
            cases = cases[entry["split"]]
        else:
            cases = list_cases(root / entry["set"], entry.get("split"))
        sources.append((entry, cases[:: entry.get("every", 1)]))
    return sources


def _load_sets(cfg: dict, root: Path, key: str, size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    sets = {}
    for entry, cases in data_sources(cfg, root, key):
        tag = f"{entry['set']}-{entry.get('split', 'all')}-every{entry.get('every', 1)}"
        sets[entry["set"]] = load_arrays(cases, size, desc=tag)
    return sets


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def _summary_writer(folder: Path):
    """TensorBoard scalars when tensorboard is installed (the `train` extra); training runs without it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed; no TensorBoard scalars for this run")
        return None
    return SummaryWriter(str(folder))


def training_loss(model, loss_fn, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits): the segmentation loss, averaged over deep-supervision outputs, plus the network's own term
    (the probabilistic U-Net's beta * KL) for networks that see the labels in training."""
    core = model.module if hasattr(model, "module") else model
    if getattr(core, "uses_labels_in_training", False):
        logits = model(x, y)
        return loss_fn(logits, y) + core.auxiliary_loss(), logits
    logits = model(x)
    if isinstance(logits, (list, tuple)):
        return sum(loss_fn(o, y) for o in logits) / len(logits), logits[-1]
    return loss_fn(logits, y), logits


def scorable(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The truth with IGNORE pixels set to the prediction, so they count neither for nor against it."""
    return torch.where(truth == IGNORE, pred.to(truth.dtype), truth)


def overlap(pred: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU of the both-lung region."""
    pred, truth = pred.cpu(), truth.cpu()
    dice = batch_dice(pred, scorable(pred, truth), "both")
    return dice, dice / (2 - dice)


@torch.no_grad()
def evaluate_sets(model, loss_fn, sets: dict, device: torch.device, batch_size: int = 16) -> tuple[dict, dict]:
    """Loss, IoU and Dice (both lungs; Dice also per lung) per set, and the per-image Dice."""
    model.eval()
    scores, per_image = {}, {}
    for name, (images, labels) in sets.items():
        losses, dice = [], {"both": [], "right": [], "left": []}
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].float().to(device)
            y = labels[i:i + batch_size].long()
            logits = predict_logits(model, x).float()
            losses.append(float(loss_fn(logits, y.to(device))) * len(x))
            pred = logits.argmax(1, keepdim=True).cpu()
            for region in dice:
                dice[region].append(batch_dice(pred, scorable(pred, y), region))
        both = torch.cat(dice["both"])
        scores.update({f"{name}/loss": sum(losses) / len(images), f"{name}/iou": float((both / (2 - both)).mean()),
                       **{f"{name}/dice_{r}": float(torch.cat(v).mean()) for r, v in dice.items()}})
        per_image[name] = both
    model.train()
    return scores, per_image


class Trainer:
    def __init__(self, config: dict, data_root: str | Path | None = None, out_dir: str | Path | None = None,
                 device: str = "auto"):
        from monai.utils import set_determinism

        self.config, self.tcfg = config, config["training"]
        self.size = int(config["input_size"])
        self.root = Path(data_root or config["data"]["root"])
        self.out = Path(out_dir or Path("runs") / config["name"])
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.main = self.rank == 0
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
        self.device = select_device(device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        set_determinism(seed=int(self.tcfg.get("seed", 0)) + self.rank)

        images, labels, weights = [], [], []
        for entry, cases in data_sources(config, self.root, "train"):
            x, y = load_arrays(cases, self.size, desc=f"{entry['set']}-{entry.get('split', 'all')}")
            images.append(x)
            labels.append(y)
            weights.append(torch.full((len(cases),), float(entry.get("weight", 1.0)) / len(cases), dtype=torch.double))
        self.dataset = ArrayDataset(torch.cat(images), torch.cat(labels),
                                    training_augmentation(dict(config.get("augment", {}), size=self.size)))
        self.sample_weights = torch.cat(weights)
        self.val_sets = _load_sets(config, self.root, "val", self.size)
        self.test_sets = _load_sets(config, self.root, "test", self.size)

        net = config["network"]
        self.model = build_network(net["name"], **net.get("params", {})).to(self.device)
        if self.tcfg.get("init_from"):  # a second stage that continues from an earlier run's weights
            start = torch.load(self.tcfg["init_from"], weights_only=True, map_location=self.device)
            self.model.load_state_dict(start.get("model", start))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            self.model = self.model.to(memory_format=torch.channels_last)
        self.core = self.model
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        loss_cfg = self.tcfg.get("loss", "dice_ce")
        self.loss_fn = build_loss(loss_cfg) if isinstance(loss_cfg, str) else \
            build_loss(loss_cfg["name"], **loss_cfg.get("params", {}))
        self.epochs = int(self.tcfg["epochs"])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=float(self.tcfg["lr"]),
                                           weight_decay=float(self.tcfg.get("weight_decay", 0)))
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.epochs)
        self.amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.epoch, self.step, self.best, self.stale, self.history = 0, 0, -1.0, 0, []
        self.running: dict[str, list[float]] = {"loss": [], "dice": [], "iou": []}

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save_last(self) -> None:
        if not self.main:
            return
        state = {"model": self.core.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": _rng_state(),
                 "epoch": self.epoch, "step": self.step, "best": self.best, "stale": self.stale,
                 "running": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.running.items()}}
        torch.save(state, self.out / "last.pt.tmp")
        (self.out / "last.pt.tmp").replace(self.out / "last.pt")
        (self.out / "history.json").write_text(json.dumps(self.history, indent=1))

    def resume(self) -> bool:
        last = self.out / "last.pt"
        if not last.exists():
            return False
        state = torch.load(last, weights_only=True, map_location=self.device)
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.epoch, self.step = state["epoch"], state.get("step", 0)
        self.best, self.stale = state["best"], state["stale"]
        self.running = {k: v.tolist() for k, v in state.get("running", {}).items()} or self.running
        history = self.out / "history.json"
        self.history = json.loads(history.read_text()) if history.exists() else []
        log.info("resumed from %s at epoch %d, step %d", last, self.epoch + 1, self.step)
        return True

    # -- one epoch ------------------------------------------------------------------------------------------
    def epoch_samples(self) -> EpochSamples:
        """This rank's share of the epoch's seeded draw, from the current step on, each with its augmentation
        seed fixed by (seed, epoch, position): the same whatever the resume point or the worker count."""
        seed = int(self.tcfg.get("seed", 0))
        generator = torch.Generator().manual_seed(seed * 1000 + self.epoch)
        draw = list(torch.utils.data.WeightedRandomSampler(self.sample_weights, int(self.tcfg["samples_per_epoch"]),
                                                           replacement=True, generator=generator))
        seeds = [(seed * 1_000_003 + self.epoch * 100_003 + k) % 2**31 for k in range(len(draw))]
        batch = int(self.tcfg["batch_size"])
        keep = len(draw[self.rank::self.world]) // batch * batch
        start = self.step * batch
        return EpochSamples(self.dataset, draw[self.rank::self.world][start:keep],
                            seeds[self.rank::self.world][start:keep])

    def run_epoch(self, max_steps: int | None) -> bool:
        """Train until the epoch ends (True) or `max_steps` total steps were taken in this call (False)."""
        from monai.data import DataLoader
        from tqdm import tqdm

        samples = self.epoch_samples()
        loader = DataLoader(samples, batch_size=int(self.tcfg["batch_size"]), shuffle=False,
                            num_workers=int(self.tcfg.get("num_workers", 0)), drop_last=True)
        every = int(self.tcfg.get("checkpoint_every_steps", 50))
        remaining = len(samples) // int(self.tcfg["batch_size"])
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{self.epochs}", leave=False, disable=not self.main or None)
        taken = 0
        for batch in bar:
            x, y = batch["image"].to(self.device), batch["label"].to(self.device)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, enabled=self.amp):
                loss, logits = training_loss(self.model, self.loss_fn, x, y)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            dice, iou = overlap(logits.detach().argmax(1, keepdim=True), y)
            self.running["loss"].append(loss.item())
            self.running["dice"].append(float(dice.mean()))
            self.running["iou"].append(float(iou.mean()))
            bar.set_postfix(loss=f"{np.mean(self.running['loss'][-20:]):.4f}")
            self.step += 1
            taken += 1
            if self.step % every == 0:
                self.save_last()
            if max_steps is not None and taken >= max_steps and taken < remaining:
                self.save_last()
                return False
        return True

    def end_epoch(self, seconds: float) -> None:
        self.scheduler.step()
        record = {"epoch": self.epoch + 1, "train_loss": float(np.mean(self.running["loss"])),
                  "train/loss": float(np.mean(self.running["loss"])), "train/dice": float(np.mean(self.running["dice"])),
                  "train/iou": float(np.mean(self.running["iou"]))}
        if self.main:
            val, _ = evaluate_sets(self.core, self.loss_fn, self.val_sets, self.device)
            test, _ = evaluate_sets(self.core, self.loss_fn, self.test_sets, self.device)
            score = float(np.mean([v for k, v in val.items() if k.endswith("dice_both")]))
            record.update({"val_score": score, "lr": self.optimizer.param_groups[0]["lr"], "seconds": seconds,
                           **val, **{f"test:{k}": v for k, v in test.items()}})
            if score > self.best:
                self.best, self.stale = score, 0
                torch.save({"model": self.core.state_dict(), "epoch": self.epoch, "scores": val,
                            "config": self.config}, self.out / "best.pt.tmp")
                (self.out / "best.pt.tmp").replace(self.out / "best.pt")
            else:
                self.stale += 1
            self.history.append(record)
            log.info(json.dumps(record))
            print(json.dumps(record), flush=True)
        if self.world > 1:  # every rank must agree on early stopping
            flag = torch.tensor([self.stale], device=self.device if self.device.type == "cuda" else "cpu")
            dist.broadcast(flag, 0)
            self.stale = int(flag)
        self.epoch, self.step = self.epoch + 1, 0
        self.running = {k: [] for k in self.running}
        self.save_last()

    def fit(self, max_steps: int | None = None, resume: bool = True) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        handler = None
        if self.main:
            with open(self.out / "config.yaml", "w") as f:
                yaml.safe_dump(self.config, f, sort_keys=False)
            handler = logging.FileHandler(self.out / "train.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        if resume:
            self.resume()
        board = _summary_writer(self.out / "tensorboard") if self.main else None
        patience = int(self.tcfg.get("early_stopping_patience", self.epochs))
        try:
            while self.epoch < self.epochs and self.stale < patience:
                t0 = time.time()
                if not self.run_epoch(max_steps):
                    break
                self.end_epoch(time.time() - t0)
                if board is not None and self.history:
                    for key, value in self.history[-1].items():
                        if key != "epoch":
                            board.add_scalar(key.replace(":", "/"), value, self.history[-1]["epoch"])
                    board.flush()
                if max_steps is not None:
                    break
            if self.main and self.history and (self.epoch >= self.epochs or self.stale >= patience):
                self.report()
        finally:
            if board is not None:
                board.close()
            if handler is not None:
                log.removeHandler(handler)
        return self.out

    def report(self) -> None:
        """`curves.png` (loss, IoU, Dice x train, val, test) and `cases.png` (worst and best val cases)."""
        from .report import plot_cases, plot_curves

        plot_curves(self.history, self.out / "curves.png")
        best = torch.load(self.out / "best.pt", weights_only=True, map_location=self.device)
        self.core.load_state_dict(best["model"])
        _, per_image = evaluate_sets(self.core, self.loss_fn, self.val_sets, self.device)
        plot_cases(self.core, self.val_sets, per_image, self.device, self.out / "cases.png")


def train(config: dict, data_root: str | Path | None = None, out_dir: str | Path | None = None,
          device: str = "auto", max_steps: int | None = None, resume: bool = True) -> Path:
    """Train the network described by `config`; returns the run folder holding `best.pt` and `last.pt`.

    `max_steps` stops after that many optimizer steps (saving `last.pt`), for smoke runs and kill tests.
    """
    trainer = Trainer(config, data_root, out_dir, device)
    distributed = trainer.world > 1 and dist.is_initialized()
    try:
        out = trainer.fit(max_steps=max_steps, resume=resume)
        if distributed:  # the other ranks wait while rank 0 writes the report
            dist.barrier()
        return out
    finally:
        if distributed:  # Gloo's worker threads abort the process (SIGABRT) if it exits with the group alive
            dist.destroy_process_group()
