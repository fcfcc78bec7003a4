"""K-fold cross-validation of a training recipe over one data set: `scripts/cross_validate.py --config RECIPE -o RUN`.

The folds split the set's `train` and `val` images (JSRT: 196) by `data.fold_assignment`, stratified by splits.csv's
`group` and never splitting a patient. Fold k's config (`fold_config`) replaces the recipe's training entries of that
set by fold k's `train` part (keeping their weight). As in nnU-Net, the held-out fold k chooses nothing: it is only a
`data.test` entry (logged per epoch, never used for `best.pt` or early stopping), `data.val` keeps only the recipe's
other validation sets (the trainer's own bookkeeping, e.g. COVID-QU-Ex val), and early stopping is off, so every
fold trains the recipe's fixed schedule. A second-stage recipe starts each fold from that fold's first-stage weights
(`init_from: runs/RUN/fold-{fold}/last.pt`), so a fine-tune is cross-validated with no leak. It trains with the
package's `train` into RUN/fold-k, so a re-run resumes an unfinished fold at its exact step and skips a finished
one. Then the fold's final weights (`last.pt`; or with `weights="best"`, `best.pt`, selected on those other
validation sets) are saved as a model with a card and scored by `evaluate` on the held-out images, HD95 in mm at
the set's pixel size, and on any `also` sets; the scores are kept in RUN/fold-k/cv_fold.json and summarised by
`cv_report` into RUN/cv_summary.json and RUN/cv_summary.md.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from ..errors import LungSegError
from ..io.files import checkpoint_file, write_atomic_text
from ..io.selection import entry_cases, selection_tag
from .cv_report import write_report

CV_SPLITS = ("train", "val")
# Pixel size of sets whose PNGs state none: JSRT's 2048² originals are 0.175 mm, here downsampled to 512².
SPACING_MM = {"jsrt": 0.7}
KEPT_IN_TRAIN_ENTRY = ("weight", "every")  # what a recipe's training entry keeps when a fold replaces its selection


def fold_entry(cv_set: str, folds: int, fold: int, part: str, splits=CV_SPLITS, seed: int = 0) -> dict:
    return {"set": cv_set, "split": list(splits), "folds": folds, "fold": fold, "part": part, "seed": seed}


def fold_config(recipe: dict, fold: int, folds: int, cv_set: str = "jsrt", splits=CV_SPLITS, seed: int = 0) -> dict:
    """The recipe's config for fold `fold` of `folds` over `cv_set`: trains on the fold's `train` part, logs its
    held-out part as the first `data.test` entry only, validates on the recipe's other sets only, and runs every
    epoch (no early stopping)."""
    cfg = copy.deepcopy(recipe)
    data = cfg["data"]
    if not any(entry["set"] == cv_set for entry in data["train"]):
        raise LungSegError(f"config '{recipe['name']}' does not train on '{cv_set}', the set to cross-validate")
    data["train"] = [
        dict(
            {k: v for k, v in entry.items() if k in KEPT_IN_TRAIN_ENTRY},
            **fold_entry(cv_set, folds, fold, "train", splits, seed),
        )
        if entry["set"] == cv_set
        else entry
        for entry in data["train"]
    ]
    # the held-out fold selects nothing: not best.pt, not early stopping (the trainer only logs `data.test`)
    data["val"] = [entry for entry in data.get("val") or [] if entry["set"] != cv_set]
    if not data["val"]:
        raise LungSegError(
            f"config '{recipe['name']}' validates on no set but '{cv_set}', whose images are all in "
            "the folds; add another validation set (e.g. covid-qu-ex val) for the trainer's best.pt"
        )
    # the set's other test entries go too: its images are all in the folds now
    data["test"] = [fold_entry(cv_set, folds, fold, "held_out", splits, seed)] + [
        entry for entry in data.get("test") or [] if entry["set"] != cv_set
    ]
    cfg["training"].pop("early_stopping_patience", None)  # every fold trains the same fixed schedule
    cfg["training"].update(fold_start(recipe, fold))
    cfg["name"] = f"{recipe['name']}-fold{fold}"
    return cfg


def fold_start(recipe: dict, fold: int) -> dict:
    """A staged recipe's start for one fold: `init_from` must name a per-fold checkpoint through `{fold}` (e.g.
    runs/unet-jsrt-cv/fold-{fold}/last.pt), since any other weights (a shipped model, one run) may have trained on
    the held-out images."""
    start = recipe["training"].get("init_from")
    if not start:
        return {}
    if "{fold}" not in str(start):
        raise LungSegError(
            f"config '{recipe['name']}' starts every fold from '{start}', weights that may have "
            "seen the held-out images; name each fold's own start with {fold}, e.g. "
            "runs/unet-jsrt-cv/fold-{fold}/last.pt"
        )
    return {"init_from": str(start).replace("{fold}", str(fold))}


def held_out_entry(cfg: dict) -> dict:
    """The held-out fold's entry of a fold config (its first test entry)."""
    entry = (cfg["data"].get("test") or [{}])[0]
    if entry.get("part") != "held_out":
        raise LungSegError(f"config '{cfg['name']}' is not a fold config: its first test entry is no held-out fold")
    return entry


