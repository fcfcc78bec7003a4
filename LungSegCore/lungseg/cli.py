# size: the argparse table (parser) is half of the file; the rest are the subcommands' thin entry points
"""The `lungseg` command: segment, evaluate, fit-qc, train, export and models."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import traceback

from .definitions import DEFINITIONS
from .errors import LungSegError
from .io.files import CHECKPOINTS
from .io.radiograph import DEFAULT_MAX_PIXELS, OUTPUT_FORMATS
from .memory import keep_freed_memory

# Exit statuses (README): 0 done, 1 some inputs failed, 2 the user's error (one line), 3 an internal error (with its
# traceback), 130 interrupted, 141 the reader of the output left.
INTERNAL_ERROR = 3


def _segment(args) -> int:
    from .batch.run import Options, run_segment
    from .models.cards import resolve_model

    options = Options(
        fmt=args.format,
        overlays=args.overlays,
        save_probabilities=args.save_probabilities,
        uncertainty=args.uncertainty,
        overwrite=args.overwrite,
        max_pixels=args.max_pixels or None,
        orientation=not args.no_orientation_check,
        corrections=args.corrections,
    )
    return run_segment(
        args.inputs,
        args.output,
        model=resolve_model(args.model, args.definition),
        options=options,
        device=args.device,
        recursive=args.recursive,
        shard=args.shard,
        batch_size=args.batch_size,
        workers=args.workers,
        progress_lines=args.progress_lines,
    )


def _evaluate(args) -> int:
    from .evaluation.evaluate import evaluate, summary_line
    from .models.cards import resolve_model

    summary = evaluate(
        args.images,
        args.masks,
        model=resolve_model(args.model, args.definition),
        out_dir=args.output,
        split=args.split,
        masks_right=args.masks_right,
        masks_left=args.masks_left,
        device=args.device,
        truth_definition=args.truth_definition,
        uncertainty=args.uncertainty,
        spacing_mm=args.spacing_mm,
        orientation=not args.no_orientation_check,
        corrections=args.corrections,
    )
    print(f"lungseg: {summary_line(summary)}; details in {args.output}")
    return 0


def _fit_qc(args) -> int:
    from .io.files import write_atomic_text
    from .models.cards import resolve_model
    from .qc.fit import fit_card_qc, fit_summary

    model = resolve_model(args.model, args.definition)
    block, problems = fit_card_qc(
        model,
        args.data,
        split=args.split,
        perturbations=args.perturbations,
        uncertainty=args.uncertainty,
        device=args.device,
        write=args.write,
        overwrite=args.overwrite,
        max_false_flags=args.max_false_flags,
        batch_size=args.batch_size,
        command=shlex.join(["lungseg", *args.argv]),
    )
    for line in fit_summary(block):
        print(f"lungseg: {line}")
    if args.report:
        write_atomic_text(json.dumps(block, indent=1) + "\n", args.report)
    print(
        f"lungseg: wrote the QC of model '{model}' into its card"
        if args.write
        else "lungseg: measured only; --write stores this QC in the model's card"
    )
    if problems:  # fitted on the others, like a batch that finishes around a bad file; the status says so
        print(
            f"lungseg: {len(problems)} labelled image(s) could not be used and were left out (listed above)",
            file=sys.stderr,
        )
    return 1 if problems else 0


def _train(args) -> int:
    from .training.config import load_config
    from .training.trainer import train

    config = load_config(args.config)
    if args.seed is not None:  # another member of an ensemble: same recipe, its own run folder
        config = dict(
            config, name=f"{config['name']}-seed{args.seed}", training=dict(config["training"], seed=args.seed)
        )
    run = train(
        config,
        data_root=args.data_root,
        out_dir=args.output,
        device=args.device,
        max_steps=args.max_steps,
        resume=not args.no_resume,
    )
    print(f"lungseg: training run in {run}")
    return 0


def _export(args) -> int:
    from .training.export import PACKAGE_MODELS, export_model, export_run

    if bool(args.run) == bool(args.from_model):
        raise LungSegError("export takes training run folders, or --from-model with an existing model, not both")
    if args.from_model:
        card = export_model(args.from_model, data_root=args.data_root, device=args.device)
    else:
        card = export_run(
            args.run,
            args.out_dir or PACKAGE_MODELS,
            data_root=args.data_root,
            device=args.device,
            name=args.name,
            weights=args.weights,
            cross_validation=args.cross_validation,
            overwrite=args.overwrite,
        )
    print(f"lungseg: exported {card}")
    return 0


def _models(args) -> int:
    from .models.cards import list_models

    cards = list_models()
    if args.json:
        print(json.dumps(cards, indent=2))
        return 0
    for card in cards:
        dice = {k: v.get("both_dice", {}).get("mean") for k, v in card.get("metrics", {}).items()}
        scores = ", ".join(f"{k} Dice {v:.4f}" for k, v in dice.items() if v is not None)
        speed = card.get("speed", {}).get("forward_ms_per_image")
        members = card["network"].get("params", {}).get("members")
        network = f"{card['network']['name']} of {len(members)}" if members else card["network"]["name"]
        print(
            f"{card['name']:<12} {card.get('definition', ''):<12} {network:<10} {card['input_size']}px  {scores}"
            + (f"  {speed:.0f} ms/image (1 CPU thread)" if speed else "")
        )
        if card.get("definition_text"):
            print(f"{'':<12} {card['definition_text']}")
        print(f"{'':<12} {_qc_status(card)}")
        for key, evaluation in card.get("cross_validation", {}).get("evaluations", {}).items():
            folds, unit = evaluation["across_folds"], evaluation.get("hd95_unit", "px")
            print(
                f"{'':<12} recipe's {len(evaluation['per_fold'])}-fold cross-validation, {key}: Dice "
                f"{folds['both_dice']['mean']:.4f} ± {folds['both_dice']['sd']:.4f}, HD95 "
                f"{folds['both_hd95']['mean']:.2f} {unit}"
            )
    return 0


def _qc_status(card: dict) -> str:
    """`QC: predicted quality fitted 2026-11-24 (default, uncertainty modes), threshold 0.953`, or what is missing."""
    block = card.get("qc") or {}
    modes = list(block.get("modes") or {})
    if not modes:
        return "QC: rules only, no predicted quality (`lungseg fit-qc --model NAME --data DIR --write` fits one)"
    threshold = block.get("threshold")
    off = [mode for mode, fit in block["modes"].items() if not fit.get("fragments_rule", True)]
    return (
        f"QC: predicted quality fitted {block.get('fitted', '')} ({', '.join(modes)} mode"
        f"{'s' if len(modes) > 1 else ''})"
        + (f", threshold {threshold:.3f}" if threshold is not None else "")
        + (f"; fragments rule off in the {' and '.join(off)} mode{'s' if len(off) > 1 else ''}" if off else "")
    )


def _pixel_count(text: str) -> int:
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a pixel count (e.g. 50000000 or 5e7)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the pixel limit cannot be negative")
    return value


def _corrections(text: str):
    from .inference.orientation import Corrections

    try:
        return Corrections.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _at_least(minimum: int):
    """An argparse type: a whole number of at least `minimum` (a batch of 0 images, or -1 workers, is a usage error
    here, not a traceback from the data loader)."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: give {minimum} or more")
        return value

    return count


