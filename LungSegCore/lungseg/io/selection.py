"""Which cases of a labelled set (`io.labelled`) a config's data entry selects: a `split` of splits.csv (one name or
a list), a seeded `ratios` split, or one part of a K-fold cross-validation (`folds`, `fold`, `part: train |
held_out`, stratified by the `group` column, patients never split; see `fold_assignment`). Training, export,
cross-validation and the QC fit share it; it needs no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import LungSegError
from .labelled import Case, list_cases, read_split_table, split_names

FOLD_PARTS = ("train", "held_out")


def split_by_ratio(cases: list[Case], ratios: dict[str, float], seed: int = 0) -> dict[str, list[Case]]:
    """A seeded, reproducible split of cases by ratio, e.g. {"train": 0.7, "val": 0.3}."""
    order = np.random.default_rng(seed).permutation(len(cases))
    total = sum(ratios.values())
    splits, start = {}, 0
    for i, (name, ratio) in enumerate(ratios.items()):
        end = len(cases) if i == len(ratios) - 1 else start + round(len(cases) * ratio / total)
        splits[name] = [cases[j] for j in sorted(order[start:end])]
        start = end
    return splits


def assign_folds(
    strata: dict[str, str], folds: int, seed: int = 0, patients: dict[str, str] | None = None
) -> dict[str, int]:
    """Fold (0..folds-1) of each name: stratified by `strata`, seeded, every patient's names in one fold.

    The patients are ordered stratum by stratum, shuffled within each, and dealt round-robin into the folds, so the
    folds differ by at most one patient in size and by at most one patient in each stratum. A name without a patient
    is a patient of its own (JSRT: one image per patient); a patient's stratum is that of its first name.
    """
    patients = patients or {}
    names_of: dict[tuple[str, str], list[str]] = {}
    for name in sorted(strata):
        names_of.setdefault(("patient", patients[name]) if patients.get(name) else ("image", name), []).append(name)
    if not 2 <= folds <= len(names_of):
        raise LungSegError(f"{folds} folds need 2 to {len(names_of)} (the number of patients)")
    by_stratum: dict[str, list[tuple[str, str]]] = {}
    for patient in sorted(names_of):
        by_stratum.setdefault(strata[names_of[patient][0]], []).append(patient)
    rng = np.random.default_rng(seed)
    order = []
    for stratum in sorted(by_stratum):
        members = by_stratum[stratum]
        order += [members[i] for i in rng.permutation(len(members))]
    return {name: position % folds for position, patient in enumerate(order) for name in names_of[patient]}


def fold_assignment(
    root: str | Path, folds: int, split: str | list[str] | None = None, seed: int = 0
) -> dict[str, int]:
    """Fold of each image file of a set (those of `split` in splits.csv), stratified by splits.csv's `group` and
    kept together by its `patient` column where it has one. The one assignment every config, script and test uses."""
    table = read_split_table(Path(root))
    names = [case.image.name for case in list_cases(root, split)]
    strata = {name: table.get(name, {}).get("group") or "" for name in names}
    patients = {name: table.get(name, {}).get("patient") or "" for name in names}
    return assign_folds(strata, int(folds), int(seed), patients)


def fold_selector(entry: dict) -> tuple[int, int, str]:
    """(folds, fold, part) of a data entry with `folds`, checked."""
    folds, fold, part = int(entry["folds"]), entry.get("fold"), entry.get("part")
    if fold is None or not 0 <= int(fold) < folds or part not in FOLD_PARTS:
        raise LungSegError(
            f"data entry {entry}: `folds: {folds}` needs `fold` in 0..{folds - 1} and `part` {' or '.join(FOLD_PARTS)}"
        )
    if "ratios" in entry:
        raise LungSegError(f"data entry {entry}: choose `ratios` or `folds`, not both")
    return folds, int(fold), part


def entry_cases(root: str | Path, entry: dict) -> list[Case]:
    """The cases a config's data entry selects under `root`, before its `every` thinning."""
    folder = Path(root) / entry["set"]
    selector = fold_selector(entry) if "folds" in entry else None
    if "ratios" in entry:
        return split_by_ratio(list_cases(folder), entry["ratios"], int(entry.get("seed", 0)))[entry["split"]]
    cases = list_cases(folder, entry.get("split"))
    if selector is not None:
        folds, fold, part = selector
        assignment = fold_assignment(folder, folds, entry.get("split"), int(entry.get("seed", 0)))
        cases = [c for c in cases if (assignment[c.image.name] == fold) == (part == "held_out")]
    return cases


def selection_tag(entry: dict) -> str:
    """What an entry selects, for file names and score keys: `val`, `train+val-fold0of5-held_out`, `all`."""
    split = split_names(entry.get("split"))
    tag = "+".join(split) if split else "all"
    if "folds" in entry:
        tag += f"-fold{entry.get('fold')}of{entry['folds']}-{entry.get('part')}"
    return tag
