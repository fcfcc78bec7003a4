#!/usr/bin/env python
# size: a maintainer script: the fitting is lungseg/qc/fit.py; here the sources, pools and report tables
"""Fit the predicted quality (`lungseg/qc/model.py`) of shipped models and write each card's `qc` block.

The fitting itself is `lungseg/qc/fit.py` (and the modules it calls), which `lungseg fit-qc` also uses for a
user's own model or data set; this script adds what the shipped cards are fitted and measured with: several data
sets, the peer models, the failure sources, the cross-validation folds of a recipe, both directions of the halves
and a cache.

    .venv/bin/python scripts/fit_quality.py --model unet-full-extent --write   # one retrained card
    .venv/bin/python scripts/fit_quality.py --write                            # every shipped card
    .venv/bin/python scripts/fit_quality.py --modes default --report qc.json   # measure only, write nothing

For each card:
1. Segments the labelled images of the card's lung definition (JSRT and COVID-QU-Ex for lung fields, v7-full for the
   full extent) that lie outside the model's training splits, with the card's model (`own`) and with the other
   shipped models of the same definition (`peers`), and the same images degraded on purpose (`perturbed`, own
   model only): a bright opacity or an occluder over a lung, strong rotation, zoom-out, a crop, extreme gamma,
   noise or blur, with the reference mask moved alike. Those give the card's own model failures in numbers that
   its validation images alone do not hold (a few per hundred).
2. Splits the images in two halves by a hash of their name (of the patient for v7-full), the same for every model
   and perturbation: the regression and its threshold are fitted on the `fit` half only, and every number in the
   card's `validation` is measured on the `measure` half, on images the fit never saw.
3. Fits the fractional logistic regression of the Dice on the features, per mode (`default`; `uncertainty` with the
   test-time augmentation or latent samples of `--uncertainty`), with the feature set (the boundary's
   uncertainty, the output's whole confidence, or with the shape's plausibility; each also with the shape prior
   and with the image's edges; in the uncertainty mode, each with or without the samples' spread) and the ridge
   penalty that rank the fit half's real images best within
   each data set under cross-validation within that half, chooses the threshold on the fit half (the highest
   recall of Dice < 0.90 whose false-flag rate, rules included, stays within `--max-false-flags`, pooled and per
   data set), and writes the `qc` block (only that block: the weights and their SHA-256 are untouched).
4. Also measures the card's QC on *failure sources* it was not fitted on: the shipped models of the other lung
   definition, and the weaker models in `--sources-dir` (a U-Net trained on JSRT alone and its early checkpoints,
   made with `scripts/quality-source-jsrt-only.yaml` and `--add-source`). `--fit-failure-sources` also fits on them;
   measured here, that hurt the shipped models' QC (`LungSegCore/docs/quality-control.md`).

`--swap-halves` runs the same fit with the halves exchanged, the second direction of a two-fold cross-fitting, so
that every image is held out once; with `--write` it writes only the card's `qc.swapped` (what that fit measured on
the fit half), never the regression users get, and `--table` adds both directions up.

Model outputs are cached per model weights, data set, perturbation and mode under `--cache` (compressed uint8
softmax), so refitting after a card was retrained segments only with that model, and the features can change
without segmenting again.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lungseg.qc.fit import MODES, empty_qc_block, fit_qc_mode, merged_modes, merged_qc  # noqa: E402
from lungseg.qc.pool import (  # noqa: E402
    cases_for,
    is_ensemble,
    item_key,
    model_outputs,
    read_groups,
    scored_rows,
    trained_on,
    training_entries,
)
from lungseg.qc.selection import L2_GRID, NO_SPREAD, WITH_EDGES, WITH_PRIOR, candidate_sets  # noqa: E402
from lungseg.qc.tables import (  # noqa: E402
    DATASETS,
    both_directions_table,
    dataset_table,
    markdown_table,
    summary_line,
)

REPO = Path(__file__).resolve().parent.parent


# -- images, halves and the sources -------------------------------------------------------------------------


def swap_halves(rows: list[dict]) -> list[dict]:
    """The rows with the halves exchanged: the same procedure fitted on the measure half and measured on the fit
    half, a second held-out estimate over as many other images (two-fold cross-fitting)."""
    other = {"fit": "measure", "measure": "fit"}
    return [{**r, "half": other[r["half"]]} for r in rows]


def add_source(run_dir: Path, name: str, sources_dir: Path, checkpoint: str = "last.pt") -> Path:
    """A training run's checkpoint as a model (safetensors and card) in the sources folder."""
    from lungseg.models.cards import save_model
    from lungseg.training.export import model_from_run

    model, state, config = model_from_run(run_dir, checkpoint)
    card = {
        "name": name,
        "version": "qc-source",
        "definition": config.get("definition", "lung-fields"),
        "network": config["network"],
        "input_size": config["input_size"],
        "data": config["data"],
        "recipe": config,
        "training": {
            "checkpoint": checkpoint,
            "epoch": int(state.get("epoch", 0)),
            "step": int(state.get("step", 0)),
            "run": str(run_dir),
        },
        "note": "a failure source for scripts/fit_quality.py, not a model to use",
    }
    sources_dir.mkdir(parents=True, exist_ok=True)
    return save_model(model, card, sources_dir)