# size: the argparse table of every subcommand and option, read top to bottom as the command's reference
def parser() -> argparse.ArgumentParser:
    # --debug is accepted before and after the command; SUPPRESS keeps a subcommand from resetting it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error (also LUNGSEG_DEBUG=1)",
    )
    p = argparse.ArgumentParser(
        prog="lungseg", description="Right and left lung segmentation on chest radiographs", parents=[common]
    )
    orientation = argparse.ArgumentParser(add_help=False)
    orientation.add_argument(
        "--corrections",
        type=_corrections,
        default="turns,inversion,mirroring",
        metavar="LIST",
        help="what a film's pixels may correct before segmenting: turns (90/180/270 degrees), inversion (air "
        "bright), mirroring (Right and Left from the anatomy, flagged for a check); a comma-separated list, or none "
        "(default: all three). A DICOM PatientOrientation always wins over the pixels",
    )
    orientation.add_argument(
        "--no-orientation-check",
        action="store_true",
        help="do not run the orientation classifier (nothing is corrected or flagged from the pixels)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "segment", help="segment radiographs (files or folders) into labelmaps", parents=[common, orientation]
    )
    s.add_argument("inputs", nargs="+", help="image files, folders, or .txt files listing image paths")
    s.add_argument("-o", "--output", required=True, help="output folder")
    s.add_argument("--model", help="model name, or path to a model card/weights (overrides --definition)")
    s.add_argument(
        "--definition",
        choices=list(DEFINITIONS),
        help="use the best available model of this lung definition (default: lung-fields)",
    )
    s.add_argument(
        "--format",
        default="nrrd",
        choices=list(OUTPUT_FORMATS),
        help="labelmap format (default nrrd); dicom-seg writes a DICOM Segmentation that references its "
        "DICOM input (DICOM inputs only)",
    )
    s.add_argument(
        "--max-pixels",
        type=_pixel_count,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"refuse an image whose header declares more than N pixels, before decoding it "
        f"(default {DEFAULT_MAX_PIXELS:_}; 0: no limit)",
    )
    s.add_argument("--overlays", action="store_true", help="also write a PNG overlay per image")
    s.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write the class probabilities (background, right, left) on the input grid",
    )
    s.add_argument(
        "--uncertainty",
        action="store_true",
        help="also write a per-pixel uncertainty map (test-time augmentation without flips)",
    )
    s.add_argument("--recursive", action="store_true", help="search folders recursively")
    s.add_argument("--overwrite", action="store_true", help="redo inputs that an earlier run completed")
    s.add_argument("--shard", metavar="I/N", help="process only shard I of N (1-based), e.g. for a SLURM array")
    s.add_argument("--batch-size", type=_at_least(1), default=4)
    s.add_argument(
        "--workers", type=_at_least(0), help="DataLoader workers that read and preprocess (default: cores - 1)"
    )
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.add_argument(
        "--progress-lines",
        action="store_true",
        help="print 'lungseg-progress I/N STATUS PATH' per input instead of a progress bar; STATUS is "
        "ok, check (segmented, flagged by QC), error or skipped (a DICOM object with no image)",
    )
    s.set_defaults(func=_segment)

    e = sub.add_parser("evaluate", help="score a model against reference masks", parents=[common, orientation])
    e.add_argument("--images", required=True)
    e.add_argument("--masks", required=True, help="both-lung masks (0/255) named like the images")
    e.add_argument("--masks-right", help="right-lung masks (default: masks_right/ beside --masks, if present)")
    e.add_argument("--masks-left", help="left-lung masks (default: masks_left/ beside --masks, if present)")
    e.add_argument("--split", help="only images of this split in splits.csv beside the images folder")
    e.add_argument("--model", help="model name or card path (overrides --definition)")
    e.add_argument(
        "--definition", choices=list(DEFINITIONS), help="best model of this lung definition (default lung-fields)"
    )
    e.add_argument(
        "--truth-definition",
        choices=list(DEFINITIONS),
        help="the lung definition the reference masks follow; a warning is printed if the model differs",
    )
    e.add_argument(
        "--spacing-mm",
        type=float,
        metavar="MM",
        help="pixel size of images whose file states none (PNG, JPEG), so that HD95 is in mm (JSRT at 512x512: 0.7)",
    )
    e.add_argument("-o", "--output", default="lungseg-evaluation", help="folder for evaluation.csv and summary.json")
    e.add_argument(
        "--uncertainty",
        action="store_true",
        help="segment as `lungseg segment --uncertainty` does, and measure that mode's QC",
    )
    e.add_argument("--device", default="auto")
    e.set_defaults(func=_evaluate)

    q = sub.add_parser(
        "fit-qc",
        help="fit a model's quality control (predicted Dice and threshold) on labelled "
        "images, measured on the half it was not fitted on",
        parents=[common],
    )
    q.add_argument(
        "--data",
        required=True,
        help="a data set folder: images/, masks/ (0/255, both lungs), optionally "
        "masks_right/, masks_left/, masks_ignore/ and splits.csv (a patient column keeps a patient's "
        "images in one half); images of the splits the model trained on are left out",
    )
    q.add_argument("--split", help="only the images of this split of splits.csv")
    q.add_argument("--model", help="model name or card path (overrides --definition)")
    q.add_argument(
        "--definition", choices=list(DEFINITIONS), help="best model of this lung definition (default lung-fields)"
    )
    q.add_argument(
        "--perturbations",
        type=_at_least(0),
        default=4,
        metavar="K",
        help="degraded copies of each image (an opacity or occluder over a lung, rotation, zoom-out, "
        "crop, gamma, noise, blur): the failures a good model's own results lack (default 4)",
    )
    q.add_argument("--uncertainty", action="store_true", help="also fit the --uncertainty mode's QC")
    q.add_argument(
        "--max-false-flags",
        type=float,
        default=0.10,
        metavar="RATE",
        help="the highest share of good results (Dice >= 0.90) the threshold may flag on the fit half (default 0.10)",
    )
    q.add_argument(
        "--write",
        action="store_true",
        help="store the fitted QC in the model's card (only its qc block changes, never the weights)",
    )
    q.add_argument("--overwrite", action="store_true", help="with --write, replace the card's fitted QC")
    q.add_argument("--report", metavar="FILE", help="also write the fitted block and its measurements (JSON) here")
    q.add_argument("--batch-size", type=_at_least(1), default=4)
    q.add_argument("--device", default="auto")
    q.set_defaults(func=_fit_qc)

    t = sub.add_parser("train", help="train a network from a YAML config", parents=[common])
    t.add_argument("--config", required=True, help="YAML file, or the name of a packaged config (e.g. unet)")
    t.add_argument("--data-root", help="folder holding the data sets named in the config")
    t.add_argument("-o", "--output", help="run folder (default runs/<name>)")
    t.add_argument("--device", default="auto")
    t.add_argument(
        "--seed",
        type=int,
        help="train the recipe with this seed instead (run name <name>-seed<N>), "
        "e.g. a second member for `lungseg export RUN RUN`",
    )
    t.add_argument("--max-steps", type=_at_least(1), help="stop after this many optimizer steps (smoke runs)")
    t.add_argument("--no-resume", action="store_true", help="start over even if the run folder has last.pt")
    t.set_defaults(func=_train)

    x = sub.add_parser(
        "export",
        help="export a run's best checkpoint, or the ensemble of several runs, as a model with a measured model card",
        parents=[common],
    )
    x.add_argument("run", nargs="*", help="training run folder; several make an ensemble (probabilities averaged)")
    x.add_argument(
        "--from-model",
        metavar="MODEL",
        help="an existing model (name or card): write its ONNX graphs from "
        "its safetensors and measure its card's metrics again, on the graphs",
    )
    x.add_argument("--name", help="the model's name (default: the first run's recipe name)")
    x.add_argument(
        "--weights",
        choices=CHECKPOINTS,
        default="best",
        help="best.pt (default; the best validation score) or last.pt (the final epoch: a fixed-schedule "
        "recipe's weights, as its cross-validation scored them)",
    )
    x.add_argument(
        "--cross-validation",
        metavar="CV_SUMMARY",
        help="the recipe's cv_summary.json "
        "(scripts/cross_validate.py), recorded in the card and shown by `lungseg models`",
    )
    x.add_argument("--out-dir", help="destination (default: the package's models folder)")
    x.add_argument("--overwrite", action="store_true", help="replace a model of the same name in --out-dir")
    x.add_argument("--data-root")
    x.add_argument("--device", default="auto")
    x.set_defaults(func=_export)

    m = sub.add_parser("models", help="list the available models and their model cards", parents=[common])
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # as given, for the record of a fit
    keep_freed_memory()  # this process is ours alone: a faster forward pass (see memory.py)
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, not at exit: a pipe closed early must end in the handler below
        return status
    except KeyboardInterrupt:  # outputs are written atomically: whatever finished stays, nothing is half-written
        print("lungseg: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output left (`lungseg models | head -1`): stop quietly, like `cat`
        return _closed_stdout()
    except LungSegError as exc:  # the user's to fix; anything else is a bug and keeps its traceback
        if getattr(args, "debug", False) or os.environ.get("LUNGSEG_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"lungseg: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, or the machine (memory): not "some inputs failed" (1)
        traceback.print_exc()
        print(
            f"lungseg: internal error: {type(exc).__name__}: {exc} (the traceback is above; every output "
            "finished before it is complete)",
            file=sys.stderr,
        )
        return INTERNAL_ERROR


def _closed_stdout() -> int:
    """Exit status 141 (128 + SIGPIPE, as a shell reports for `cat` in the same place), with no traceback: stdout
    goes to /dev/null, so that the interpreter's final flush cannot raise BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (an embedding host)
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
