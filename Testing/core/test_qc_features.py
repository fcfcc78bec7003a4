"""The predicted quality's features and `assess` at run time (`lungseg.qc.features`, `lungseg.qc.model`): the
shape prior, the image's edges, an ensemble's members, one function for the batch and the Slicer module, and
inputs that are not chest radiographs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import importorskip, pydicom_data_file
from helpers import SHIPPED, results_rows, synthetic_rows, users_model

from lungseg.errors import LungSegError
from lungseg.evaluation.metrics import both_lung_dice
from lungseg.models.cards import read_card
from lungseg.qc import selection
from lungseg.qc.features import (
    FEATURE_SETS,
    FEATURES,
    MEMBER_FEATURES,
    PRIOR_FEATURE,
    UNCERTAINTY_FEATURES,
    quality_features,
)
from lungseg.qc.fit import fit_qc_mode
from lungseg.qc.model import assess, quality_model
from lungseg.samples import sample_pngs


def bitten(label: np.ndarray) -> np.ndarray:
    """The reference with the lower lateral corner of the left lung gone (a consolidated base the model missed);
    the lung keeps its bounding box."""
    from lungseg.definitions import LEFT_LUNG

    rows, cols = np.nonzero(label == LEFT_LUNG)
    out = label.copy()
    corner = out[(rows.min() + rows.max()) // 2 :, (2 * cols.min() + cols.max()) // 3 :]
    corner[corner == LEFT_LUNG] = 0
    return out


def test_a_shape_prior_of_reference_lungs_finds_a_bitten_or_lost_lung_and_a_fit_reads_it_where_it_ranks_best(
    jsrt, segmenter
):
    """The shape prior: the principal modes of the reference lungs' shapes (each scaled to its box) that the fit
    half holds. A held-out reference lies close to them, the same lung with its base bitten off further, and a lost
    lung furthest. Where that distance is what tells the failures apart, the fit reads it (a WITH_PRIOR set), the
    card's mode stores the prior, and `assess` computes the distance as the fit did."""
    from lungseg.definitions import LEFT_LUNG
    from lungseg.io.labelled import case_label, list_cases
    from lungseg.qc.features import fit_shape_prior, lung_shapes, shape_prior_distance
    from lungseg.qc.model import QualityModel

    labels = [case_label(case) for case in list_cases(jsrt, "train")[:120]]
    prior = fit_shape_prior(np.stack([lung_shapes(label) for label in labels[:60]]))
    assert prior["images"] == 60 and np.shape(prior["components"]) == (2, 6, 24 * 16)
    for label in labels[60:80]:
        normal = shape_prior_distance(lung_shapes(label), prior)
        lost = label.copy()
        lost[lost == LEFT_LUNG] = 0
        assert (
            normal
            < shape_prior_distance(lung_shapes(bitten(label)), prior)
            < shape_prior_distance(lung_shapes(lost), prior)
        )

    rng = np.random.default_rng(0)
    pool = []
    for i, label in enumerate(labels):
        prediction = bitten(label) if i % 3 == 0 else label  # the failures differ from the good results in shape
        pool.append(
            {
                "image": f"i{i}.png",
                "group": f"p{i}",
                "half": "fit" if i < 60 else "measure",
                "role": "own",
                "source": "m",
                "dataset": "jsrt",
                "in_domain": True,
                "perturbation": "",
                "dice": both_lung_dice(prediction, label) - (0.08 if i % 3 == 0 else 0.0),
                "features": {name: float(rng.normal()) for name in FEATURES},  # noise
                "rules": {"lung-fields": []},
                "shapes": lung_shapes(prediction).astype(np.float16),
                "reference_shapes": lung_shapes(label).astype(np.float16),
            }
        )
    block, validation = fit_qc_mode(pool, "default", "lung-fields")
    assert block["fitted_on"]["feature_set"].endswith(selection.WITH_PRIOR), block["fitted_on"]
    assert block["fitted_on"]["shape_prior_references"] == 60 and PRIOR_FEATURE in block["features"]
    measured = validation["jsrt"]["qc"]  # the measure half: 20 bitten lungs among 40 good results
    assert measured["below"] == 20 and measured["flagged_below"] >= 18 and measured["flagged_at_or_above"] <= 4
    assert measured["spearman"] > 0.6
    no_prior = [{k: v for k, v in r.items() if k not in ("shapes", "reference_shapes")} for r in pool]
    assert PRIOR_FEATURE not in fit_qc_mode(no_prior, "default", "lung-fields")[0]["features"]
    with pytest.raises(LungSegError, match="with shape prior needs the reference masks of at least 20 real images"):
        fit_qc_mode(no_prior, "default", "lung-fields", feature_sets=["boundary with shape prior"])

    stored = json.loads(json.dumps(block))  # as the card holds it
    prediction = segmenter.segment(
        sitk.GetArrayFromImage(sitk.ReadImage(str(list_cases(jsrt, "val")[0].image), sitk.sitkFloat32))
    )
    assessment = assess(prediction, {"definition": "lung-fields", "qc": {"modes": {"default": stored}}})
    fitted = QualityModel.from_dict(stored)
    values = quality_features(prediction, prior=fitted.shape_prior)
    assert assessment.quality == round(fitted.predict(values), 4)
    assert values[PRIOR_FEATURE] == shape_prior_distance(lung_shapes(prediction.model_label), stored["shape_prior"])


