"""The summary of a cross-validation (`crossval`): RUN/cv_summary.json and a markdown table, RUN/cv_summary.md.

For each scored set (the held-out folds, and any `also` set): per fold the mean Dice (both lungs, right, left),
the mean HD95 and the number of images; across folds the mean and the sample standard deviation (n - 1) of those
fold means; and pooled, the mean and standard deviation over every image of every fold.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..io.files import write_atomic_text

REPORTED = ("both_dice", "right_dice", "left_dice", "both_hd95")
COLUMNS = {"both_dice": "Dice both", "right_dice": "Dice right", "left_dice": "Dice left", "both_hd95": "HD95"}


def fold_rows(results: list[dict], key: str) -> list[dict]:
    """One row per fold scored on `key`: its image count and the mean of each reported metric."""
    rows = []
    for result in results:
        summary = result["scores"].get(key)
        if summary:
            rows.append(
                {
                    "fold": result["fold"],
                    "images": summary["images"],
                    "hd95_unit": summary["hd95_unit"],
                    **{m: summary[m]["mean"] for m in REPORTED if m in summary},
                }
            )
    return rows


def across_folds(rows: list[dict]) -> dict:
    """Mean and sample sd (n - 1; None for one fold) of the fold means."""
    out = {}
    for metric in REPORTED:
        values = np.array([r[metric] for r in rows if metric in r], dtype=np.float64)
        if values.size:
            out[metric] = {
                "mean": float(values.mean()),
                "sd": float(values.std(ddof=1)) if values.size > 1 else None,
                "folds": int(values.size),
            }
    return out


def pooled(results: list[dict], key: str) -> dict:
    """Mean and sd over every image of every fold, exact from each fold's per-image mean, sd (n) and count."""
    out = {}
    for metric in REPORTED:
        parts = [r["scores"][key][metric] for r in results if metric in r["scores"].get(key, {})]
        n = sum(p["n"] for p in parts)
        if n:
            mean = sum(p["n"] * p["mean"] for p in parts) / n
            second = sum(p["n"] * (p["std"] ** 2 + p["mean"] ** 2) for p in parts) / n
            out[metric] = {"mean": mean, "sd": math.sqrt(max(second - mean**2, 0.0)), "n": n}
    return out


def note(settings: dict) -> str:
    """Which weights were scored and what chose them; the held-out fold chose nothing."""
    unused = (
        f"the held-out {settings['cv_set']} fold was not used for training, checkpoint selection or early "
        "stopping (logged only)"
    )
    if settings["weights"] == "best":
        return (
            f"best.pt, the epoch with the best validation Dice on {', '.join(settings.get('selected_on') or [])} "
            f"(the recipe's validation sets other than {settings['cv_set']}); {unused}"
        )
    return f"last.pt, the final weights after the recipe's fixed schedule (no early stopping); {unused}"


def summarize_folds(settings: dict, results: list[dict]) -> dict:
    keys = list(dict.fromkeys(key for result in results for key in result["scores"]))
    evaluations = {}
    for key in keys:
        rows = fold_rows(results, key)
        units = {r["hd95_unit"] for r in rows}
        evaluations[key] = {
            "hd95_unit": units.pop() if len(units) == 1 else "mixed",
            "per_fold": rows,
            "images": sum(r["images"] for r in rows),
            "across_folds": across_folds(rows),
            "pooled_per_image": pooled(results, key),
        }
    done = [r["fold"] for r in results]
    return {
        **settings,
        "folds_done": done,
        "complete": len(done) == settings["folds"],
        "note": note(settings),
        "evaluations": evaluations,
        "assignment": {name: r["fold"] for r in results for name in r["held_out"]},
    }


def _cell(metric: str, stats: dict | None) -> str:
    """`0.9801 ± 0.0012` (HD95 with two decimals); empty where the metric was not scored."""
    if not stats:
        return ""
    digits = 2 if metric.endswith("hd95") else 4
    sd = stats.get("sd")
    return f"{stats['mean']:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def markdown(summary: dict) -> str:
    lines = [
        f"# Cross-validation of {summary['recipe']}: {summary['folds']} folds over {summary['cv_set']} "
        f"{'+'.join(summary['splits'])}",
        "",
        f"Folds scored: {len(summary['folds_done'])} of {summary['folds']}"
        + ("" if summary["complete"] else " (incomplete)")
        + f". Scored, each fold's "
        f"{summary['note']}. Across folds: mean ± sample sd of the fold means; pooled: mean ± sd over "
        "images.",
    ]
    for key, ev in summary["evaluations"].items():
        header = [COLUMNS[m] + (f" ({ev['hd95_unit']})" if m.endswith("hd95") else "") for m in REPORTED]
        lines += [
            "",
            f"## {key}",
            "",
            "| fold | images | " + " | ".join(header) + " |",
            "|---" * (len(REPORTED) + 2) + "|",
        ]
        for row in ev["per_fold"]:
            lines.append(
                f"| {row['fold']} | {row['images']} | "
                + " | ".join(_cell(m, {"mean": row[m]} if m in row else None) for m in REPORTED)
                + " |"
            )
        lines.append(
            f"| mean ± sd (folds) | {ev['images']} | "
            + " | ".join(_cell(m, ev["across_folds"].get(m)) for m in REPORTED)
            + " |"
        )
        lines.append(
            f"| pooled per image | {ev['images']} | "
            + " | ".join(_cell(m, ev["pooled_per_image"].get(m)) for m in REPORTED)
            + " |"
        )
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, settings: dict, results: list[dict]) -> dict:
    summary = summarize_folds(settings, results)
    write_atomic_text(json.dumps(summary, indent=1) + "\n", Path(run_dir) / "cv_summary.json")
    write_atomic_text(markdown(summary), Path(run_dir) / "cv_summary.md")
    return summary