# -- features and Dice per image ----------------------------------------------------------------------------


def cached_outputs(card_path: str, card: dict, dataset: str, items: list, mode: str, cache: Path) -> dict:
    """`model_outputs` through a cache per model weights, data set and mode (a compressed .npz): items that an
    earlier run segmented (with any limit) are not segmented again, and the features can change freely."""
    path = cache / f"{card['name']}-{card['sha256'][:12]}-{dataset}-{mode}.npz"
    maps = (
        ("probabilities",)
        + (("spread",) if mode == "uncertainty" else ())
        + (("member_spread",) if is_ensemble(card) else ())
    )
    known = {}
    if path.exists():
        with np.load(path) as data:  # each data[key] decompresses the whole array: once per key
            if all(m in data for m in maps):  # else written before a map was kept: segment again
                names, arrays = data["names"], {m: data[m] for m in maps}
                for i, name in enumerate(names):
                    known[str(name)] = tuple(
                        arrays[m][i] if m in arrays else None for m in ("probabilities", "spread", "member_spread")
                    )
    missing = [it for it in items if item_key(*it) not in known]
    if missing:
        t0 = time.perf_counter()
        from lungseg.inference.segmenter import Segmenter

        known.update(model_outputs(Segmenter(card_path, "cpu"), missing, mode))
        names = sorted(known)
        arrays = {"names": np.array(names)}
        for i, m in enumerate(("probabilities", "spread", "member_spread")):
            if m in maps:
                arrays[m] = np.stack([known[n][i] for n in names])
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
        print(
            f"  {card['name']} on {dataset} ({mode}): {len(missing)} images in {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
    return known


def dataset_rows(
    card_path: str, dataset: str, root: Path, mode: str, limit: int, variants: int, cache: Path
) -> list[dict]:
    """One model on the chosen images of one data set (and `variants` perturbations of each): the features, the
    rule flags and the Dice of each (`pool.scored_rows`)."""
    from lungseg.models.cards import read_card

    card = read_card(card_path)
    cases = cases_for(card, dataset, root, limit)
    items = [(case, v) for case in cases for v in range(variants + 1)]
    outputs = cached_outputs(card_path, card, dataset, items, mode, cache)
    return scored_rows(outputs, items, dataset, read_groups(root / dataset))


# -- the pool of a card's fit -------------------------------------------------------------------------------


def cv_fold_cards(run_dir: Path) -> list[str]:
    """The fold models (cards) of a `scripts/cross_validate.py` run, each to be scored on its held-out fold."""
    cards = sorted(str(p) for p in run_dir.glob("fold-*/model-last/*.json") if p.with_suffix(".safetensors").exists())
    if not cards:
        raise SystemExit(f"fit_quality: {run_dir} holds no scored fold (fold-K/model-last/); run cross_validate.py")
    return cards


def cross_validated(card: dict, dataset: str) -> bool:
    return any(e["set"] == dataset and "folds" in e for e in training_entries(card))


def role_on(role: str, source_card: dict, dataset: str) -> str:
    """A peer that never trained on `dataset` is out of its domain there (`unet-512`, trained on JSRT alone, on
    COVID-era films): like the other definition's models, it is a failure source on that set, measured and not
    fitted, so that its failures neither train the card's regression nor spend the card's false-flag budget."""
    if role == "peer" and not trained_on(source_card, dataset):
        return "failure"
    return role


def pool_for(
    card: dict,
    peers: list[str],
    failures: list[str],
    root: Path,
    mode: str,
    limits: dict,
    source_limits: dict[str, int],
    variants: dict[str, int],
    cache: Path,
    folds: list[str] = (),
) -> list[dict]:
    """Rows of the card's own model (real and perturbed images), its peers, the fold models of its recipe's
    cross-validation (`folds`, each on its held-out images only) and, in the default mode, the failure sources on
    every data set of the card's definition."""
    from lungseg.models.cards import read_card

    pool = []
    for role, sources in (("own", [card["card_path"]]), ("peer", peers), ("cv", folds), ("failure", failures)):
        for source in sources:
            source_card = read_card(source)
            for dataset, definition in DATASETS.items():
                if definition != card["definition"] or not (root / dataset / "images").is_dir():
                    continue
                role_here = role_on(role, source_card, dataset)
                if role_here == "failure" and mode != "default":
                    continue  # the failure sources are measured in the default mode only
                if role == "cv" and not cross_validated(source_card, dataset):
                    continue  # a fold model stands in for the card's own model on its held-out fold only
                limit = min(
                    limits["failure" if role_here == "failure" else mode],
                    source_limits.get(source_card["name"], limits[mode]),
                )
                if not cases_for(source_card, dataset, root, 1):
                    continue
                count = variants.get(dataset, 1) if role == "own" else 0
                for row in dataset_rows(source, dataset, root, mode, limit, count, cache):
                    pool.append(
                        {
                            **row,
                            "dataset": dataset,
                            "source": source_card["name"],
                            "role": role_here,
                            "source_definition": source_card.get("definition", ""),
                            "in_domain": trained_on(source_card, dataset),
                        }
                    )
    return pool


# size: the argparse table of the script's options
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="shipped model(s) to fit (default: every shipped model)")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument(
        "--sources-dir",
        default=str(REPO.parent / "runs" / "quality-sources" / "models"),
        help="failure-source models (cards and safetensors), see --add-source",
    )
    parser.add_argument("--cache", default=str(REPO.parent / "runs" / "quality-cache"))
    parser.add_argument("--modes", nargs="+", default=["default", "uncertainty"], choices=MODES)
    parser.add_argument("--max-images", type=int, default=1000, help="per model and data set, default mode")
    parser.add_argument(
        "--max-images-uncertainty",
        type=int,
        default=120,
        help="per model and data set, uncertainty mode (9-16 forward passes per image)",
    )
    parser.add_argument("--max-images-failure", type=int, default=400, help="per failure source and data set")
    parser.add_argument(
        "--source-limit",
        action="append",
        default=["unetpp=150"],
        metavar="NAME=N",
        help="fewer images for a slow model (default: unetpp=150, 16x the U-Net's forward cost)",
    )
    parser.add_argument(
        "--perturbations",
        action="append",
        default=["jsrt=6", "covid-qu-ex=1", "v7-full=4"],
        metavar="SET=K",
        help="perturbed copies of each image of a data set, own model only",
    )
    parser.add_argument(
        "--cv-run",
        action="append",
        default=[],
        metavar="NAME=RUN",
        help="the cross-validation run (scripts/cross_validate.py -o RUN) of model NAME's recipe: "
        "its fold models on their held-out images join the fit and are measured apart",
    )
    parser.add_argument("--no-peers", action="store_true", help="fit on the card's own model alone")
    parser.add_argument("--fit-failure-sources", action="store_true", help="also fit on the failure sources")
    parser.add_argument("--no-failure-sources", action="store_true", help="do not measure the failure sources")
    parser.add_argument(
        "--l2",
        default="auto",
        help="ridge penalty of the regression; auto (default): chosen "
        f"from {', '.join(map(str, L2_GRID))} by cross-validation within the fit half",
    )
    parser.add_argument(
        "--features",
        default="auto",
        choices=("auto", *candidate_sets("uncertainty", with_prior=True, with_edges=True)),
        help="feature set of the regression (lungseg.qc.features.FEATURE_SETS; with the shape prior "
        f"where it says '{WITH_PRIOR}', with the image's edges where it says '{WITH_EDGES}'; in the "
        f"uncertainty mode with the samples' spread unless it "
        f"ends in '{NO_SPREAD}'); auto (default): chosen with the penalty by cross-validation within "
        "the fit half",
    )
    parser.add_argument(
        "--perturbed-weight",
        type=float,
        default=0.3,
        help="weight of a perturbed image in the regression (a real one weighs 1)",
    )
    parser.add_argument(
        "--max-false-flags",
        type=float,
        default=0.10,
        help="the highest false-flag rate on real images (rules included) allowed on the fit half",
    )
    parser.add_argument("--dice-limit", type=float, default=0.90)
    parser.add_argument("--write", action="store_true", help="write the qc block into each card")
    parser.add_argument("--report", help="also write the full report (JSON) here")
    parser.add_argument(
        "--add-source",
        nargs=2,
        metavar=("RUN_DIR", "NAME"),
        help="only turn RUN_DIR/last.pt into a failure-source model NAME in --sources-dir",
    )
    parser.add_argument(
        "--dump-rows",
        help="also save every scored row (features, rules, Dice) to this pickle, for studying the method offline",
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="only print the QC tables of the README and LungSegCore/docs/quality-control.md from the cards",
    )
    parser.add_argument(
        "--swap-halves",
        action="store_true",
        help="fit on the measure half and measure on the fit half; --write then writes only the "
        "card's qc.swapped, for the both-directions table of --table",
    )
    parser.add_argument("--threads", type=int, default=2)
    return parser


