"""End-of-training figures: learning curves and the worst and best validation cases; and each epoch's
TensorBoard scalars."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..definitions import LEFT_LUNG, RIGHT_LUNG
from ..nets.networks import predict_logits

log = logging.getLogger("lungseg.train")


def plot_curves(history: list[dict], path: Path) -> None:
    """3x3 grid: loss, IoU and Dice (rows) for train, val and test (columns); val/test per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(3, 3, figsize=(12, 9), sharex=True)
    for row, metric in enumerate(("loss", "iou", "dice")):
        for col, part in enumerate(("train", "val", "test")):
            ax = axes[row, col]
            if part == "train":
                series = {"train": [h.get(f"train/{metric}") for h in history]}
            else:
                suffix = f"/{metric}" if metric != "dice" else "/dice_both"
                prefix = "test:" if part == "test" else ""
                keys = sorted(
                    {
                        k
                        for h in history
                        for k in h
                        if k.startswith(prefix)
                        and k.endswith(suffix)
                        and (part == "test" or ":" not in k)
                        and not k.startswith("train/")
                    }
                )
                series = {k.removeprefix(prefix).split("/")[0]: [h.get(k) for h in history] for k in keys}
            for label, values in series.items():
                points = [(e, v) for e, v in zip(epochs, values) if v is not None]
                if points:
                    ax.plot(*zip(*points), marker=".", label=label)
            if not any(series.values()) or all(v is None for vs in series.values() for v in vs):
                ax.text(0.5, 0.5, f"no {part} set", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"{part} {metric}")
            ax.grid(alpha=0.3)
            if series:
                ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def plot_cases(model, sets: dict, per_image: dict, device, path: Path, count: int = 4) -> None:
    """Rows of image, truth and prediction for the `count` worst and best validation cases (by Dice)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from ..batch.overlay import LABEL_COLOURS

    cmap = ListedColormap(
        [(0, 0, 0, 0)] + [tuple(c / 255 for c in LABEL_COLOURS[v]) + (0.5,) for v in (RIGHT_LUNG, LEFT_LUNG)]
    )
    ranked = sorted(((float(d), name, i) for name, dice in per_image.items() for i, d in enumerate(dice)))
    chosen = ranked[:count] + ranked[-count:]
    model.eval()
    fig, axes = plt.subplots(len(chosen), 3, figsize=(7.5, 2.5 * len(chosen)))
    for row, (dice, name, i) in enumerate(chosen):
        images, labels = sets[name]
        x = images[i : i + 1].float().to(device)
        pred = predict_logits(model, x).argmax(1)[0].cpu().numpy()
        image = x[0, 0].cpu().numpy()
        tag = "worst" if row < count else "best"
        for col, (title, overlay) in enumerate(
            (("image", None), ("truth", labels[i, 0].numpy()), ("prediction", pred))
        ):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray")
            if overlay is not None:
                ax.imshow(np.asarray(overlay), cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(f"{tag}: {name} #{i} Dice {dice:.3f}" if col == 0 else title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def add_scalars(board, record: dict) -> None:
    """One epoch's history record as TensorBoard scalars (`test:` becomes a `test/` folder)."""
    for key, value in record.items():
        if key != "epoch":
            board.add_scalar(key.replace(":", "/"), value, record["epoch"])
    board.flush()


def summary_writer(folder: Path):
    """TensorBoard scalars when tensorboard is installed (the `train` extra); training runs without it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed; no TensorBoard scalars for this run")
        return None
    return SummaryWriter(str(folder))
