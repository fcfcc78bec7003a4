"""Turn a training run into a shippable model: `lungseg export RUN_DIR --out-dir DIR`. Several runs
(`lungseg export RUN_A RUN_B --name NAME`) make one ensemble model whose members' probabilities are averaged.
`--weights last` exports the final weights of a fixed-schedule recipe, the ones its cross-validation scored, and
`--cross-validation RUN/cv_summary.json` (from `scripts/cross_validate.py`) records that recipe's cross-validation.

Writes `<name>.safetensors` (for training and fine-tuning), `<name>.onnx` (for inference; one graph per member of an
ensemble) and the model card with the graphs' checksums and speed, then measures the exported graphs with
`lungseg evaluate` on every validation set of the run's config (in full) and records those summaries in the card.
`lungseg export --from-model NAME` does the same for a model that already exists, from its safetensors.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from ..definitions import DEFAULT_DEFINITION, DEFINITIONS, LABEL_DESCRIPTIONS
from ..errors import LungSegError
from ..io.files import checkpoint_file, write_atomic_text
from ..io.selection import entry_cases, selection_tag
from ..models.cards import PACKAGE_MODELS, cards_named, load_network, save_card, save_weights
from ..nets.networks import build_network
from .export_onnx import export_graphs


def training_record(history: list[dict], best_epoch: int, environment: list[dict] | None = None) -> dict:
    """The card's account of one training run: its epochs, the best one, its time, where and with what it ran (the
    run's `environment.json`; a run from before it was written trained where it is exported)."""
    from ..nets.networks import environment_entry, select_device

    environment = environment or [environment_entry(select_device("auto"))]
    return {
        "epochs_run": len(history),
        "best_epoch": best_epoch + 1,
        "seconds": round(sum(h["seconds"] for h in history), 1),
        **{key: ", ".join(dict.fromkeys(str(e[key]) for e in environment)) for key in ("hardware", "torch", "monai")},
        "history": history,
    }


def run_environment(run_dir: str | Path) -> list[dict] | None:
    """A training run's `environment.json` (None for runs from before the trainer wrote it)."""
    path = Path(run_dir) / "environment.json"
    return json.loads(path.read_text()) if path.exists() else None


def build_card(config: dict, history: list[dict], best_epoch: int, environment: list[dict] | None = None) -> dict:
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
        "training": training_record(history, best_epoch, environment),
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


def checkpoint_epoch(state: dict, history: list[dict], weights: str) -> int:
    """The 0-based epoch whose weights a checkpoint holds: best.pt records it; last.pt holds the final one."""
    return state["epoch"] if weights == "best" else len(history) - 1


def cross_validation_record(summary_path: str | Path, recipe: str, weights: str) -> dict:
    """The card's account of its recipe's cross-validation: a complete `cv_summary.json` of that same recipe that
    scored the same checkpoint (`weights`) of each fold, its settings and, per evaluated set, the mean ± sd across
    folds and each fold's scores."""
    path = Path(summary_path)
    if not path.is_file():
        raise LungSegError(
            f"{path}: no such cross-validation summary (scripts/cross_validate.py writes cv_summary.json)"
        )
    summary = json.loads(path.read_text())
    if summary.get("recipe") != recipe:
        raise LungSegError(
            f"{path}: cross-validates the recipe '{summary.get('recipe')}', not '{recipe}', the exported run's"
        )
    if not summary.get("complete"):
        raise LungSegError(
            f"{path}: only folds {summary.get('folds_done')} of {summary.get('folds')} are scored; "
            "finish the cross-validation first"
        )
    if summary.get("weights") != weights:
        raise LungSegError(
            f"{path}: scored each fold's {summary.get('weights')}.pt; the card's weights are "
            f"{weights}.pt (cross_validate.py --weights {weights})"
        )
    kept = ("recipe", "folds", "cv_set", "seed", "weights", "held_out_used_for_selection", "early_stopping", "note")
    return dict(
        {k: summary[k] for k in kept},
        evaluations={
            key: {k: value[k] for k in ("images", "hd95_unit", "across_folds", "per_fold")}
            for key, value in summary["evaluations"].items()
        },
    )