def recipe_seed(recipe: dict, cv_set: str) -> int:
    """The fold seed a recipe's own fold entries name (0 when it has none)."""
    return next((int(e.get("seed", 0)) for e in recipe["data"]["train"] if e["set"] == cv_set and "folds" in e), 0)


def held_out_names(cfg: dict, root: Path) -> list[str]:
    """Image file names of the held-out fold of a fold config."""
    return [case.image.name for case in entry_cases(root, held_out_entry(cfg))]


def fold_dir(run_dir: str | Path, fold: int) -> Path:
    return Path(run_dir) / f"fold-{fold}"


def check_run_config(out: Path, cfg: dict) -> None:
    """A fold folder resumes only the config it was started with."""
    saved = out / "config.yaml"
    if saved.exists() and yaml.safe_load(saved.read_text()) != cfg:
        raise LungSegError(
            f"{out} holds a run of a different config than {cfg['name']} derived from this recipe "
            "and these options; use a new output folder"
        )


def train_fold(cfg: dict, out: Path, data_root: Path, device: str = "auto", max_steps: int | None = None) -> bool:
    """Train (or resume, or skip when finished) one fold; True once its training has finished."""
    from .trainer import run_finished, train

    check_run_config(out, cfg)
    if run_finished(out, cfg):
        print(f"lungseg: {cfg['name']}: training finished earlier, skipped", flush=True)
        return True
    print(f"lungseg: {cfg['name']}: training in {out}", flush=True)
    train(cfg, data_root=data_root, out_dir=out, device=device, max_steps=max_steps)
    return run_finished(out, cfg)


def fold_model(out: Path, weights: str = "last") -> Path:
    """The fold's last (or best) weights saved as a model (weights, ONNX graphs and card) in
    `out/model-<weights>/`."""
    from .export import build_card, checkpoint_epoch, model_from_run, run_environment, write_model

    model, state, config = model_from_run(out, checkpoint_file(weights))
    history = json.loads((out / "history.json").read_text())
    card = build_card(config, history, checkpoint_epoch(state, history, weights), run_environment(out))
    return write_model(model, card, out / f"model-{weights}")


def parse_also(spec: str) -> tuple[str, str | None]:
    """`covid-qu-ex:val` -> ("covid-qu-ex", "val"); a bare set name scores all of it."""
    name, _, split = spec.partition(":")
    return name, split or None


