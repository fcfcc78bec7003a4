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
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from ..io.files import save_checkpoint, write_atomic_text
from ..nets.networks import build_network, environment_entry, select_device
from .augment import training_augmentation
from .config import data_sources, entry_tag, initial_weights, training_ended
from .data import ArrayDataset, EpochSamples, load_arrays
from .losses import build_loss, training_loss
from .report import add_scalars, summary_writer
from .validation import evaluate_sets, overlap

log = logging.getLogger("lungseg.train")


def _load_sets(cfg: dict, root: Path, key: str, size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    sets = {}
    for entry, cases in data_sources(cfg, root, key):
        tag = f"{entry_tag(entry)}-every{entry.get('every', 1)}"
        sets[entry["set"]] = load_arrays(cases, size, desc=tag)
    return sets


def _rng_state() -> dict:
    """The global RNG states as tensors and plain values, which `torch.load(weights_only=True)` accepts."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": list(random.getstate()[1]),
    }


def _set_rng_state(state: dict) -> None:
    # NumPy's legacy state is (name, 624 keys, position, has_gauss, cached_gaussian) and Python's is
    # (version 3, 625 ints, gauss_next); the cached Gaussians are not saved, so they restart empty.
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def run_finished(out_dir: str | Path, config: dict) -> bool:
    """Whether the run folder's `last.pt` is a finished run of `config` (resuming it would train no further)."""
    last = Path(out_dir) / "last.pt"
    if not last.exists():
        return False
    state = torch.load(last, weights_only=True, map_location="cpu")
    return training_ended(state["epoch"], state["stale"], config["training"])


# size: one class for a training run, as nnU-Net's trainer: the model, optimizer, scheduler, scaler, RNG and
# early-stopping state that every step, checkpoint and resume shares
class Trainer:
    """One training run, in parts with one job each, as MONAI's engine and handlers split it: set-up (processes,
    data, model, optimization), the steps of one epoch, the end of an epoch (validation, best checkpoint, early
    stopping), and the checkpoint to resume from."""

    def __init__(
        self, config: dict, data_root: str | Path | None = None, out_dir: str | Path | None = None, device: str = "auto"
    ):
        self.config, self.tcfg = config, config["training"]
        self.size = int(config["input_size"])
        self.root = Path(data_root or config["data"]["root"])
        self.out = Path(out_dir or Path("runs") / config["name"])
        # in this order: the seed is set before the network's weights are drawn
        self._setup_distributed(device)
        self._load_data()
        self._build_model()
        self._build_optimization()
        self.epoch, self.step, self.best, self.stale, self.history = 0, 0, -1.0, 0, []
        self.running: dict[str, list[float]] = {"loss": [], "dice": [], "iou": []}

    # -- set-up ---------------------------------------------------------------------------------------------
    def _setup_distributed(self, device: str) -> None:
        """This process's rank, process group and device, and its seed (one per rank)."""
        from monai.utils import set_determinism

        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.main = self.rank == 0
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
        self.device = select_device(device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        set_determinism(seed=int(self.tcfg.get("seed", 0)) + self.rank)

    def _load_data(self) -> None:
        """The training cases with their augmentation and draw weights (each set's `weight` shared by its cases),
        and the val and test sets."""
        images, labels, weights = [], [], []
        for entry, cases in data_sources(self.config, self.root, "train"):
            x, y = load_arrays(cases, self.size, desc=entry_tag(entry))
            images.append(x)
            labels.append(y)
            weights.append(torch.full((len(cases),), float(entry.get("weight", 1.0)) / len(cases), dtype=torch.double))
        self.dataset = ArrayDataset(
            torch.cat(images),
            torch.cat(labels),
            training_augmentation(dict(self.config.get("augment", {}), size=self.size)),
        )
        self.sample_weights = torch.cat(weights)
        self.val_sets = _load_sets(self.config, self.root, "val", self.size)
        self.test_sets = _load_sets(self.config, self.root, "test", self.size)

    def _build_model(self) -> None:
        """The network (`core`), started from `init_from` when set; `model` is what trains it (DDP-wrapped across
        processes)."""
        net = self.config["network"]
        self.model = build_network(net["name"], **net.get("params", {})).to(self.device)
        if self.tcfg.get("init_from"):  # continue from an earlier run or a shipped model's weights
            self.model.load_state_dict(initial_weights(self.tcfg["init_from"]))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            self.model = self.model.to(memory_format=torch.channels_last)
        self.core = self.model
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    def _build_optimization(self) -> None:
        """Loss, AdamW, a cosine learning-rate schedule over the epochs, and mixed precision on CUDA."""
        loss_cfg = self.tcfg.get("loss", "dice_ce")
        self.loss_fn = (
            build_loss(loss_cfg)
            if isinstance(loss_cfg, str)
            else build_loss(loss_cfg["name"], **loss_cfg.get("params", {}))
        )
        self.epochs = int(self.tcfg["epochs"])
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=float(self.tcfg["lr"]), weight_decay=float(self.tcfg.get("weight_decay", 0))
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.epochs)
        self.amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save_last(self) -> None:
        """`last.pt` (everything a resumed run needs, mid-epoch included) and `history.json`; rank 0 only."""
        if not self.main:
            return
        state = {
            "model": self.core.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "stale": self.stale,
            "running": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.running.items()},
        }
        save_checkpoint(state, self.out / "last.pt")
        write_atomic_text(json.dumps(self.history, indent=1), self.out / "history.json")

    def record_environment(self) -> None:
        """`environment.json`: where and with what this run trained, one entry per start (a run resumed on another
        machine adds one), for the model card."""
        path = self.out / "environment.json"
        entries = json.loads(path.read_text()) if path.exists() else []
        entries.append({"from_epoch": self.epoch + 1, "processes": self.world, **environment_entry(self.device)})
        write_atomic_text(json.dumps(entries, indent=1) + "\n", path)

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
        draw = list(
            torch.utils.data.WeightedRandomSampler(
                self.sample_weights, int(self.tcfg["samples_per_epoch"]), replacement=True, generator=generator
            )
        )
        seeds = [(seed * 1_000_003 + self.epoch * 100_003 + k) % 2**31 for k in range(len(draw))]
        batch = int(self.tcfg["batch_size"])
        keep = len(draw[self.rank :: self.world]) // batch * batch
        start = self.step * batch
        return EpochSamples(
            self.dataset, draw[self.rank :: self.world][start:keep], seeds[self.rank :: self.world][start:keep]
        )

    def run_epoch(self, max_steps: int | None) -> bool:
        """Train until the epoch ends (True) or `max_steps` total steps were taken in this call (False)."""
        from monai.data import DataLoader
        from tqdm import tqdm

        samples = self.epoch_samples()
        loader = DataLoader(
            samples,
            batch_size=int(self.tcfg["batch_size"]),
            shuffle=False,
            num_workers=int(self.tcfg.get("num_workers", 0)),
            drop_last=True,
        )
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

    # -- end of an epoch ------------------------------------------------------------------------------------
    def epoch_record(self, seconds: float, val: dict, test: dict) -> dict:
        """The history record of the epoch that just ended: train means, `val_score` (the mean both-lung Dice
        over the val sets), then the val and (prefixed `test:`) test scores."""
        train = {k: float(np.mean(v)) for k, v in self.running.items()}
        return {
            "epoch": self.epoch + 1,
            "train_loss": train["loss"],
            **{f"train/{k}": v for k, v in train.items()},
            "val_score": float(np.mean([v for k, v in val.items() if k.endswith("dice_both")])),
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            **val,
            **{f"test:{k}": v for k, v in test.items()},
        }

    def keep_best(self, score: float, val: dict) -> None:
        """`best.pt` when the validation score improved; otherwise one more epoch without improvement."""
        if score > self.best:
            self.best, self.stale = score, 0
            save_checkpoint(
                {"model": self.core.state_dict(), "epoch": self.epoch, "scores": val, "config": self.config},
                self.out / "best.pt",
            )
        else:
            self.stale += 1

    def agree_on_stopping(self) -> None:
        """Every rank takes rank 0's count of epochs without improvement, so that all stop together."""
        if self.world > 1:
            flag = torch.tensor([self.stale], device=self.device if self.device.type == "cuda" else "cpu")
            dist.broadcast(flag, 0)
            self.stale = int(flag)

    def end_epoch(self, seconds: float) -> None:
        """Learning-rate step; on rank 0 validation, best checkpoint and history; early-stopping agreement; then
        the next epoch's counters and `last.pt`."""
        self.scheduler.step()
        if self.main:
            val, _ = evaluate_sets(self.core, self.loss_fn, self.val_sets, self.device)
            test, _ = evaluate_sets(self.core, self.loss_fn, self.test_sets, self.device)
            record = self.epoch_record(seconds, val, test)
            self.keep_best(record["val_score"], val)
            self.history.append(record)
            log.info(json.dumps(record))  # to train.log and the terminal (see start_logging)
        self.agree_on_stopping()
        self.epoch, self.step = self.epoch + 1, 0
        self.running = {k: [] for k in self.running}
        self.save_last()

    # -- the run ------------------------------------------------------------------------------------------
    def start_logging(self) -> list[logging.Handler]:
        """Rank 0's log records go to `train.log` (timestamped) and to the terminal, each once."""
        to_file = logging.FileHandler(self.out / "train.log")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        to_terminal = logging.StreamHandler(sys.stdout)
        for handler in (to_file, to_terminal):
            log.addHandler(handler)
        log.setLevel(logging.INFO)
        return [to_file, to_terminal]

    def fit(self, max_steps: int | None = None, resume: bool = True) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        handlers = []
        if self.main:
            write_atomic_text(yaml.safe_dump(self.config, sort_keys=False), self.out / "config.yaml")
            handlers = self.start_logging()
        if resume:
            self.resume()
        if self.main and not training_ended(self.epoch, self.stale, self.tcfg):
            self.record_environment()
        board = summary_writer(self.out / "tensorboard") if self.main else None
        try:
            while not training_ended(self.epoch, self.stale, self.tcfg):
                t0 = time.time()
                if not self.run_epoch(max_steps):
                    break
                self.end_epoch(time.time() - t0)
                if board is not None and self.history:
                    add_scalars(board, self.history[-1])
                if max_steps is not None:
                    break
            if self.main and self.history and training_ended(self.epoch, self.stale, self.tcfg):
                self.report()
        finally:
            if board is not None:
                board.close()
            for handler in handlers:
                log.removeHandler(handler)
                handler.close()
        return self.out

    def report(self) -> None:
        """`curves.png` (loss, IoU, Dice x train, val, test) and `cases.png` (worst and best val cases)."""
        from .report import plot_cases, plot_curves

        plot_curves(self.history, self.out / "curves.png")
        best = torch.load(self.out / "best.pt", weights_only=True, map_location=self.device)
        self.core.load_state_dict(best["model"])
        _, per_image = evaluate_sets(self.core, self.loss_fn, self.val_sets, self.device)
        plot_cases(self.core, self.val_sets, per_image, self.device, self.out / "cases.png")


def train(
    config: dict,
    data_root: str | Path | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    max_steps: int | None = None,
    resume: bool = True,
) -> Path:
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