def forward_speed(onnx: dict, folder: Path, repeats: int = 5) -> dict:
    """Median time of the model's forward pass (batch 1; an ensemble's graphs summed) in ONNX Runtime on one CPU
    thread: the card's speed, comparable between models measured on the same machine."""
    import time

    import numpy as np

    from ..inference.runtime import open_session, run

    total = 0.0
    for graph in onnx["graphs"]:
        session = open_session(Path(folder) / graph["file"], "cpu", threads=1)
        size = int(graph["input_size"])
        inputs = {"image": np.random.default_rng(0).random((1, 1, size, size), dtype=np.float32)}
        if len(session.get_inputs()) == 2:
            inputs["noise"] = np.zeros((1, 1, session.get_inputs()[1].shape[2]), np.float32)
        times = []
        for _ in range(repeats + 1):  # the first pass warms up and is not counted
            start = time.perf_counter()
            run(session, **inputs)
            times.append(time.perf_counter() - start)
        total += sorted(times[1:])[repeats // 2]
    return {
        "forward_ms_per_image": round(1000 * total, 1),
        "threads": 1,
        "hardware": f"{platform.machine()} CPU",
        "runtime": "onnxruntime",
        "note": "ONNX Runtime forward, batch 1, one CPU thread, median",
    }


def ensemble_card(members: list[tuple[dict, list[dict], int, list[dict] | None]], name: str) -> dict:
    """The card of an ensemble of trained runs, each given as (config, history, best epoch, environment); they must
    follow one lung definition and validate on the same data, so that the card's metrics mean what each member's
    would."""
    configs = [config for config, _, _, _ in members]
    definitions = [config.get("definition", DEFAULT_DEFINITION) for config in configs]
    first = configs[0]
    for config, definition in zip(configs[1:], definitions[1:]):
        if definition != definitions[0]:
            raise LungSegError(
                f"cannot ensemble '{first['name']}' ({definitions[0]}) with '{config['name']}' "
                f"({definition}): they segment different lung definitions"
            )
        if config["data"]["val"] != first["data"]["val"]:
            raise LungSegError(
                f"cannot ensemble '{first['name']}' with '{config['name']}': they validate on "
                "different data, so the ensemble's card would have no common measurement"
            )
    card = build_card(dict(first, name=name), *members[0][1:])
    card["network"] = {
        "name": "ensemble",
        "params": {
            "members": [
                {"name": c["network"]["name"], "params": c["network"].get("params", {}), "input_size": c["input_size"]}
                for c in configs
            ]
        },
    }
    card["input_size"] = max(c["input_size"] for c in configs)
    card["recipe"] = {
        "name": name,
        "definition": card["definition"],
        "ensemble": configs,
        "note": "softmax probabilities of the members averaged, each member at its own input size",
    }
    member_training = [training_record(history, best, environment) for _, history, best, environment in members]
    card["training"] = {"seconds": round(sum(t["seconds"] for t in member_training), 1), "members": member_training}
    return card


def check_destination(name: str, out_dir: Path, overwrite: bool = False) -> None:
    """Refuse to replace a model in `out_dir` unless `overwrite` (its card, measured metrics and fitted QC would go
    too: a shipped model, when out_dir is the package's folder), and a name that another models folder already
    holds (`--model NAME` could not tell the two apart)."""
    here = [path for path in (out_dir / f"{name}.json", out_dir / f"{name}.safetensors") if path.exists()]
    if here and not overwrite:
        raise LungSegError(
            f"{here[0]}: a model named '{name}' is already there; --overwrite replaces it (its card "
            "and any fitted QC with it), or --name exports this one under another name"
        )
    elsewhere = [card.parent for card in cards_named(name) if card.parent.resolve() != out_dir.resolve()]
    if elsewhere:
        raise LungSegError(
            f"a model named '{name}' is already in {elsewhere[0]}; export this one under another name "
            "(--name), so that --model can tell the two apart"
        )


def export_run(
    run_dirs: str | Path | list,
    out_dir: str | Path = PACKAGE_MODELS,
    data_root: str | Path | None = None,
    device: str = "auto",
    name: str | None = None,
    weights: str = "best",
    cross_validation: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Export one run's best (or last) checkpoint, or with several runs their ensemble; `name` overrides the
    recipe's; `cross_validation` is the recipe's `cv_summary.json`, recorded in the card. A model of that name
    already in `out_dir` is replaced only with `overwrite` (`check_destination`)."""
    from ..nets.networks import Ensemble

    checkpoint = checkpoint_file(weights)
    runs = [Path(r) for r in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    for run_dir in runs:
        if not (run_dir / checkpoint).exists():
            raise LungSegError(f"{run_dir}: no {checkpoint} here; export takes the folder of a training run")
    loaded = [model_from_run(run_dir, checkpoint) for run_dir in runs]
    check_destination(name or loaded[0][2]["name"], Path(out_dir), overwrite)
    histories = [json.loads((run_dir / "history.json").read_text()) for run_dir in runs]
    epochs = [checkpoint_epoch(state, history, weights) for (_, state, _), history in zip(loaded, histories)]
    if len(runs) == 1:
        model, _, config = loaded[0]
        card = build_card(dict(config, name=name or config["name"]), histories[0], epochs[0], run_environment(runs[0]))
    else:
        card = ensemble_card(
            [
                (config, history, epoch, run_environment(run_dir))
                for (_, _, config), history, epoch, run_dir in zip(loaded, histories, epochs, runs)
            ],
            name or loaded[0][2]["name"],
        )
        model = Ensemble(card["network"]["params"]["members"])
        for member, (trained, _, _) in zip(model.members, loaded):
            member.load_state_dict(trained.state_dict())
        config = loaded[0][2]
    if cross_validation is not None:
        if len(runs) > 1:
            raise LungSegError("--cross-validation records one recipe's cross-validation; an ensemble has several")
        card["cross_validation"] = cross_validation_record(cross_validation, config["name"], weights)
    card_path = write_model(model, card, Path(out_dir))
    return measure(card_path, config, data_root, device)


def write_model(model: torch.nn.Module, card: dict, out_dir: Path, weights: bool = True) -> Path:
    """The safetensors (for training and fine-tuning; unless `weights` is False: they are there already), the ONNX
    graphs that read them (for inference) and the card, with the checksums and speed; returns the card's path."""
    if weights:
        card = save_weights(model, card, out_dir)
    card["onnx"] = export_graphs(model, card, out_dir)
    card["speed"] = forward_speed(card["onnx"], out_dir)
    return save_card(card, out_dir)


def export_model(name_or_path: str, data_root: str | Path | None = None, device: str = "auto") -> Path:
    """Write an existing model's ONNX graphs from its safetensors (a model exported before the graphs existed, or
    one whose graphs should be made again) and measure its card's metrics again, on the graphs."""
    model, card = load_network(name_or_path)
    card_path = write_model(model, card, Path(card["card_path"]).parent, weights=False)
    recipe = card["recipe"].get("ensemble", [card["recipe"]])[0]  # an ensemble's members share their val sets
    return measure(card_path, recipe, data_root, device)


def measure(card_path: Path, config: dict, data_root: str | Path | None, device: str) -> Path:
    """Measure the exported model with `lungseg evaluate` on every validation set of its recipe (in full) and
    record those summaries in its card."""
    from ..evaluation.evaluate import evaluate

    root = Path(data_root or config["data"]["root"])
    metrics = {}
    for entry in config["data"]["val"]:
        folder = root / entry["set"]
        # in full (`every` thins validation during training only); a fold or ratio split by its image names
        selected = "folds" in entry or "ratios" in entry or not isinstance(entry.get("split", ""), str)
        names = [case.image.name for case in entry_cases(root, entry)] if selected else None
        summary = evaluate(
            folder / "images",
            folder / "masks",
            model=str(card_path),
            split=None if selected else entry.get("split"),
            names=names,
            device=device,
        )
        metrics[f"{entry['set']}/{selection_tag(entry)}"] = {
            k: v for k, v in summary.items() if k not in ("images_dir", "masks_dir", "model")
        }
    card = json.loads(card_path.read_text())
    card["metrics"] = metrics
    card["metrics_note"] = "measured by `lungseg evaluate` on the exported ONNX graphs; Dice per image, then averaged"
    write_atomic_text(json.dumps(card, indent=2) + "\n", card_path)
    return card_path