def pool_settings(args) -> dict:
    """`pool_for`'s data root, image limits, perturbations and cache, from the options."""
    return {
        "root": Path(args.data_root),
        "cache": Path(args.cache),
        "limits": {
            "default": args.max_images,
            "uncertainty": args.max_images_uncertainty,
            "failure": args.max_images_failure,
        },
        "source_limits": {k: int(v) for k, v in (item.split("=") for item in args.source_limit)},
        "variants": {k: int(v) for k, v in (item.split("=") for item in args.perturbations)},
    }


def fit_settings(args) -> dict:
    """`fit_qc_mode`'s options, from the command line."""
    return {
        "dice_limit": args.dice_limit,
        "perturbed_weight": args.perturbed_weight,
        "max_false_flags": args.max_false_flags,
        "feature_sets": None if args.features == "auto" else [args.features],
        "l2_grid": L2_GRID if args.l2 == "auto" else (float(args.l2),),
        "fit_failure_sources": args.fit_failure_sources,
        "command": shlex.join(["scripts/fit_quality.py", *sys.argv[1:]]),  # the options of this fit
        "half": "measure" if args.swap_halves else "fit",
    }


def card_sources(name: str, definition: str, shipped: list[str], extra: list[str], args) -> tuple[list, list]:
    """The card's peers (the other shipped models of its definition) and failure sources (the shipped models of the
    other definition, and the weaker models of --sources-dir), as card paths."""
    from lungseg.models.cards import read_card

    peers = (
        []
        if args.no_peers
        else [read_card(s)["card_path"] for s in shipped if s != name and read_card(s).get("definition") == definition]
    )
    failures = (
        []
        if args.no_failure_sources
        else [read_card(s)["card_path"] for s in shipped if read_card(s).get("definition") != definition] + extra
    )
    return peers, failures


