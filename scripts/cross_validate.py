#!/usr/bin/env python
"""K-fold cross-validation of a training recipe over JSRT train+val (196 images), stratified by nodule/non-nodule,
one patient per image. A thin shell over `lungseg.training.crossval` (see there for what each fold trains and scores).

    .venv/bin/python scripts/cross_validate.py --config unet-jsrt-cv --folds 5 -o runs/unet-jsrt-cv \\
        --data-root ../shared/data --also covid-qu-ex:val

Writes RUN/fold-K/ (a training run, its model card and its evaluations) and RUN/cv_summary.json and .md (per fold
Dice both/right/left, HD95 in mm and images; mean ± sd across folds; pooled per image). Each fold trains the recipe's
fixed schedule (no early stopping) and its final weights are scored; the held-out fold chooses nothing. Re-running
resumes an unfinished fold at its exact step and skips finished ones; `--fold K` runs one fold (e.g. one per job).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lungseg.errors import LungSegError
from lungseg.io.files import CHECKPOINTS
from lungseg.training.config import load_config
from lungseg.training.crossval import cross_validate


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="recipe YAML, or a packaged config's name (e.g. unet-jsrt-cv)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("-o", "--output", required=True, help="run folder (fold-K/ and the summary go here)")
    p.add_argument("--data-root", help="folder holding the data sets (default: the recipe's data.root)")
    p.add_argument("--fold", type=int, help="train and score only this fold (0-based)")
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="SET:SPLIT",
        help="also score each fold's model on this set (e.g. covid-qu-ex:val); repeatable",
    )
    p.add_argument(
        "--weights",
        choices=CHECKPOINTS,
        default="last",
        help="score each fold's final weights, last.pt (default), or best.pt, selected on the recipe's "
        "non-JSRT validation sets (e.g. covid-qu-ex val); the held-out fold selects neither",
    )
    p.add_argument("--set", default="jsrt", help="the set to cross-validate (default jsrt)")
    p.add_argument("--spacing-mm", type=float, help="its pixel size for HD95 in mm (default: 0.7 for jsrt)")
    p.add_argument("--seed", type=int, help="seed of the fold assignment (default: the recipe's, else 0)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-steps", type=int, help="stop each fold's training after this many steps (smoke runs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        summary = cross_validate(
            load_config(args.config),
            args.output,
            folds=args.folds,
            data_root=args.data_root,
            only_fold=args.fold,
            also=args.also,
            weights=args.weights,
            cv_set=args.set,
            spacing_mm=args.spacing_mm,
            seed=args.seed,
            device=args.device,
            max_steps=args.max_steps,
        )
    except LungSegError as exc:
        print(f"lungseg: error: {exc}", file=sys.stderr)
        return 2
    print(Path(args.output, "cv_summary.md").read_text())
    if not summary["complete"]:
        print(f"lungseg: {len(summary['folds_done'])} of {args.folds} folds scored so far")
    return 0


if __name__ == "__main__":
    sys.exit(main())
