"""What several QC test files share (test files do not import each other): the shipped models' names, the batch's
results.csv, synthetic scored rows, and the shipped `unet` as a user's own model."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np

from lungseg.models.cards import PACKAGE_MODELS, read_card
from lungseg.qc.features import FEATURES

SHIPPED = sorted(p.stem for p in PACKAGE_MODELS.glob("*.json"))


def results_rows(out):
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        return {os.path.basename(r["input"]): r for r in csv.DictReader(f)}


def synthetic_rows(informative: str, n: int = 80, seed: int = 1) -> list[dict]:
    """Real images whose Dice only `informative` predicts; every other feature is noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        dice = float(rng.uniform(0.80, 0.99))
        features = {name: float(rng.normal()) for name in FEATURES}
        features[informative] = dice + float(rng.normal(0, 0.02))
        rows.append({"group": f"p{i}", "dice": dice, "perturbation": "", "features": features,
                     "rules": {"lung-fields": []}})
    return rows


def users_model(tmp_path, name: str = "my-unet") -> Path:
    """The shipped `unet` as a user's own model: its weights and its card without a qc block (what `lungseg
    export` writes) in a models folder of their own."""
    card = read_card("unet")
    folder = tmp_path / "my-models"
    folder.mkdir()
    shutil.copy(card["weights_path"], folder / f"{name}.safetensors")
    for graph in card["onnx"]["graphs"]:  # the graphs keep their names: the card lists them
        shutil.copy(Path(card["card_path"]).parent / graph["file"], folder / graph["file"])
    stored = json.loads(Path(card["card_path"]).read_text())
    del stored["qc"]
    stored["name"] = name
    (folder / f"{name}.json").write_text(json.dumps(stored, indent=2))
    return folder / f"{name}.json"
