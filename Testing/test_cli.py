"""The command line: `lungseg segment`, `lungseg evaluate` and `lungseg models`, run as a user runs them."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from lungseg.samples import sample_pngs


def lungseg(*args, cwd=None):
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lungseg", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def read_rows(path):
    with open(path, newline="") as f:
        return {os.path.basename(r["input"]): r for r in csv.DictReader(f)}


def test_segment_folder_with_a_bad_file(tmp_path, chest_dicom):
    inputs = tmp_path / "in put"
    inputs.mkdir()
    shutil.copy(sample_pngs()[0], inputs / "chest ü.png")
    shutil.copy(chest_dicom, inputs / "cr.dcm")
    spaced = sitk.ReadImage(str(sample_pngs()[1]))
    spaced.SetSpacing((0.5, 0.4))
    sitk.WriteImage(spaced, str(inputs / "spaced.nrrd"))
    (inputs / "broken.png").write_text("not a png")
    out = tmp_path / "out"

    result = lungseg("segment", inputs, "-o", out, "--overlays")
    assert result.returncode == 1, result.stderr
    assert "broken.png" in result.stderr and "cannot be read" in result.stderr
    assert "3 of 4 segmented, 1 failed" in result.stdout

    rows = read_rows(out / "results.csv")
    assert rows["broken.png"]["status"] == "error" and "cannot be read" in rows["broken.png"]["error"]
    for name in ("chest ü.png", "cr.dcm", "spaced.nrrd"):
        row = rows[name]
        assert row["status"] == "ok" and row["model"] == "unet" and row["definition"] == "lung-fields"
        label = sitk.ReadImage(row["output"])
        source = sitk.ReadImage(str(inputs / name))
        assert label.GetSize() == source.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1, 2}
        assert int(row["right_area_px"]) > 0 and int(row["left_area_px"]) > 0
        assert os.path.exists(row["overlay"])
    assert rows["spaced.nrrd"]["right_area_mm2"] == pytest.approx(
        str(round(int(rows["spaced.nrrd"]["right_area_px"]) * 0.2, 1)))
    assert rows["cr.dcm"]["right_area_mm2"] == "", "unknown spacing (PixelSpacing 0.000) must not give mm²"
    assert sitk.ReadImage(rows["spaced.nrrd"]["output"]).GetSpacing() == pytest.approx((0.5, 0.4))
    assert not [p for p in out.iterdir() if "partial" in p.name]


@pytest.mark.parametrize("fmt,suffix", [("png", ".png"), ("nii.gz", ".nii.gz"), ("mha", ".mha")])
def test_segment_output_formats(tmp_path, fmt, suffix):
    result = lungseg("segment", sample_pngs()[2], "-o", tmp_path, "--format", fmt)
    assert result.returncode == 0, result.stderr
    out = tmp_path / (sample_pngs()[2].stem + suffix)
    assert sitk.ReadImage(str(out)).GetSize() == (256, 256)


def test_segment_reports_missing_inputs(tmp_path):
    result = lungseg("segment", tmp_path / "nothing-here", "-o", tmp_path / "out")
    assert result.returncode != 0
    assert "nothing-here" in result.stderr


def test_evaluate_writes_per_image_csv_and_summary(tmp_path, jsrt):
    data = tmp_path / "data"
    names = sorted(p.name for p in (jsrt / "images").iterdir())[:3]
    for folder in ("images", "masks", "masks_right", "masks_left"):
        (data / folder).mkdir(parents=True)
        for name in names:
            os.symlink(jsrt / folder / name, data / folder / name)
    result = lungseg("evaluate", "--images", data / "images", "--masks", data / "masks", "-o", tmp_path / "ev")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["images"] == 3 and summary["hd95_unit"] == "px"
    rows = list(csv.DictReader(open(tmp_path / "ev" / "evaluation.csv")))
    assert len(rows) == 3
    for metric in ("accuracy", "precision", "recall", "iou", "dice", "hd95"):
        for region in ("both", "right", "left"):
            assert f"{region}_{metric}" in rows[0]
    assert float(rows[0]["both_dice"]) > 0.9
    sheet = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ev" / "worst_cases.png")))
    assert sheet.shape[0] == 3 * (256 + 4) and sheet.shape[2] == 3, "one row per case: image, truth, prediction"
    assert (sheet[..., 0] != sheet[..., 1]).any(), "the lungs are drawn in colour"


def test_models_lists_the_card():
    result = lungseg("models", "--json")
    assert result.returncode == 0
    cards = json.loads(result.stdout)
    assert any(c["name"] == "unet" and c["definition"] == "lung-fields" for c in cards)


def test_definition_picks_the_best_model_of_that_definition(tmp_path):
    from lungseg.models import best_model, list_models

    definitions = {c["definition"] for c in list_models()}
    assert best_model("lung-fields") == "unet"
    ok = lungseg("segment", sample_pngs()[0], "-o", tmp_path / "a", "--definition", "lung-fields")
    assert ok.returncode == 0, ok.stderr
    assert read_rows(tmp_path / "a" / "results.csv")[sample_pngs()[0].name]["definition"] == "lung-fields"
    if "full-extent" not in definitions:
        missing = lungseg("segment", sample_pngs()[0], "-o", tmp_path / "b", "--definition", "full-extent")
        assert missing.returncode == 2 and "no available model follows the 'full-extent' definition" in missing.stderr


def test_evaluate_warns_when_the_truth_follows_another_definition(tmp_path, jsrt):
    data = tmp_path / "data"
    for folder in ("images", "masks"):
        (data / folder).mkdir(parents=True)
        name = sorted(p.name for p in (jsrt / "images").iterdir())[0]
        os.symlink(jsrt / folder / name, data / folder / name)
    result = lungseg("evaluate", "--images", data / "images", "--masks", data / "masks", "-o", tmp_path / "ev",
                     "--truth-definition", "full-extent")
    assert result.returncode == 0, result.stderr
    assert "reference masks follow 'full-extent' but model 'unet' segments 'lung-fields'" in result.stderr
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["definition_truth"] == "full-extent" and summary["definition_model"] == "lung-fields"
