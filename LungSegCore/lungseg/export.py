"""Turn a training run into a shippable model: `lungseg export RUN_DIR --out-dir DIR`.

Writes `<name>.safetensors` and its model card, then measures the exported weights with `lungseg evaluate` on
every validation set of the run's config (in full) and records those summaries in the card.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from .data import entry_cases, selection_tag
from .definitions import DEFAULT_DEFINITION, DEFINITIONS, LABEL_DESCRIPTIONS
from .errors import LungSegError
from .files import write_atomic_text
from .models import PACKAGE_MODELS, save_model
from .networks import build_network


def build_card(config: dict, history: list[dict], best_epoch: int) -> dict:
    import monai

    definition = config.get("definition", DEFAULT_DEFINITION)
    return {
        "name": config["name"],
        "version": config.get("version", "1.0"),
        "definition": definition,
        "definition_text": DEFINITIONS[definition].description if definition in DEFINITIONS else "",
        "network": config["network"],
        "input_size": config["input_size"],
        "labels": {str(value): text for value, text in LABEL_DESCRIPTIONS.items()},
        "data": {"train": config["data"]["train"], "val": config["data"]["val"]},
        "recipe": config,
        "training": {
            "epochs_run": len(history),
            "best_epoch": best_epoch + 1,
            "seconds": round(sum(h["seconds"] for h in history), 1),
            "hardware": f"{platform.machine()} CPU x{torch.get_num_threads()}" if not torch.cuda.is_available()
            else torch.cuda.get_device_name(0),
            "torch": torch.__version__.split("+")[0],
            "monai": monai.__version__,
            "history": history,
        },
    }


def model_from_run(run_dir: str | Path, checkpoint: str = "best.pt") -> tuple[torch.nn.Module, dict, dict]:
    """The network of one checkpoint of a training run with its weights loaded, the checkpoint, and the run's config
    (kept in best.pt; for last.pt, read from the run's config.yaml)."""
    import yaml

    run_dir = Path(run_dir)
    state = torch.load(run_dir / checkpoint, weights_only=True, map_location="cpu")
    config = state.get("config") or yaml.safe_load((run_dir / "config.yaml").read_text())
    model = build_network(config["network"]["name"], **config["network"].get("params", {}))
    model.load_state_dict(state["model"])
    return model, state, config


def export_run(run_dir: str | Path, out_dir: str | Path = PACKAGE_MODELS, data_root: str | Path | None = None,
               device: str = "auto") -> Path:
    from .evaluate import evaluate

    run_dir = Path(run_dir)
    if not (run_dir / "best.pt").exists():
        raise LungSegError(f"{run_dir}: no best.pt here; export takes the folder of a training run")
    model, best, config = model_from_run(run_dir, "best.pt")
    history = json.loads((run_dir / "history.json").read_text())
    card = build_card(config, history, best["epoch"])
    card_path = save_model(model, card, out_dir)

    root = Path(data_root or config["data"]["root"])
    metrics = {}
    for entry in config["data"]["val"]:
        folder = root / entry["set"]
        # in full (`every` thins validation during training only); a fold or ratio split by its image names
        selected = "folds" in entry or "ratios" in entry or not isinstance(entry.get("split", ""), str)
        names = [case.image.name for case in entry_cases(root, entry)] if selected else None
        summary = evaluate(folder / "images", folder / "masks", model=str(card_path),
                           split=None if selected else entry.get("split"), names=names, device=device)
        metrics[f"{entry['set']}/{selection_tag(entry)}"] = {
            k: v for k, v in summary.items() if k not in ("images_dir", "masks_dir", "model")}
    card = json.loads(card_path.read_text())
    card["metrics"] = metrics
    card["metrics_note"] = "measured by `lungseg evaluate` on the exported weights; Dice per image, then averaged"
    write_atomic_text(json.dumps(card, indent=2) + "\n", card_path)
    return card_path