def soft_labels(label: np.ndarray) -> np.ndarray:
    """A softmax (3, S, S) whose lungs fade over a few pixels at the label's outline, as a network's do."""
    from scipy import ndimage

    from lungseg.definitions import LEFT_LUNG, RIGHT_LUNG

    soft = np.stack([ndimage.gaussian_filter((label == v).astype(np.float32), 2.0) for v in (0, RIGHT_LUNG, LEFT_LUNG)])
    return soft / soft.sum(0)


def test_the_image_edges_tell_an_outline_on_the_lung_edge_from_one_off_it(jsrt):
    """EDGE_FEATURE (`edge_support`): on real radiographs the reference lungs' outline lies on the image's lung
    edge, and the same lungs shrunk, grown or moved down by 6 pixels do not."""
    from scipy import ndimage

    from lungseg.definitions import LEFT_LUNG, RIGHT_LUNG
    from lungseg.inference.preprocess import model_input
    from lungseg.io.labelled import case_label, list_cases
    from lungseg.io.radiograph import read_radiograph
    from lungseg.qc.features import edge_support

    def per_lung(label, change):
        out = np.zeros_like(label)
        for value in (RIGHT_LUNG, LEFT_LUNG):
            out[change(label == value) & (out == 0)] = value
        return out

    for case in list_cases(jsrt, "val")[:8]:
        image = model_input(read_radiograph(case.image).pixels, 256)[0]
        label = case_label(case)[::2, ::2].copy()  # JSRT's 512 x 512 at the model's 256 x 256
        label[label > LEFT_LUNG] = 0
        on_edge = edge_support(image, label, soft_labels(label))
        for off in (
            per_lung(label, lambda m: ndimage.binary_erosion(m, iterations=6)),
            per_lung(label, lambda m: ndimage.binary_dilation(m, iterations=6)),
            np.roll(label, 6, axis=0),
        ):
            assert edge_support(image, off, soft_labels(off)) < on_edge - 0.05, case.image.name
    assert edge_support(image, np.zeros_like(label), soft_labels(label)) == 0.0, "no lung: no edge"


