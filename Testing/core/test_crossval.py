"""Cross-validation over JSRT (issue 14): stratified folds from the data layer, fold configs, HD95 in mm for files
without spacing, and scripts/cross_validate.py end to end on a tiny recipe, resumed and re-run."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from conftest import load_script
from safetensors.torch import load_file

from lungseg.cli import main as cli_main
from lungseg.errors import LungSegError
from lungseg.io.labelled import list_cases, read_split_table
from lungseg.io.selection import assign_folds, entry_cases, fold_assignment
from lungseg.training.config import load_config
from lungseg.training.crossval import fold_config, fold_dir
from lungseg.training.export import export_run
from lungseg.training.trainer import train

torch.set_num_threads(1)
JSRT_POOL = ["train", "val"]


def make_set(folder, n, size=64, seed=0):
    """Synthetic radiographs: two dark elliptical lungs on a bright body, with both-lung and per-side masks (the
    patient's right lung on the image's left) and a nodule/non-nodule group in splits.csv."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    for sub in ("images", "masks", "masks_right", "masks_left"):
        (folder / sub).mkdir(parents=True)
    rows = ["file,split,group"]
    for i in range(n):
        cx = 0.27 + rng.uniform(-0.03, 0.03)
        right = ((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1
        left = ((xx - (1 - cx)) / 0.16) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1
        image = 180 - 120 * (right | left) + rng.normal(0, 8, right.shape)
        name = f"case{i:02d}.png"
        for sub, pixels in (
            ("images", np.clip(image, 0, 255)),
            ("masks", (right | left) * 255),
            ("masks_right", right * 255),
            ("masks_left", left * 255),
        ):
            sitk.WriteImage(sitk.GetImageFromArray(pixels.astype(np.uint8)), str(folder / sub / name))
        rows.append(f"{name},{'val' if i % 4 == 0 else 'train'},{'nodule' if i % 3 else 'non-nodule'}")
    (folder / "splits.csv").write_text("\n".join(rows) + "\n")


def test_jsrt_folds_are_a_stratified_balanced_deterministic_partition(jsrt):
    folds = fold_assignment(jsrt, 5, JSRT_POOL)
    names = {case.image.name for case in list_cases(jsrt, JSRT_POOL)}
    assert len(names) == 196 and set(folds) == names and set(folds.values()) == set(range(5))
    sizes = Counter(folds.values())
    assert max(sizes.values()) - min(sizes.values()) <= 1
    groups = {name: row["group"] for name, row in read_split_table(jsrt).items()}
    share = sum(groups[n] == "nodule" for n in names) / len(names)
    for fold, size in sizes.items():
        nodules = sum(groups[n] == "nodule" for n, f in folds.items() if f == fold)
        assert abs(nodules - share * size) <= 1, (fold, nodules, size)
    assert fold_assignment(jsrt, 5, JSRT_POOL) == folds, "the same folds on every call"
    assert fold_assignment(jsrt, 5, JSRT_POOL, seed=1) != folds, "the seed chooses the folds"

    root = jsrt.parent
    for fold in range(5):
        part = {
            p: {
                c.image.name
                for c in entry_cases(root, {"set": "jsrt", "split": JSRT_POOL, "folds": 5, "fold": fold, "part": p})
            }
            for p in ("train", "held_out")
        }
        assert not part["train"] & part["held_out"] and part["train"] | part["held_out"] == names
        assert part["held_out"] == {n for n, f in folds.items() if f == fold}


def test_a_patient_never_spans_folds_and_each_stratum_is_dealt_evenly():
    strata = {f"img{i:02d}": "a" if i < 18 else "b" for i in range(30)}
    patients = {name: f"p{int(name[3:]) // 2}" for name in strata}  # two images per patient
    folds = assign_folds(strata, 3, seed=4, patients=patients)
    for patient in set(patients.values()):
        assert len({folds[n] for n in strata if patients[n] == patient}) == 1
    for stratum in "ab":
        counts = Counter(folds[n] for n in strata if strata[n] == stratum)
        assert max(counts.values()) - min(counts.values()) <= 2  # one patient of two images


def test_fold_configs_resolve_to_the_folds_cases(jsrt):
    root = jsrt.parent
    folds = fold_assignment(jsrt, 5, JSRT_POOL)
    for recipe in (load_config("unet-jsrt-cv"), load_config("unet")):
        cfg = fold_config(recipe, 3, 5)
        assert cfg["name"] == f"{recipe['name']}-fold3"
        (train_entry,) = [e for e in cfg["data"]["train"] if e["set"] == "jsrt"]
        assert train_entry["weight"] == 0.3 and "ratios" not in train_entry
        held_out = cfg["data"]["test"][0]
        assert held_out["part"] == "held_out" and [e["set"] for e in cfg["data"]["test"]] == ["jsrt"]
        assert [e["set"] for e in cfg["data"]["val"]] == ["covid-qu-ex"]
        assert {c.image.name for c in entry_cases(root, held_out)} == {n for n, f in folds.items() if f == 3}
        assert {c.image.name for c in entry_cases(root, train_entry)} == {n for n, f in folds.items() if f != 3}
    assert fold_config(load_config("unet-jsrt-cv"), 0, 5) == dict(
        load_config("unet-jsrt-cv"), name="unet-jsrt-cv-fold0"
    ), "the packaged recipe is fold 0 as written"


def test_the_held_out_fold_chooses_nothing(jsrt):
    """nnU-Net style: a fold's held-out images are in neither its training nor its validation selection (which
    picks best.pt and would drive early stopping), and every fold runs the recipe's fixed schedule."""
    from lungseg.training.config import training_ended
    from lungseg.training.crossval import held_out_names

    root = jsrt.parent
    for recipe in (load_config("unet-jsrt-cv"), load_config("unet")):
        for fold in range(5):
            cfg = fold_config(recipe, fold, 5)
            held = set(held_out_names(cfg, root))
            assert len(held) in (39, 40)
            assert not any(e["set"] == "jsrt" for e in cfg["data"]["val"]), "the held-out fold must not validate"
            for key in ("train", "val"):
                chosen = {
                    c.image.name
                    for entry in cfg["data"][key]
                    if entry["set"] == "jsrt"
                    for c in entry_cases(root, entry)
                }
                assert not chosen & held, (key, fold)
            assert "early_stopping_patience" not in cfg["training"]
            epochs = cfg["training"]["epochs"]
            assert not training_ended(epochs - 1, epochs - 1, cfg["training"]), (
                "no early stopping: a fold that never improved still trains all its epochs"
            )


def test_a_recipe_validating_only_on_the_cross_validated_set_is_refused():

    recipe = load_config("unet")
    recipe["data"]["val"] = [{"set": "jsrt", "split": "val"}]
    with pytest.raises(LungSegError, match="validates on no set but 'jsrt'"):
        fold_config(recipe, 0, 5)


def test_a_staged_recipe_starts_each_fold_from_that_folds_first_stage():

    recipe = load_config("unet-jsrt-512-cv")
    assert "{fold}" in recipe["training"]["init_from"]
    for fold in range(5):
        start = fold_config(recipe, fold, 5)["training"]["init_from"]
        assert start == f"runs/unet-jsrt-cv/fold-{fold}/last.pt"
    for leaky in ("unet", "runs/unet/best.pt"):  # the shipped unet trained on JSRT images of every fold
        recipe["training"]["init_from"] = leaky
        with pytest.raises(LungSegError, match="may have seen the held-out images"):
            fold_config(recipe, 0, 5)


def test_a_missing_first_stage_is_named(tmp_path):
    from lungseg.training.config import initial_weights

    with pytest.raises(LungSegError, match=r"fold-3/last.pt does not exist \(train the run it names first\)"):
        initial_weights(str(tmp_path / "fold-3" / "last.pt"))


def test_quality_fitting_scores_a_fold_model_on_its_held_out_fold_only(jsrt):
    """scripts/fit_quality.py --cv-run: a fold model stands in for its recipe on the images it never saw."""
    from lungseg.models.cards import read_card
    from lungseg.qc.pool import cases_for
    from lungseg.training.crossval import held_out_names

    fit_quality = load_script("fit_quality")
    root = jsrt.parent
    cfg = fold_config(load_config("unet-jsrt-cv"), 2, 5)
    fold_card = {"name": cfg["name"], "recipe": cfg}
    chosen = {c.image.name for c in cases_for(fold_card, "jsrt", root, 1000)}
    assert chosen == set(held_out_names(cfg, root)) and len(chosen) in (39, 40)
    assert fit_quality.cross_validated(fold_card, "jsrt") and not fit_quality.cross_validated(fold_card, "covid-qu-ex")
    shipped = {c.image.name for c in cases_for(read_card("unet"), "jsrt", root, 1000)}
    assert shipped == {c.image.name for c in list_cases(jsrt, "val")}, "the shipped unet trained on JSRT train"


def test_spacing_override_gives_hd95_in_mm_on_a_jsrt_image(jsrt, segmenter):
    from lungseg.evaluation.evaluate import evaluate

    one = [list_cases(jsrt, "val")[0].image.name]
    px = evaluate(jsrt / "images", jsrt / "masks", names=one, segmenter=segmenter)
    mm = evaluate(jsrt / "images", jsrt / "masks", names=one, segmenter=segmenter, spacing_mm=0.7)
    assert (px["images"], px["hd95_unit"], mm["hd95_unit"], mm["spacing_mm"]) == (1, "px", "mm", 0.7)
    for region in ("both", "right", "left"):
        assert mm[f"{region}_hd95"]["mean"] == pytest.approx(0.7 * px[f"{region}_hd95"]["mean"], rel=1e-5)
    assert mm["both_dice"] == px["both_dice"]


def test_evaluate_spacing_mm_on_the_command_line(tmp_path):
    from lungseg.cli import main

    make_set(tmp_path / "set", 2)
    summaries = {}
    for option in ([], ["--spacing-mm", "0.7"]):
        out = tmp_path / f"out{len(option)}"
        assert (
            main(
                [
                    "evaluate",
                    "--images",
                    str(tmp_path / "set" / "images"),
                    "--masks",
                    str(tmp_path / "set" / "masks"),
                    "--model",
                    "unet",
                    "--device",
                    "cpu",
                    "-o",
                    str(out),
                    *option,
                ]
            )
            == 0
        )
        summaries[len(option)] = json.loads((out / "summary.json").read_text())
        rows = list(csv.DictReader(open(out / "evaluation.csv")))
        assert {r["hd95_unit"] for r in rows} == {"mm" if option else "px"}
    assert summaries[2]["both_hd95"]["mean"] == pytest.approx(0.7 * summaries[0]["both_hd95"]["mean"], rel=1e-5)


def cross_validate_script():
    return load_script("cross_validate").main


@pytest.mark.slow
def test_cross_validation_runs_resumes_and_skips_finished_folds(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LUNGSEG_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    make_set(data / "jsrt", 12)
    make_set(data / "other", 4, seed=1)
    recipe = load_config("unet-jsrt-cv")
    recipe.update(
        name="tiny", input_size=64, network={"name": "unet", "params": {"channels": [8, 16, 32], "num_res_units": 1}}
    )
    recipe["data"] = {
        "root": str(data),
        "train": [{"set": "jsrt", "split": "train"}],
        "val": [{"set": "jsrt", "split": "val"}, {"set": "other", "split": "val"}],
    }
    recipe["training"].update(epochs=1, samples_per_epoch=8, batch_size=4, num_workers=0, checkpoint_every_steps=1)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp_path / "cv"

    # fold 0 killed after one of its two steps: the script continues it at that step
    train(fold_config(recipe, 0, 2), data_root=data, out_dir=fold_dir(run, 0), device="cpu", max_steps=1)
    main = cross_validate_script()
    args = [
        "--config",
        str(tmp_path / "tiny.yaml"),
        "--folds",
        "2",
        "-o",
        str(run),
        "--data-root",
        str(data),
        "--device",
        "cpu",
        "--also",
        "other:val",
    ]
    assert main(args) == 0
    assert "resumed from" in (fold_dir(run, 0) / "train.log").read_text()
    assert "step 1" in (fold_dir(run, 0) / "train.log").read_text()
    summary = json.loads((run / "cv_summary.json").read_text())
    assert summary["complete"] and summary["folds_done"] == [0, 1] and summary["spacing_mm"] == 0.7
    # by default the final weights are scored, and the held-out fold chose nothing
    assert (summary["weights"], summary["checkpoint"], summary["held_out_used_for_selection"]) == (
        "last",
        "last.pt",
        False,
    )
    assert summary["early_stopping"] is False and summary["selected_on"] is None
    assert "last.pt" in summary["note"] and "not used for training, checkpoint selection" in summary["note"]
    assert "optimistic" not in summary["note"]
    for fold in (0, 1):
        assert json.loads((fold_dir(run, fold) / "cv_fold.json").read_text())["weights"] == "last"
        last = torch.load(fold_dir(run, fold) / "last.pt", weights_only=True)
        state = json.loads((fold_dir(run, fold) / "model-last" / f"tiny-fold{fold}.json").read_text())
        assert state["training"]["best_epoch"] == len(state["training"]["history"]) == last["epoch"]
        (record,) = json.loads((fold_dir(run, fold) / "history.json").read_text())
        assert "test:jsrt/dice_both" in record and "jsrt/dice_both" not in record  # logged, never validated on
        assert record["val_score"] == record["other/dice_both"]
    held = summary["evaluations"]["jsrt/held_out"]
    assert (
        held["hd95_unit"] == "mm"
        and held["images"] == 12
        and sorted(summary["assignment"]) == sorted(f"case{i:02d}.png" for i in range(12))
    )
    assert [row["images"] for row in held["per_fold"]] == [6, 6]
    for metric in ("both_dice", "right_dice", "left_dice", "both_hd95"):
        fold_means = [row[metric] for row in held["per_fold"]]
        assert held["across_folds"][metric]["mean"] == pytest.approx(np.mean(fold_means))
        assert held["across_folds"][metric]["sd"] == pytest.approx(np.std(fold_means, ddof=1))
        per_image = [
            float(r[metric])
            for fold in (0, 1)
            for r in csv.DictReader(open(fold_dir(run, fold) / "eval-last-jsrt-held_out" / "evaluation.csv"))
        ]
        assert held["pooled_per_image"][metric]["mean"] == pytest.approx(np.mean(per_image))
        assert held["pooled_per_image"][metric]["sd"] == pytest.approx(np.std(per_image))
    other = summary["evaluations"]["other/val"]
    assert other["hd95_unit"] == "px" and other["images"] == 2  # 1 of 4 per fold model, scored twice
    table = (run / "cv_summary.md").read_text()
    assert "| mean ± sd (folds) | 12 |" in table and "HD95 (mm)" in table and "## other/val" in table
    assert "Scored, each fold's last.pt" in table and "optimistic" not in table

    # a second call trains and scores nothing again
    stamps = {
        p: p.stat().st_mtime_ns
        for fold in (0, 1)
        for p in (fold_dir(run, fold) / "last.pt", fold_dir(run, fold) / "eval-last-jsrt-held_out" / "evaluation.csv")
    }
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("training finished earlier, skipped") == 2 and "scoring" not in out
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert json.loads((run / "cv_summary.json").read_text())["evaluations"] == summary["evaluations"]

    # --weights best scores best.pt, selected on the other validation set only, without training again
    assert main(args + ["--weights", "best"]) == 0
    best = json.loads((run / "cv_summary.json").read_text())
    assert (best["weights"], best["checkpoint"], best["selected_on"]) == ("best", "best.pt", ["other-val"])
    assert best["held_out_used_for_selection"] is False and "other-val" in best["note"]
    assert best["evaluations"]["jsrt/held_out"]["images"] == 12
    assert all((fold_dir(run, fold) / "eval-best-jsrt-held_out" / "evaluation.csv").exists() for fold in (0, 1))
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.name == "last.pt")

    # a second stage (lr 0: its parameters stay where they start; batch-norm statistics still move) starts each
    # fold from that fold's first stage
    stage2 = dict(recipe, name="tiny2")
    stage2["training"] = dict(
        recipe["training"], init_from=str(run / "fold-{fold}" / "last.pt"), lr=0.0, weight_decay=0.0
    )
    (tmp_path / "tiny2.yaml").write_text(yaml.safe_dump(stage2))
    run2 = tmp_path / "cv2"
    assert (
        main(
            [
                "--config",
                str(tmp_path / "tiny2.yaml"),
                "--folds",
                "2",
                "-o",
                str(run2),
                "--data-root",
                str(data),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    weights = {
        (r, fold): {
            k: v
            for k, v in torch.load(fold_dir(r, fold) / "last.pt", weights_only=True)["model"].items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        }
        for r in (run, run2)
        for fold in (0, 1)
    }
    for fold in (0, 1):
        same = weights[run, fold]
        assert all(torch.equal(same[k], v) for k, v in weights[run2, fold].items())
    assert not all(torch.equal(weights[run, 0][k], v) for k, v in weights[run2, 1].items())

    # the recipe trained on all of its data ships its final weights, with its cross-validation in the card
    final = train(recipe, data_root=data, out_dir=tmp_path / "final", device="cpu")
    with pytest.raises(LungSegError, match="cross-validates the recipe 'tiny2', not 'tiny'"):
        export_run(final, tmp_path / "models", device="cpu", weights="last", cross_validation=run2 / "cv_summary.json")
    with pytest.raises(LungSegError, match="scored each fold's best.pt; the card's weights are last.pt"):
        export_run(final, tmp_path / "models", device="cpu", weights="last", cross_validation=run / "cv_summary.json")
    assert main(args) == 0  # the summary of the final weights again (scores kept from the first call)
    card_path = export_run(
        final, tmp_path / "models", device="cpu", weights="last", cross_validation=run / "cv_summary.json"
    )
    card = json.loads(card_path.read_text())
    last = torch.load(final / "last.pt", weights_only=True)["model"]
    exported = load_file(str(card_path.with_suffix(".safetensors")))
    assert all(torch.equal(exported[k], v) for k, v in last.items()) and set(exported) == set(last)
    assert card["training"]["best_epoch"] == card["training"]["epochs_run"] == 1
    recorded = card["cross_validation"]
    assert (recorded["recipe"], recorded["folds"], recorded["weights"]) == ("tiny", 2, "last")
    assert (
        recorded["evaluations"]["jsrt/held_out"]["across_folds"]
        == json.loads((run / "cv_summary.json").read_text())["evaluations"]["jsrt/held_out"]["across_folds"]
    )
    monkeypatch.setenv("LUNGSEG_MODELS_PATH", str(tmp_path / "models"))
    capsys.readouterr()
    assert cli_main(["models"]) == 0
    held = recorded["evaluations"]["jsrt/held_out"]["across_folds"]["both_dice"]
    assert (
        f"recipe's 2-fold cross-validation, jsrt/held_out: Dice {held['mean']:.4f} ± {held['sd']:.4f}"
        in capsys.readouterr().out
    )


def test_an_unfinished_cross_validation_is_not_recorded_in_a_card(tmp_path):
    from lungseg.training.export import cross_validation_record

    (tmp_path / "cv_summary.json").write_text(
        json.dumps({"recipe": "unet-512", "complete": False, "folds": 5, "folds_done": [0, 1]})
    )
    with pytest.raises(LungSegError, match=r"only folds \[0, 1\] of 5 are scored"):
        cross_validation_record(tmp_path / "cv_summary.json", "unet-512", "last")
    with pytest.raises(LungSegError, match="no such cross-validation summary"):
        cross_validation_record(tmp_path / "missing.json", "unet-512", "last")


def test_a_fold_folder_refuses_another_recipe(tmp_path, monkeypatch):
    from lungseg.training.crossval import check_run_config

    cfg = fold_config(load_config("unet-jsrt-cv"), 1, 5)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    check_run_config(tmp_path, cfg)
    with pytest.raises(LungSegError, match="different config"):
        check_run_config(tmp_path, fold_config(load_config("unet-jsrt-cv"), 1, 4))
