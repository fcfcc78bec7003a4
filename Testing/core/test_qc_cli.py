"""QC on the command line: `lungseg evaluate` reports QC accuracy beside the Dice, and `lungseg fit-qc` fits a
user's own model."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import SHIPPED, users_model

from lungseg.models.cards import read_card, sha256_of
from lungseg.qc import selection
from lungseg.qc.model import assess
from lungseg.qc.pool import half_of, read_groups
from lungseg.qc.stats import qc_accuracy


def test_evaluate_reports_qc_accuracy_beside_the_dice(tmp_path, jsrt, segmenter):
    from lungseg.evaluation.evaluate import evaluate, summary_line

    data = tmp_path / "set"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    names = sorted(p.name for p in (jsrt / "images").iterdir())[:4]
    for name in names:
        os.symlink(jsrt / "masks" / name, data / "masks" / name)
        os.symlink(jsrt / "images" / name, data / "images" / name)
    upside_down = sitk.GetArrayFromImage(sitk.ReadImage(str(jsrt / "images" / names[0])))[::-1]
    os.remove(data / "images" / names[0])  # a failure: the image upside down, scored against its upright mask
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(upside_down)), str(data / "images" / names[0]))
    summary = evaluate(data / "images", data / "masks", out_dir=tmp_path / "eval", segmenter=segmenter)
    with open(tmp_path / "eval" / "evaluation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:3] == ["image", "both_dice", "quality"], "the predicted quality beside the true Dice"
    dice = [float(r["both_dice"]) for r in rows]
    assert min(dice) < 0.9
    expected = qc_accuracy(dice, [r["qc"] == "check" for r in rows], [float(r["quality"]) for r in rows])
    acc = json.loads((tmp_path / "eval" / "summary.json").read_text())["qc_accuracy"]
    assert acc["qc"] == expected == summary["qc_accuracy"]["qc"]
    assert acc["threshold"] == read_card("unet")["qc"]["threshold"] and acc["mode"] == "default"
    assert "QC (threshold" in summary_line(summary) and "flagged" in summary_line(summary)
    assert not math.isnan(float(rows[0]["quality"]))


def with_two_unusable_images(jsrt, tmp_path) -> Path:
    """JSRT as a folder of the user's (links), whose val split also holds a truncated PNG and an image whose mask
    has another size."""
    data = tmp_path / "jsrt"
    for sub in ("images", "masks", "masks_right", "masks_left"):
        (data / sub).mkdir(parents=True)
        for path in (jsrt / sub).iterdir():
            os.symlink(path, data / sub / path.name)
    image = sorted((jsrt / "images").iterdir())[0]
    (data / "images" / "broken.png").write_bytes(image.read_bytes()[:300])
    os.symlink(jsrt / "masks" / image.name, data / "masks" / "broken.png")
    os.symlink(image, data / "images" / "small-mask.png")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((100, 100), np.uint8)), str(data / "masks" / "small-mask.png"))
    rows = (jsrt / "splits.csv").read_text().rstrip("\n") + "\nbroken.png,val,nodule\nsmall-mask.png,val,nodule\n"
    (data / "splits.csv").write_text(rows)
    return data


@pytest.mark.slow
def test_fit_qc_fits_a_users_model_on_images_it_never_trained_on_and_measures_the_other_half(
    tmp_path, jsrt, monkeypatch, capsys
):
    """`lungseg fit-qc --write`: the model's QC is fitted on one half of the labelled images it never trained on
    (JSRT val: the card names JSRT train as its training data) and their degraded copies, measured on the other
    half, and stored in its card, whose weights stay as they were; the batch then uses it. A second `--write`
    would replace it, so it is refused before any segmenting unless `--overwrite` says so. Images that cannot be
    used are named with their problem and left out, and the exit status says so."""
    from lungseg.cli import main
    from lungseg.inference.segmenter import Segmenter
    from lungseg.io.labelled import list_cases

    card_path = users_model(tmp_path)
    weights = sha256_of(card_path.with_suffix(".safetensors"))
    monkeypatch.setenv("LUNGSEG_MODELS_PATH", str(card_path.parent))
    assert main(["models"]) == 0
    listed = {entry.split()[0]: entry for entry in re.split(r"\n(?=\S)", capsys.readouterr().out.strip())}
    assert "QC: rules only" in listed["my-unet"], "a model fresh from export has no predicted quality, and says so"
    assert all("QC: predicted quality fitted" in listed[name] for name in SHIPPED)
    report = tmp_path / "qc.json"
    data = with_two_unusable_images(jsrt, tmp_path)
    assert (
        main(
            [
                "fit-qc",
                "--model",
                str(card_path),
                "--data",
                str(data),
                "--perturbations",
                "2",
                "--uncertainty",
                "--write",
                "--report",
                str(report),
            ]
        )
        == 1
    )
    out, err = capsys.readouterr()
    assert f"lungseg: error: {data / 'images' / 'broken.png'}: cannot be read as an image" in err
    assert (
        f"lungseg: error: {data / 'masks' / 'small-mask.png'}: the reference is 100x100 pixels but the image "
        "small-mask.png is 512x512" in err
    )
    assert "2 labelled image(s) could not be used and were left out" in err
    stored = json.loads(card_path.read_text())
    block = stored["qc"]
    assert block == json.loads(report.read_text()) and stored["sha256"] == weights == sha256_of(
        card_path.with_suffix(".safetensors")
    ), "only the qc block was added"
    assert list(block["modes"]) == list(block["validation"]) == ["default", "uncertainty"]
    assert 0.5 <= block["threshold"] == block["modes"]["default"]["threshold"] < 1
    val = [c.image.name for c in list_cases(jsrt, "val")]
    groups = read_groups(jsrt)
    held_out = [n for n in val if half_of("jsrt", groups.get(n, n)) == "measure"]
    assert 0 < len(held_out) < len(val) == 22
    for mode in ("default", "uncertainty"):
        fitted, measured = block["modes"][mode]["fitted_on"], block["validation"][mode]
        assert fitted["command"].startswith("lungseg fit-qc --model ") and fitted["below_limit"] > 0
        assert measured["jsrt"]["qc"]["images"] == len(held_out), "measured on the held-out half of JSRT val only"
        assert measured["jsrt (perturbed)"]["qc"]["images"] == 2 * len(held_out)
        assert fitted["images"] == 3 * (len(val) - len(held_out))
        assert fitted["perturbed"] == 2 * (len(val) - len(held_out))
        assert f"boundary{selection.WITH_EDGES}" in fitted["cross_validated_spearman"], (
            "the rows carry the image's edges, so the fit tries them"
        )
        assert (
            f"{mode} mode, threshold {block['modes'][mode]['threshold']:.3f}, held-out jsrt ({len(held_out)} "
            "results)" in out
        )
    assert "wrote the QC" in out
    assert "too few reference masks in the fit half for a shape prior" in out  # 11 of JSRT val's 22; 20 are needed
    assert "the image's edges were a candidate" in out

    segmenter = Segmenter(str(card_path), "cpu")
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(jsrt / "images" / val[0]), sitk.sitkFloat32))
    for uncertainty, mode in ((False, "default"), (True, "uncertainty")):
        assessment = assess(segmenter.segment(image, uncertainty=uncertainty), segmenter)
        assert assessment.quality is not None and assessment.mode == mode
        assert assessment.threshold == block["modes"][mode]["threshold"]
    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    assert (
        f"QC: predicted quality fitted {block['fitted']} (default, uncertainty modes), threshold "
        f"{block['threshold']:.3f}" in listed
    )
    assert "QC: rules only" not in listed

    before = card_path.read_text()
    assert main(["fit-qc", "--model", str(card_path), "--data", str(data), "--write"]) == 2
    err = capsys.readouterr().err
    assert str(card_path) in err and "--overwrite" in err and "segmenting" not in err
    assert card_path.read_text() == before
    assert main(["fit-qc", "--model", str(card_path), "--data", str(jsrt), "--split", "train"]) == 2
    assert (
        "every labelled image of split 'train' is in a split that model 'my-unet' trained on" in capsys.readouterr().err
    ), "a fit on the images the model learned would flag nothing it gets wrong elsewhere"
    assert main(["fit-qc", "--model", str(card_path), "--data", str(jsrt), "--split", "tset"]) == 2
    assert "no labelled image is in split 'tset' (splits.csv names train, val)" in capsys.readouterr().err