def test_a_fit_reads_the_image_edges_where_they_rank_best_and_the_batch_hands_them_the_network_input(
    tmp_path, monkeypatch
):
    """A fit reads EDGE_FEATURE where it tells the failures apart (a WITH_EDGES set). A card whose regression reads
    it gets the network's input in the batch's finisher processes, and the batch's quality is the one `assess`
    gives the single-image path (the Slicer module's); a prediction without that input cannot be judged by such a
    card, and the error says why."""
    import dataclasses

    from lungseg.batch.run import segment_inputs
    from lungseg.inference.segmenter import Segmenter
    from lungseg.io.radiograph import read_radiograph
    from lungseg.qc.features import BOUNDARY_FEATURES, EDGE_FEATURE
    from lungseg.qc.model import QualityModel, reads_image

    rows = synthetic_rows("expected_dice")
    rng = np.random.default_rng(3)
    for row in rows:  # now the edges alone know the Dice
        row["features"]["expected_dice"] = float(rng.normal())
        row["features"][EDGE_FEATURE] = row["dice"] + float(rng.normal(0, 0.02))
    feature_set, _, scores = selection.choose_regression(rows, "default", "lung-fields", 0.90, 0.3, False)
    assert set(scores) == set(FEATURE_SETS) | {s + selection.WITH_EDGES for s in FEATURE_SETS}
    assert feature_set == "boundary" + selection.WITH_EDGES, scores
    assert selection.feature_names(
        "uncertainty", False, "boundary with shape prior with image edges without sample spread"
    ) == BOUNDARY_FEATURES + (PRIOR_FEATURE, EDGE_FEATURE)

    card_path = users_model(tmp_path, "edge-unet")  # `unet` whose default regression also reads the edges
    stored = json.loads(card_path.read_text())
    default = read_card("unet")["qc"]["modes"]["default"]
    block = {
        **default,
        **{
            k: default[k] + [v]
            for k, v in (("features", EDGE_FEATURE), ("centre", 0.0), ("mean", 0.8), ("scale", 0.1), ("weights", 0.5))
        },
    }
    stored["qc"] = {"modes": {"default": block}, "threshold": block["threshold"]}
    card_path.write_text(json.dumps(stored))
    monkeypatch.setenv("LUNGSEG_MODELS_PATH", str(card_path.parent))
    edge_unet = Segmenter("edge-unet", "cpu")
    assert reads_image(edge_unet.card) and not reads_image(read_card("unet"))
    png = sample_pngs()[0]
    summary = segment_inputs([str(png)], tmp_path / "out", model="edge-unet", workers=1)
    assert (summary.done, summary.failed) == (1, 0)
    row = results_rows(tmp_path / "out")[png.name]
    assert row["status"] == "ok", row["error"]
    prediction = edge_unet.segment(read_radiograph(png).pixels)
    assessment = assess(prediction, edge_unet)
    assert abs(assessment.quality - float(row["quality"])) < 2e-3 and assessment.qc == row["qc"]
    values = quality_features(prediction, edges=True)
    assert assessment.quality == round(QualityModel.from_dict(block).predict(values), 4)
    assert abs(assessment.quality - assess(prediction, read_card("unet")).quality) > 1e-3, "the edges count"
    with pytest.raises(ValueError, match="reads the network's input"):
        assess(dataclasses.replace(prediction, model_image=None), edge_unet)


