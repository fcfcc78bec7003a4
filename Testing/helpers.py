"""What several test files share (test files never import each other; fixtures and skips live in conftest.py): the
shipped models' names, the batch's results.csv, synthetic scored rows, the shipped `unet` as a user's own model, an
image written with its grid, a folder of bad inputs, and the retrocardiac left-lung count."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lungseg.inference.labels import LEFT_LUNG
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
        rows.append(
            {"group": f"p{i}", "dice": dice, "perturbation": "", "features": features, "rules": {"lung-fields": []}}
        )
    return rows


def users_model(tmp_path, name: str = "my-unet") -> Path:
    """The shipped `unet` as a user's own model: its weights and its card without a qc block (what `lungseg
    export` writes) in a models folder of their own."""
    card = read_card("unet")
    folder = tmp_path / "my-models"
    folder.mkdir()
    shutil.copy(card["weights_path"], folder / f"{name}.safetensors")
    shutil.copy(card["weights_path"], folder / card["onnx"]["weights"])  # the file the graphs read their weights from
    for graph in card["onnx"]["graphs"]:  # the graphs keep their names: the card lists them
        shutil.copy(Path(card["card_path"]).parent / graph["file"], folder / graph["file"])
    stored = json.loads(Path(card["card_path"]).read_text())
    del stored["qc"]
    stored["name"] = name
    (folder / f"{name}.json").write_text(json.dumps(stored, indent=2))
    return folder / f"{name}.json"


def write_image(array: np.ndarray, path, vector=False, spacing=None, origin=None, direction=None):
    image = sitk.GetImageFromArray(array, isVector=vector)
    if spacing:
        image.SetSpacing(spacing)
    if origin:
        image.SetOrigin(origin)
    if direction:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return image


def bad_inputs(tmp_path, gray8, chest_dicom):
    """One unreadable input of each kind in `tmp_path`: {file name: the problem its error names}."""
    import pydicom

    cases = {}
    (tmp_path / "empty.png").write_bytes(b"")
    cases["empty.png"] = "empty file"
    (tmp_path / "text.png").write_text("this is not an image\n")
    cases["text.png"] = "cannot be read"
    write_image(gray8, tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "whole.png").unlink()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    cases["truncated.png"] = "cannot be read"
    (tmp_path / "folder.png").mkdir()
    cases["folder.png"] = "is a folder"
    write_image(np.arange(16, dtype=np.uint8).reshape(4, 4).repeat(3, 0)[:12, :3].copy(), tmp_path / "tiny.png")
    cases["tiny.png"] = "too small"
    write_image(np.random.default_rng(0).integers(0, 1000, (40, 64, 64)).astype(np.int16), tmp_path / "ct.nrrd")
    cases["ct.nrrd"] = "3D volume of 40 slices"
    write_image(np.full((64, 64), np.nan, np.float32), tmp_path / "nan.nrrd")
    cases["nan.nrrd"] = "no finite pixel values"
    ds = pydicom.dcmread(chest_dicom)
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    cases["nopixels.dcm"] = "no pixel data"
    return cases


def retrocardiac_left_lung(label: np.ndarray) -> int:
    """Left-lung pixels in the lower medial band of the image's right half, where the heart shadow lies."""
    rows, cols = label.shape
    band = label[int(0.55 * rows) : int(0.9 * rows), int(0.5 * cols) : int(0.68 * cols)]
    return int((band == LEFT_LUNG).sum())
