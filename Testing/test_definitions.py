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
