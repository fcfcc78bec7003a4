"""Every shipped lung-field network (U-Net, UNet++, probabilistic U-Net) with its real trained weights."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lungseg.evaluate import evaluate
from lungseg.inference import Segmenter
from lungseg.io import read_radiograph
from lungseg.labels import LEFT_LUNG, RIGHT_LUNG
from lungseg.models import list_models, read_card, sha256_of
from lungseg.samples import sample_pngs

NETWORKS = {"unet": "unet", "unetpp": "unetpp", "prob_unet": "prob_unet"}
# mean val Dice floors (JSRT, COVID-QU-Ex): the issue's targets
FLOORS = {name: (0.97, 0.95) for name in NETWORKS}


@pytest.fixture(scope="module", params=sorted(NETWORKS))
def shipped(request) -> Segmenter:
    return Segmenter(request.param, device="cpu")


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_card_meets_the_issue_targets(name):
    card = read_card(name)
    assert card["sha256"] == sha256_of(card["weights_path"])
    assert card["recipe"]["network"]["name"] == NETWORKS[name] and card["definition"] == "lung-fields"
    jsrt, covid = card["metrics"]["jsrt/val"], card["metrics"]["covid-qu-ex/val"]
    assert jsrt["images"] == 22 and covid["images"] == 920
    assert jsrt["both_dice"]["mean"] >= FLOORS[name][0] and covid["both_dice"]["mean"] >= FLOORS[name][1]
    assert min(jsrt["right_dice"]["mean"], jsrt["left_dice"]["mean"]) >= 0.96
    assert jsrt["worst_cases"] and covid["worst_cases"], "the card reports the worst cases"
    assert name in {c["name"] for c in list_models()}


def test_measured_dice_on_jsrt_val(shipped, jsrt, tmp_path):
    summary = evaluate(jsrt / "images", jsrt / "masks", split="val", out_dir=tmp_path, segmenter=shipped)
    assert summary["images"] == 22
    assert summary["both_dice"]["mean"] >= 0.965, (shipped.name, summary["both_dice"])
    assert summary["right_dice"]["mean"] >= 0.95 and summary["left_dice"]["mean"] >= 0.95, shipped.name


def test_right_lung_on_the_image_left_of_real_radiographs(shipped, chest_dicom):
    for path in [chest_dicom, *sample_pngs()]:
        image = read_radiograph(path)
        label = shipped.segment(image.pixels).label
        right_cols, left_cols = np.nonzero(label == RIGHT_LUNG)[1], np.nonzero(label == LEFT_LUNG)[1]
        assert right_cols.size and left_cols.size, (shipped.name, path)
        assert right_cols.mean() < image.shape[1] / 2 < left_cols.mean(), (shipped.name, path)


def test_prob_unet_uncertainty_comes_from_prior_samples_and_sits_on_the_lung_border(jsrt):
    segmenter = Segmenter("prob_unet", device="cpu")
    pixels = read_radiograph(jsrt / "images" / "JPCLN015.png").pixels
    result = segmenter.segment(pixels, uncertainty=True)
    assert result.uncertainty is not None and result.uncertainty.shape == pixels.shape[:2]
    lungs = result.label > 0
    border = lungs ^ ndimage.binary_erosion(lungs, iterations=3)
    interior = ndimage.binary_erosion(lungs, iterations=25)
    assert result.uncertainty.max() > 0, "prior samples must differ"
    assert result.uncertainty[border].mean() > 3 * result.uncertainty[interior].mean()
