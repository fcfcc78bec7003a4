"""Two lung definitions: the full-extent model covers the retrocardiac lung that lung-field models leave out."""
from __future__ import annotations

import numpy as np
import pytest

from lungseg.io import read_radiograph
from lungseg.labels import LEFT_LUNG
from lungseg.models import best_model, list_models


@pytest.fixture(scope="module")
def full_extent():
    if not any(c.get("definition") == "full-extent" for c in list_models()):
        pytest.skip("no full-extent model is available yet (configs/unet-full-extent.yaml trains one)")
    from lungseg.inference import Segmenter

    return Segmenter(best_model("full-extent"), "cpu")


def retrocardiac_left_lung(label: np.ndarray) -> int:
    """Left-lung pixels in the lower medial band of the image's right half, where the heart shadow lies."""
    rows, cols = label.shape
    band = label[int(0.55 * rows):int(0.9 * rows), int(0.5 * cols):int(0.68 * cols)]
    return int((band == LEFT_LUNG).sum())


def test_full_extent_covers_more_retrocardiac_lung(full_extent, segmenter, chest_dicom):
    from lungseg.samples import sample_pngs

    for path in [chest_dicom, *sample_pngs()]:
        pixels = read_radiograph(path).pixels
        fields = segmenter.segment(pixels).label
        extent = full_extent.segment(pixels).label
        assert retrocardiac_left_lung(extent) > 1.2 * retrocardiac_left_lung(fields), path
        assert (extent > 0).sum() > (fields > 0).sum(), path


def test_full_extent_card_and_selection(full_extent):
    assert full_extent.definition == "full-extent"
    assert "v7-full" in str(full_extent.card["data"])
    assert best_model("lung-fields") != best_model("full-extent")


def test_ignore_masks_count_neither_way():
    from lungseg.metrics import image_metrics

    truth = np.zeros((64, 64), np.uint8)
    truth[10:50, 8:28], truth[10:50, 36:56] = 1, 2
    pred = truth.copy()
    pred[50:60, 8:28] = 1          # spills over a pacemaker the annotators could not label
    ignore = np.zeros_like(truth, bool)
    ignore[50:60, :] = True
    assert image_metrics(pred, truth, None)["both_dice"] < 1
    scored = image_metrics(pred, truth, None, ignore=ignore)
    assert scored["both_dice"] == 1 and scored["right_dice"] == 1 and scored["both_hd95"] == 0


def test_evaluate_honours_v7_ignore_masks(full_extent, tmp_path):
    """v7-full marks devices over the lung in masks_ignore/; `lungseg evaluate` leaves those pixels out."""
    import csv
    import shutil

    from conftest import shared_set
    from lungseg.evaluate import evaluate

    v7 = shared_set("v7-full")
    names = sorted(p.name for p in (v7 / "masks_ignore").iterdir())[:2]
    for folder in ("images", "masks", "masks_right", "masks_left", "masks_ignore"):
        (tmp_path / folder).mkdir()
        for name in names:
            if (v7 / folder / name).exists():
                shutil.copy(v7 / folder / name, tmp_path / folder / name)
    with_ignore = evaluate(tmp_path / "images", tmp_path / "masks", out_dir=tmp_path / "a", segmenter=full_extent)
    rows = list(csv.DictReader(open(tmp_path / "a" / "evaluation.csv")))
    assert all(int(r["ignored_pixels"]) > 0 for r in rows)
    shutil.rmtree(tmp_path / "masks_ignore")
    without = evaluate(tmp_path / "images", tmp_path / "masks", out_dir=tmp_path / "b", segmenter=full_extent)
    assert with_ignore["images"] == without["images"] == len(names)
    assert with_ignore["both_dice"]["mean"] != without["both_dice"]["mean"]