def test_assess_leaves_out_the_fragments_rule_only_where_the_cards_fit_turned_it_off(segmenter):
    """The batch, `lungseg evaluate` and the Slicer logic all judge through `assess`: a card whose fit turned the
    fragments rule off is not flagged for fragments, with the same predicted quality; a card without a fitted
    regression (the rules alone) and every shipped card keep the rule."""
    import copy
    import dataclasses

    from lungseg.io.radiograph import read_radiograph

    prediction = segmenter.segment(read_radiograph(sample_pngs()[0]).pixels)
    raw = prediction.raw_label.copy()
    size = raw.shape[0]
    raw[: size // 12, : size // 6] = 1  # two stray lung pieces in the corners, each above 0.5 % of the image
    raw[: size // 12, -size // 6 :] = 2
    fragmented = dataclasses.replace(prediction, raw_label=raw)
    card = copy.deepcopy(segmenter.card)
    kept = assess(fragmented, card)
    assert any("4 large lung components before clean-up" in r for r in kept.reasons), kept.reasons
    card["qc"]["modes"]["default"]["fragments_rule"] = False
    off = assess(fragmented, card)
    assert off.quality == kept.quality and not any("large lung components" in r for r in off.reasons)
    unfitted = {k: v for k, v in card.items() if k != "qc"}
    assert any("large lung components" in r for r in assess(fragmented, unfitted).reasons)
    for name in SHIPPED:  # fitted before the rule was a choice, or kept by the choice
        assert all(quality_model(read_card(name), u)[0].fragments_rule for u in (False, True))


def test_one_function_gives_the_slicer_module_the_batchs_quality(tmp_path, segmenter):
    """`quality.assess(prediction, segmenter)` is what the Slicer logic calls: the same quality and reasons as the
    batch's row for the same image; with --uncertainty it uses the card's uncertainty regression."""
    from lungseg.batch.run import segment_inputs
    from lungseg.io.radiograph import read_radiograph

    png = sample_pngs()[0]
    segment_inputs([str(png)], tmp_path, workers=0)
    row = results_rows(tmp_path)[png.name]
    image = read_radiograph(png)
    prediction = segmenter.segment(image.pixels)
    assessment = assess(prediction, segmenter)
    assert abs(assessment.quality - float(row["quality"])) < 2e-3 and assessment.qc == row["qc"]
    assert assessment.threshold == read_card("unet")["qc"]["threshold"]
    assert assess(prediction, segmenter.card).quality == assessment.quality, "the card alone is enough"
    assert set(quality_features(prediction)) == set(FEATURES)
    output_only = quality_features(prediction, shape=False)
    assert set(output_only) == set(FEATURE_SETS["output"]), "a regression without the shape skips its cost"
    assert all(output_only[k] == v for k, v in quality_features(prediction).items() if k in output_only)
    sampled = segmenter.segment(image.pixels, uncertainty=True)
    assert set(quality_features(sampled)) == set(FEATURES + UNCERTAINTY_FEATURES)
    fitted, mode = quality_model(segmenter.card, uncertainty=True)
    assert (
        assess(sampled, segmenter).mode
        == mode
        == ("uncertainty" if "uncertainty" in segmenter.card["qc"]["modes"] else "default")
    )
    unfitted = {k: v for k, v in segmenter.card.items() if k != "qc"}
    bare = assess(prediction, unfitted)
    assert bare.quality is None and bare.threshold is None, "a card without a qc block: the rules alone"


def test_an_ensembles_members_give_its_quality_their_spread_at_no_extra_cost():
    """The shipped full-extent ensemble: every output carries the spread of its members' probabilities (the
    members' mean is the output itself), in both modes; its quality uses it; a single network has none."""
    from lungseg.inference.preprocess import model_input
    from lungseg.inference.segmenter import Segmenter
    from lungseg.io.radiograph import read_radiograph

    ensemble = Segmenter("unet-full-extent", "cpu", threads=1)
    pixels = read_radiograph(sample_pngs()[0]).pixels
    x = model_input(pixels, ensemble.size)[None]
    members = ensemble.member_probabilities(x)
    assert members.shape == (2, 1, 3, ensemble.size, ensemble.size)
    output = ensemble.predict(x)
    assert np.allclose(output.probabilities, members.mean(0), atol=1e-6) and output.uncertainty is None
    assert np.allclose(output.member_spread, members.std(0, ddof=1).max(1), atol=1e-6)
    assert 0 < float(output.member_spread.mean()) < 0.2, "two trained members agree on most pixels, not all"
    sampled = ensemble.predict(x, uncertainty=True)
    assert sampled.uncertainty is not None and np.allclose(sampled.member_spread, output.member_spread, atol=1e-6)

    prediction = ensemble.segment(pixels)
    values = quality_features(prediction)
    assert set(values) == set(FEATURES + MEMBER_FEATURES)
    assert values["member_spread"] == pytest.approx(
        float(prediction.model_member_spread[prediction.model_label > 0].mean()), rel=1e-6
    )
    fitted, _ = quality_model(ensemble.card)
    agreeing = dict(values, member_spread=0.0, member_disagreement=0.0)
    assert fitted.predict(agreeing) > fitted.predict(dict(values, member_spread=0.3, member_disagreement=1.0)), (
        "members that disagree lower the predicted quality"
    )
    single = Segmenter("unet", "cpu")
    assert single.predict(model_input(pixels, single.size)[None]).member_spread is None
    assert not set(MEMBER_FEATURES) & set(quality_features(single.segment(pixels)))


def make_ood_folder(folder):
    """Inputs that are not usable chest radiographs, from what is installed: photos bundled with scikit-image; MR,
    ultrasound and extremity DICOMs from pydicom-data; a radiograph with one lung cropped away, and pure noise. Also
    the radiograph rotated 90 and 180 degrees and inverted, which the orientation classifier corrects (issue 35)."""
    from skimage import data

    importorskip("data_store", reason="pydicom-data holds the MR, ultrasound and extremity DICOMs")
    folder.mkdir()
    for name in ("astronaut", "camera", "coffee", "chelsea", "page", "shepp_logan_phantom", "rocket"):
        image = getattr(data, name)()
        if image.dtype != np.uint8:
            image = (image / image.max() * 255).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(image, isVector=image.ndim == 3), str(folder / f"photo_{name}.png"))
    for name in ("MR_small.dcm", "MR2_UNCR.dcm", "US1_UNCR.dcm", "US1_J2KR.dcm", "RG3_UNCR.dcm"):
        shutil.copy(pydicom_data_file(name), folder / f"dicom_{name}")
    chest = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_pngs()[0])))
    variants = {
        "rotated90": np.rot90(chest),
        "rotated180": np.rot90(chest, 2),
        "inverted": 255 - chest,
        "one_lung_cropped": chest[:, : chest.shape[1] * 11 // 20],
        "noise": np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8),
    }
    for name, pixels in variants.items():
        sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(pixels)), str(folder / f"chest_{name}.png"))
    return sorted(p.name for p in folder.iterdir())


