"""A training recipe (a YAML config, packaged or a file): reading it, the cases of its data entries, the weights it
starts from (`init_from`) and when its schedule ends."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..errors import LungSegError
from ..io.selection import entry_cases, selection_tag

PACKAGE_CONFIGS = Path(__file__).parents[1] / "configs"


def load_config(path: str | Path) -> dict:
    """Read a YAML config; a bare name such as `unet` means the packaged `configs/unet.yaml`."""
    path = Path(path)
    if not path.exists() and (PACKAGE_CONFIGS / f"{path.name}.yaml").exists():
        path = PACKAGE_CONFIGS / f"{path.name}.yaml"
    if not path.exists():
        raise LungSegError(f"{path}: config file not found")
    with open(path) as f:
        return yaml.safe_load(f)


def data_sources(cfg: dict, root: Path, key: str) -> list[tuple[dict, list]]:
    """The cases of each entry of `data.<key>` (a split, a `ratios` split or a fold; see `data.entry_cases`),
    every `every`-th of them."""
    return [(entry, entry_cases(root, entry)[:: entry.get("every", 1)]) for entry in cfg["data"].get(key) or []]


def entry_tag(entry: dict) -> str:
    return f"{entry['set']}-{selection_tag(entry)}"


def initial_weights(source: str) -> dict:
    """State dict to start from: a run's checkpoint (`.pt`, read with weights_only) or a model that `--model`
    accepts (a shipped name, a card or a safetensors file, checksum-verified)."""
    if str(source).endswith(".pt"):
        if not Path(source).is_file():
            raise LungSegError(f"init_from: {source} does not exist (train the run it names first)")
        start = torch.load(source, weights_only=True, map_location="cpu")
        return start.get("model", start)
    from ..models.cards import load_network

    return load_network(source)[0].state_dict()


def training_ended(epoch: int, stale: int, tcfg: dict) -> bool:
    """Whether a run that completed `epoch` epochs, the last `stale` of them without improvement, is over: all its
    epochs, or early stopping."""
    epochs = int(tcfg["epochs"])
    return epoch >= epochs or stale >= int(tcfg.get("early_stopping_patience", epochs))
