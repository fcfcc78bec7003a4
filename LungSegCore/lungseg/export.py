"""Turn a training run into a shippable model: `lungseg export RUN_DIR --out-dir DIR`. Several runs
(`lungseg export RUN_A RUN_B --name NAME`) make one ensemble model whose members' probabilities are averaged.

Writes `<name>.safetensors` and its model card with the network's speed, then measures the exported weights with
`lungseg evaluate` on every validation set of the run's config (in full) and records those summaries in the card.
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


def training_record(history: list[dict], best_epoch: int) -> dict:
    """The card's account of one training run: its epochs, the best one, its time, where and with what it ran."""
    import monai

    return {
        "epochs_run": len(history),
        "best_epoch": best_epoch + 1,
        "seconds": round(sum(h["seconds"] for h in history), 1),
        "hardware": f"{platform.machine()} CPU x{torch.get_num_threads()}" if not torch.cuda.is_available()
        else torch.cuda.get_device_name(0),
        "torch": torch.__version__.split("+")[0],
        "monai": monai.__version__,
        "history": history,
    }


def build_card(config: dict, history: list[dict], best_epoch: int) -> dict:
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
        "training": training_record(history, best_epoch),
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


def forward_speed(model: torch.nn.Module, input_size: int, repeats: int = 5) -> dict:
    """Median time of one network forward pass (batch 1) on one CPU thread: the card's speed, comparable between
    models measured on the same machine."""
    import time

    from .networks import predict_logits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = model.to("cpu").eval()
        x = torch.rand(1, 1, input_size, input_size)
        times = []
        with torch.no_grad():
            for _ in range(repeats + 1):  # the first pass warms up and is not counted
                start = time.perf_counter()
                predict_logits(model, x)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {"forward_ms_per_image": round(1000 * sorted(times[1:])[repeats // 2], 1), "threads": 1,
            "hardware": f"{platform.machine()} CPU", "note": "network forward, batch 1, one CPU thread, median"}


def ensemble_card(members: list[tuple[dict, list[dict], int]], name: str) -> dict:
    """The card of an ensemble of trained runs, each given as (config, history, best epoch); they must follow one
    lung definition and validate on the same data, so that the card's metrics mean what each member's would."""
    configs = [config for config, _, _ in members]
    definitions = [config.get("definition", DEFAULT_DEFINITION) for config in configs]
    first = configs[0]
    for config, definition in zip(configs[1:], definitions[1:]):
        if definition != definitions[0]:
            raise LungSegError(f"cannot ensemble '{first['name']}' ({definitions[0]}) with '{config['name']}' "
                               f"({definition}): they segment different lung definitions")
        if config["data"]["val"] != first["data"]["val"]:
            raise LungSegError(f"cannot ensemble '{first['name']}' with '{config['name']}': they validate on "
                               "different data, so the ensemble's card would have no common measurement")
    card = build_card(dict(first, name=name), members[0][1], members[0][2])
    card["network"] = {"name": "ensemble", "params": {"members": [
        {"name": c["network"]["name"], "params": c["network"].get("params", {}), "input_size": c["input_size"]}
        for c in configs]}}
    card["input_size"] = max(c["input_size"] for c in configs)
    card["recipe"] = {"name": name, "definition": card["definition"], "ensemble": configs,
                      "note": "softmax probabilities of the members averaged, each member at its own input size"}
    member_training = [training_record(history, best) for _, history, best in members]
    card["training"] = {"seconds": round(sum(t["seconds"] for t in member_training), 1), "members": member_training}
    return card


def export_run(run_dirs: str | Path | list, out_dir: str | Path = PACKAGE_MODELS, data_root: str | Path | None = None,
               device: str = "auto", name: str | None = None) -> Path:
    """Export one run's best checkpoint, or with several runs their ensemble; `name` overrides the recipe's."""
    from .evaluate import evaluate
    from .networks import Ensemble

    runs = [Path(r) for r in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    for run_dir in runs:
        if not (run_dir / "best.pt").exists():
            raise LungSegError(f"{run_dir}: no best.pt here; export takes the folder of a training run")
    loaded = [model_from_run(run_dir, "best.pt") for run_dir in runs]
    histories = [json.loads((run_dir / "history.json").read_text()) for run_dir in runs]
    if len(runs) == 1:
        model, best, config = loaded[0]
        card = build_card(dict(config, name=name or config["name"]), histories[0], best["epoch"])
    else:
        card = ensemble_card([(config, history, best["epoch"]) for (_, best, config), history
                              in zip(loaded, histories)], name or loaded[0][2]["name"])
        model = Ensemble(card["network"]["params"]["members"])
        for member, (trained, _, _) in zip(model.members, loaded):
            member.load_state_dict(trained.state_dict())
        config = loaded[0][2]
    card["speed"] = forward_speed(model, card["input_size"])
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