def score_fold(
    cfg: dict,
    out: Path,
    root: Path,
    cv_set: str,
    spacing_mm: float | None,
    also=(),
    weights: str = "last",
    device: str = "auto",
) -> dict:
    """The fold's held-out scores (`<set>/held_out`) and those on each `also` set, kept in out/cv_fold.json;
    scores already there for the same checkpoint are reused."""
    from ..evaluation.evaluate import evaluate
    from ..models.cards import sha256_of

    # the checkpoint's own bytes say whether it changed (a safetensors header's metadata order varies by process)
    source = sha256_of(out / checkpoint_file(weights))
    path = out / "cv_fold.json"
    kept = json.loads(path.read_text()) if path.exists() else {}
    card = out / f"model-{weights}" / f"{cfg['name']}.json"
    if kept.get("source_sha256") != source or not card.exists():  # retrained, or the other weights
        kept, card = {}, fold_model(out, weights)
    names = held_out_names(cfg, root)
    wanted = {f"{cv_set}/held_out": (cv_set, None, names, spacing_mm)}
    for spec in also:
        name, split = parse_also(spec)
        wanted[f"{name}/{split or 'all'}"] = (name, split, None, SPACING_MM.get(name))
    scores = kept.get("scores", {})
    for key, (name, split, only, spacing) in wanted.items():
        if key in scores:
            continue
        folder = root / name
        print(f"lungseg: {cfg['name']}: scoring {weights} weights on {key}", flush=True)
        scores[key] = evaluate(
            folder / "images",
            folder / "masks",
            model=str(card),
            split=split,
            names=only,
            spacing_mm=spacing,
            device=device,
            out_dir=out / f"eval-{weights}-{key.replace('/', '-')}",
        )
    result = {
        "fold": held_out_entry(cfg)["fold"],
        "name": cfg["name"],
        "weights": weights,
        "source_sha256": source,
        "card": str(card),
        "held_out": names,
        "scores": scores,
    }
    write_atomic_text(json.dumps(result, indent=1) + "\n", path)
    return result


def cross_validate(
    recipe: dict,
    run_dir: str | Path,
    folds: int = 5,
    data_root: str | Path | None = None,
    only_fold: int | None = None,
    also=(),
    weights: str = "last",
    cv_set: str = "jsrt",
    spacing_mm: float | None = None,
    seed: int | None = None,
    device: str = "auto",
    max_steps: int | None = None,
) -> dict:
    """Train and score every fold (or only `only_fold`), then summarise the folds scored so far; returns the
    summary written to run_dir/cv_summary.json. `weights`: "last" (each fold's final weights, the default) or
    "best" (best.pt, selected on the recipe's validation sets other than `cv_set`). `seed` (of the fold
    assignment) defaults to the recipe's."""
    checkpoint_file(weights)  # best or last, else a clear error before any training
    if only_fold is not None and not 0 <= only_fold < folds:
        raise LungSegError(f"fold {only_fold}: choose 0..{folds - 1}")
    run_dir, root = Path(run_dir), Path(data_root or recipe["data"]["root"])
    spacing_mm = spacing_mm if spacing_mm is not None else SPACING_MM.get(cv_set)
    seed = seed if seed is not None else recipe_seed(recipe, cv_set)
    results = {}
    for fold in range(folds) if only_fold is None else [only_fold]:
        cfg = fold_config(recipe, fold, folds, cv_set, seed=seed)
        out = fold_dir(run_dir, fold)
        if not train_fold(cfg, out, root, device, max_steps):
            print(f"lungseg: {cfg['name']}: training not finished; re-run to continue it", flush=True)
            continue
        results[fold] = score_fold(cfg, out, root, cv_set, spacing_mm, also, weights, device)
    for fold in range(folds):  # folds scored by other calls (e.g. one --fold per job) join the summary
        path = fold_dir(run_dir, fold) / "cv_fold.json"
        if fold not in results and path.exists():
            kept = json.loads(path.read_text())
            if kept.get("weights") == weights:
                results[fold] = kept
    val = fold_config(recipe, 0, folds, cv_set, seed=seed)["data"]["val"]  # the same in every fold
    selected_on = [f"{entry['set']}-{selection_tag(entry)}" for entry in val]
    settings = {
        "recipe": recipe["name"],
        "folds": folds,
        "cv_set": cv_set,
        "splits": list(CV_SPLITS),
        "seed": seed,
        "weights": weights,
        "checkpoint": checkpoint_file(weights),
        "spacing_mm": spacing_mm,
        "held_out_used_for_selection": False,
        "early_stopping": False,
        "selected_on": selected_on if weights == "best" else None,
    }
    return write_report(run_dir, settings, [results[k] for k in sorted(results)])
