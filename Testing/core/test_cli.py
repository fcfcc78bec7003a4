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
    return subprocess.run(
        [sys.executable, "-m", "lungseg", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


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
    assert float(rows["spaced.nrrd"]["right_area_mm2"]) == pytest.approx(
        int(rows["spaced.nrrd"]["right_area_px"]) * 0.5 * 0.4, abs=0.05
    )
    assert rows["cr.dcm"]["right_area_mm2"] == "", "unknown spacing (PixelSpacing 0.000) must not give mm²"
    assert sitk.ReadImage(rows["spaced.nrrd"]["output"]).GetSpacing() == pytest.approx((0.5, 0.4))
    assert not [p for p in out.iterdir() if "partial" in p.name]


@pytest.mark.parametrize("fmt,suffix", [("png", ".png"), ("nii.gz", ".nii.gz"), ("mha", ".mha")])
def test_segment_output_formats(tmp_path, fmt, suffix, segmenter):
    from lungseg.io.radiograph import read_radiograph

    source = sample_pngs()[2]
    result = lungseg("segment", source, "-o", tmp_path, "--format", fmt)
    assert result.returncode == 0, result.stderr
    image = sitk.ReadImage(str(tmp_path / (source.stem + suffix)))
    assert image.GetSize() == (256, 256)
    label = sitk.GetArrayFromImage(image).squeeze()
    assert set(np.unique(label)) <= {0, 1, 2}
    right, left = np.nonzero(label == 1)[1], np.nonzero(label == 2)[1]
    assert right.size and left.size and right.mean() < 128 < left.mean(), "both lungs, the right on the image's left"
    alone = segmenter.segment(read_radiograph(source).pixels).label
    assert (label != alone).mean() < 1e-4, "the file holds the model's labelmap"


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
    from lungseg.batch.overlay import TEXT_ROWS

    row = TEXT_ROWS + 256 + 4  # a caption (file name, Dice), the image, truth and prediction, a gap
    assert sheet.shape[0] == TEXT_ROWS + 3 * row and sheet.shape[2] == 3, "column titles, then one row per case"
    for top in [0] + [TEXT_ROWS + k * row for k in range(3)]:
        assert (sheet[top : top + TEXT_ROWS] < 100).any(), f"text at row {top}"
    assert (sheet[..., 0] != sheet[..., 1]).any(), "the lungs are drawn in colour"


def test_models_lists_the_card():
    result = lungseg("models", "--json")
    assert result.returncode == 0
    cards = json.loads(result.stdout)
    assert any(c["name"] == "unet" and c["definition"] == "lung-fields" for c in cards)


def test_definition_picks_the_best_model_of_that_definition(tmp_path, segmenter):
    """`--definition full-extent` segments with the best full-extent model: its labelmaps are that model's, and
    they cover more lung (the retrocardiac lung above all) than the lung-field labelmaps of the same images."""
    from helpers import retrocardiac_left_lung

    from lungseg.inference.segmenter import Segmenter
    from lungseg.io.radiograph import read_radiograph
    from lungseg.models.cards import best_model

    labels = {}
    for definition in ("lung-fields", "full-extent"):
        result = lungseg(
            "segment", *sample_pngs(), "-o", tmp_path / definition, "--definition", definition, "--workers", "0"
        )
        assert result.returncode == 0, result.stderr
        rows = read_rows(tmp_path / definition / "results.csv")
        assert len(rows) == len(sample_pngs())
        reference = segmenter if definition == "lung-fields" else Segmenter(best_model(definition), device="cpu")
        assert reference.definition == definition
        for path in sample_pngs():
            row = rows[path.name]
            label = sitk.GetArrayFromImage(sitk.ReadImage(row["output"])).squeeze()
            alone = reference.segment(read_radiograph(path).pixels).label
            assert (label != alone).mean() < 1e-4, f"{path.name}: not {reference.name}'s labelmap"
            assert row["definition"] == definition and row["model"] == reference.name, row
            labels[definition, path.name] = label
    for path in sample_pngs():
        fields, extent = labels["lung-fields", path.name], labels["full-extent", path.name]
        assert (extent > 0).sum() > (fields > 0).sum(), path.name
        assert retrocardiac_left_lung(extent) > 1.2 * retrocardiac_left_lung(fields), path.name


def test_definition_without_a_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """Where no model follows the asked definition (here: the full-extent cards hidden), segment stops with a
    one-line error instead of silently using another definition's model."""
    import lungseg.cli
    import lungseg.models.cards

    cards = [c for c in lungseg.models.cards.list_models() if c.get("definition") != "full-extent"]
    monkeypatch.setattr(lungseg.models.cards, "list_models", lambda: cards)
    monkeypatch.setattr(lungseg.cli, "keep_freed_memory", lambda: False, raising=False)  # not in pytest's process
    status = lungseg.cli.main(
        ["segment", str(sample_pngs()[0]), "-o", str(tmp_path / "out"), "--definition", "full-extent", "--workers", "0"]
    )
    err = capsys.readouterr().err
    assert status == 2, err
    assert "no available model follows the 'full-extent' definition" in err
    assert not (tmp_path / "out" / "results.csv").exists()


def test_segment_saves_probabilities_and_uncertainty_of_nested_inputs(tmp_path, segmenter):
    """`--recursive` finds images in subfolders; `--save-probabilities` and `--uncertainty` write float maps
    (NRRD beside PNG labelmaps) on each input's grid that hold what the model computed for that image."""
    from lungseg.io.files import list_inputs
    from lungseg.io.radiograph import read_radiograph

    inputs = tmp_path / "in"
    (inputs / "sub" / "deeper").mkdir(parents=True)
    shutil.copy(sample_pngs()[0], inputs / "top.png")
    nested = sitk.ReadImage(str(sample_pngs()[1]))[:, 16:]  # 256 columns, 240 rows
    nested.SetSpacing((0.5, 0.4))
    nested.SetOrigin((3.0, -2.0))
    sitk.WriteImage(nested, str(inputs / "sub" / "deeper" / "nested.nrrd"))
    assert list_inputs([inputs]) == [inputs / "top.png"], "without --recursive the subfolders are not searched"

    out = tmp_path / "out"
    result = lungseg(
        "segment",
        inputs,
        "-o",
        out,
        "--recursive",
        "--save-probabilities",
        "--uncertainty",
        "--format",
        "png",
        "--workers",
        "0",
    )
    assert result.returncode == 0, result.stderr
    rows = read_rows(out / "results.csv")
    assert sorted(rows) == ["nested.nrrd", "top.png"]
    for name, row in rows.items():
        source = sitk.ReadImage(row["input"])
        pixels = read_radiograph(row["input"]).pixels
        expected = segmenter.segment(pixels, uncertainty=True, keep_probabilities=True)
        label = sitk.GetArrayFromImage(sitk.ReadImage(row["output"]))
        assert row["probabilities"].endswith("_probabilities.nrrd") and row["uncertainty_map"].endswith(".nrrd")
        maps = {key: sitk.ReadImage(row[key]) for key in ("probabilities", "uncertainty_map")}
        for key, image in maps.items():
            assert image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkVectorFloat32), (name, key)
            assert image.GetSize() == source.GetSize(), (name, key)
            assert image.GetSpacing() == pytest.approx(source.GetSpacing()), (name, key)
            assert image.GetOrigin() == pytest.approx(source.GetOrigin()), (name, key)
        assert maps["probabilities"].GetNumberOfComponentsPerPixel() == 3
        probabilities = np.moveaxis(sitk.GetArrayFromImage(maps["probabilities"]), -1, 0)  # (3, rows, columns)
        assert probabilities.min() >= 0 and np.abs(probabilities.sum(0) - 1).max() < 1e-4
        for value in (1, 2):  # channel order: background, right lung, left lung
            assert probabilities[value][label == value].mean() > 0.7, (name, value)
        np.testing.assert_allclose(probabilities, expected.probabilities, atol=1e-3)
        uncertainty = sitk.GetArrayFromImage(maps["uncertainty_map"])
        np.testing.assert_allclose(uncertainty, expected.uncertainty, atol=1e-3)
        assert uncertainty.min() >= 0 and uncertainty.max() > 0.05, name
        assert float(row["uncertainty_mean"]) == pytest.approx(uncertainty[label > 0].mean(), abs=1e-3)
        assert (label != expected.label).mean() < 1e-4, name


def test_evaluate_warns_when_the_truth_follows_another_definition(tmp_path, jsrt):
    data = tmp_path / "data"
    for folder in ("images", "masks"):
        (data / folder).mkdir(parents=True)
        name = sorted(p.name for p in (jsrt / "images").iterdir())[0]
        os.symlink(jsrt / folder / name, data / folder / name)
    result = lungseg(
        "evaluate",
        "--images",
        data / "images",
        "--masks",
        data / "masks",
        "-o",
        tmp_path / "ev",
        "--truth-definition",
        "full-extent",
    )
    assert result.returncode == 0, result.stderr
    assert "reference masks follow 'full-extent' but model 'unet' segments 'lung-fields'" in result.stderr
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["definition_truth"] == "full-extent" and summary["definition_model"] == "lung-fields"