CORRECTED = {
    "chest_rotated90.png": "rotated 90 (from the pixels)",
    "chest_rotated180.png": "rotated 180 (from the pixels)",
    "chest_inverted.png": "inverted (from the pixels)",
}


def test_ood_inputs_are_all_flagged_and_none_stops_the_batch(tmp_path):
    from lungseg.batch.run import segment_inputs

    names = make_ood_folder(tmp_path / "ood")
    summary = segment_inputs([str(tmp_path / "ood")], tmp_path / "out", workers=1, batch_size=4)
    rows = results_rows(tmp_path / "out")
    assert sorted(rows) == names and summary.done == len(names), "every input has its row: nothing crashed"
    for name, row in rows.items():
        if row["status"] == "error":  # a file the reader refuses is a clean error row, never a crash
            assert row["error"] and "Traceback" not in row["error"], name
            continue
        if name in CORRECTED:  # once a film in distribution, now turned back or inverted back before segmenting
            assert row["orientation_corrected"] == CORRECTED[name] and row["qc"] == "ok", (name, row)
            continue
        assert row["qc"] == "check" and row["qc_reasons"], f"{name} was not flagged: {row}"
        assert 0.0 <= float(row["quality"]) <= 1.0, name
    quality = [float(r["quality"]) for r in rows.values() if r["status"] == "ok"]
    assert len(quality) >= len(names) - 2, "the readers refuse at most the odd ultrasound codec"
    assert summary.to_check == len(quality) - len(CORRECTED), "the run's summary counts every flagged result"