def fit_card(
    name: str, card: dict, sources: tuple[list, list], args, settings: dict, cv_runs: dict[str, Path]
) -> dict | None:
    """The card's qc block, fitted mode by mode on its pool (`pool_for`); None where a fit fails (its error
    printed)."""
    from lungseg.errors import LungSegError

    block = empty_qc_block(args.dice_limit, f"scripts/fit_quality.py --model {name} --write")
    for mode in args.modes:
        print(f"fit_quality: {name}, {mode} mode", file=sys.stderr)
        pool = pool_for(
            card, *sources, mode=mode, folds=cv_fold_cards(cv_runs[name]) if name in cv_runs else [], **settings
        )
        if args.swap_halves:
            pool = swap_halves(pool)
        if args.dump_rows:
            import pickle

            Path(args.dump_rows).write_bytes(pickle.dumps({"card": name, "mode": mode, "rows": pool}))
        try:
            block["modes"][mode], block["validation"][mode] = fit_qc_mode(
                pool, mode, card["definition"], ensemble=is_ensemble(card), **fit_settings(args)
            )
        except LungSegError as exc:
            print(f"fit_quality: {name}: {exc}", file=sys.stderr)
            return None
        print(
            f"  threshold {block['modes'][mode]['threshold']:.4f}\n" + summary_line(name, block["validation"][mode]),
            file=sys.stderr,
        )
    block["threshold"] = block["modes"]["default"]["threshold"] if "default" in block["modes"] else None
    return block


def write_card_qc(card: dict, block: dict, swapped: bool) -> None:
    """The fitted block into the card's file (only its qc block changes, never the weights); with `swapped` only
    the other direction's measurements (`qc.swapped`), never the regression users get."""
    from lungseg.io.files import write_atomic_text

    path = Path(card["card_path"])
    data = json.loads(path.read_text())
    if swapped:
        other = {
            "modes": {
                mode: {
                    **{k: fit["fitted_on"][k] for k in ("command", "feature_set", "l2")},
                    "threshold": fit["threshold"],
                }
                for mode, fit in block["modes"].items()
            },
            "validation": block["validation"],
        }
        data["qc"]["swapped"] = merged_modes(data["qc"].get("swapped"), other)
    else:
        data["qc"] = merged_qc(data.get("qc"), block)
    write_atomic_text(json.dumps(data, indent=2) + "\n", path)
    print(f"fit_quality: wrote the qc block of {path}", file=sys.stderr)


def main() -> int:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)

    from lungseg.models.cards import PACKAGE_MODELS, read_card

    sources_dir = Path(args.sources_dir)
    if args.table:
        names = args.model or sorted(p.stem for p in PACKAGE_MODELS.glob("*.json"))
        print(markdown_table(names) + "\n\n" + dataset_table(names) + "\n\n" + both_directions_table(names))
        return 0
    if args.add_source:
        print(add_source(Path(args.add_source[0]), args.add_source[1], sources_dir))
        return 0
    shipped = sorted(p.stem for p in PACKAGE_MODELS.glob("*.json") if p.with_suffix(".safetensors").exists())
    extra = (
        sorted(str(p) for p in sources_dir.glob("*.json") if p.with_suffix(".safetensors").exists())
        if sources_dir.is_dir()
        else []
    )
    settings = pool_settings(args)
    cv_runs = {k: Path(v) for k, v in (item.split("=", 1) for item in args.cv_run)}
    report = {}
    for name in args.model or shipped:
        card = read_card(name)
        sources = card_sources(name, card["definition"], shipped, extra, args)
        block = fit_card(name, card, sources, args, settings, cv_runs)
        if block is None:
            return 1
        report[name] = block
        if args.write:
            write_card_qc(card, block, args.swap_halves)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
