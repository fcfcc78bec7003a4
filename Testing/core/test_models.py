"""The shipped model: safe loading with a checksum, accuracy on JSRT val, and left/right on real radiographs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lungseg.errors import LungSegError
from lungseg.evaluation.evaluate import evaluate
from lungseg.inference.labels import LEFT_LUNG, RIGHT_LUNG
from lungseg.io.radiograph import read_radiograph
from lungseg.models.cards import list_models, load_graphs, load_network, read_card, sha256_of
from lungseg.samples import sample_pngs


def test_shipped_card_describes_verified_weights():
    """Metadata consistency (the checksum, the label convention, the recipe); the card's Dice values are not
    targets here: test_shipped_models.py measures them again."""
    card = read_card("unet")
    assert card["sha256"] == sha256_of(card["weights_path"])
    assert card["definition"] == "lung-fields"
    assert card["labels"] == {"0": "background", "1": "right lung (patient side)", "2": "left lung (patient side)"}
    assert card["training"]["seconds"] > 0 and card["recipe"]["network"]["name"] == "unet"
    assert "unet" in [c["name"] for c in list_models()]


def test_tampered_weights_are_refused(tmp_path):
    card = read_card("unet")
    shutil.copy(card["card_path"], tmp_path / "unet.json")
    data = bytearray(open(card["weights_path"], "rb").read())
    data[-100] ^= 0xFF
    (tmp_path / "unet.safetensors").write_bytes(bytes(data))
    with pytest.raises(LungSegError, match="checksum mismatch"):
        load_network(tmp_path / "unet.json")


def test_tampered_onnx_graphs_are_refused(tmp_path):
    """The graph that ONNX Runtime would run is checked against the card's SHA-256 before it is loaded."""
    card = read_card("unet")
    shutil.copy(card["card_path"], tmp_path / "unet.json")
    shutil.copy(card["weights_path"], tmp_path / "unet.safetensors")
    graph = Path(card["card_path"]).parent / card["onnx"]["graphs"][0]["file"]
    data = bytearray(graph.read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / graph.name).write_bytes(bytes(data))
    with pytest.raises(LungSegError, match="checksum mismatch"):
        load_graphs(tmp_path / "unet.json", "cpu")
    (tmp_path / graph.name).unlink()
    with pytest.raises(LungSegError, match="file missing"):
        load_graphs(tmp_path / "unet.json", "cpu")


def test_the_weights_a_graph_reads_are_verified_too(tmp_path):
    """The graph holds no weights: ONNX Runtime reads them from the safetensors file beside it, which must be the
    card's (one changed float would segment quietly with other weights), and must be there."""
    card = read_card("unet")
    folder = Path(card["card_path"]).parent
    for name in ("unet.json", card["onnx"]["graphs"][0]["file"]):
        shutil.copy(folder / name, tmp_path / name)
    weights = bytearray(Path(card["weights_path"]).read_bytes())
    weights[-100] ^= 0x01  # the last bits of a float of the last tensor
    (tmp_path / "unet.safetensors").write_bytes(bytes(weights))
    with pytest.raises(LungSegError, match=r"unet\.safetensors: checksum mismatch"):
        load_graphs(tmp_path / "unet.json", "cpu")
    (tmp_path / "unet.safetensors").unlink()
    with pytest.raises(LungSegError, match=r"unet\.safetensors: file missing"):
        load_graphs(tmp_path / "unet.json", "cpu")
    shutil.copy(card["weights_path"], tmp_path / "unet.safetensors")
    graphs, _ = load_graphs(tmp_path / "unet.json", "cpu")
    assert len(graphs) == 1


def test_shipped_model_dice_on_jsrt_val(jsrt, segmenter, tmp_path):
    summary = evaluate(jsrt / "images", jsrt / "masks", split="val", out_dir=tmp_path, segmenter=segmenter)
    assert summary["images"] == 22 and summary["regions"] == ["both", "right", "left"]
    assert summary["both_dice"]["mean"] >= 0.95, summary["both_dice"]
    assert summary["right_dice"]["mean"] >= 0.94 and summary["left_dice"]["mean"] >= 0.94
    assert json.loads((tmp_path / "summary.json").read_text())["both_dice"] == summary["both_dice"]


def _centroid_column(label, value):
    return np.nonzero(label == value)[1].mean()


@pytest.mark.parametrize("source", ["dicom", "png"])
def test_right_lung_is_on_the_image_left_of_a_pa_radiograph(source, segmenter, chest_dicom):
    paths = [chest_dicom] if source == "dicom" else sample_pngs()
    for path in paths:
        image = read_radiograph(path)
        label = segmenter.segment(image.pixels).label
        right, left = (label == RIGHT_LUNG).mean(), (label == LEFT_LUNG).mean()
        assert 0.04 < right < 0.35 and 0.04 < left < 0.35, (path, right, left)
        assert _centroid_column(label, RIGHT_LUNG) < image.shape[1] / 2 < _centroid_column(label, LEFT_LUNG), path


def test_monochrome1_is_segmented_like_its_inverted_twin(chest_dicom, segmenter):
    """Segmenting the DICOM (inverted on read) and the same pixels already inverted by hand must agree."""
    import pydicom

    from lungseg.inference.orientation import Corrections

    raw = pydicom.dcmread(chest_dicom).pixel_array.astype(np.float32)
    from_dicom = segmenter.segment(read_radiograph(chest_dicom).pixels).label
    by_hand = segmenter.segment(raw.max() - raw).label
    agreement = 2 * ((from_dicom > 0) & (by_hand > 0)).sum() / ((from_dicom > 0).sum() + (by_hand > 0).sum())
    assert agreement > 0.99
    not_inverted = segmenter.segment(raw, corrections=Corrections.parse("none")).label
    wrong = 2 * ((from_dicom > 0) & (not_inverted > 0)).sum() / ((from_dicom > 0).sum() + (not_inverted > 0).sum())
    assert wrong < 0.8, "without the inversion the segmentation is clearly different (Dice ~0.4)"
    caught = segmenter.segment(raw)  # the orientation classifier sees that air is bright
    assert caught.orientation.corrected == "inverted (from the pixels)" and (caught.label == by_hand).mean() > 0.999


def test_scores_shrink_to_a_small_image_as_torchs_8_bit_resize_did():
    """Issue 34: the torch path resized the 8-bit scores with torch's uint8 bilinear (two fixed-point passes); a
    film smaller than the model's input (unet-512 on a 256² film) must get the same 8-bit scores, not a float
    resize's."""
    import torch
    import torch.nn.functional as F

    from lungseg.inference.postprocess import _resize_uint8

    scores = np.random.default_rng(0).random((3, 512, 512)).astype(np.float32)
    quantized = torch.from_numpy(np.rint(scores * 255).astype(np.uint8))[None]
    for shape in [(256, 256), (300, 200), (137, 400), (300, 700)]:
        expected = F.interpolate(quantized.contiguous(memory_format=torch.channels_last), size=shape, mode="bilinear")
        np.testing.assert_array_equal(_resize_uint8(scores, shape), expected[0].numpy(), err_msg=str(shape))


def test_the_labelmap_resized_in_a_window_equals_the_whole_resize(segmenter):
    """Only the window around the lungs is enlarged to the film's size; outside it every pixel is surely background.
    The labelmap must equal the argmax of the whole resize (Pillow's bilinear, columns then rows, each pass in its
    own call), to the pixel, on real outputs and film sizes whose ratio to the model's input is not a power of two
    (the window's edges must then fall on whole model pixels) or is close to 1 along one axis."""
    from PIL import Image

    from lungseg.inference.postprocess import _full_resolution_label, _resize_uint8, _winning_class
    from lungseg.inference.preprocess import model_input
    from lungseg.samples import sample_pngs

    def whole(quantized, shape):
        across = [Image.fromarray(band).resize((shape[1], band.shape[0]), Image.BILINEAR) for band in quantized]
        return np.stack([np.asarray(band.resize(shape[::-1], Image.BILINEAR)) for band in across])

    shapes = [(1024, 1024), (2000, 1650), (2500, 2048), (257, 300), (3001, 2999), (284, 2771), (552, 3967)]
    shapes += [tuple(int(n) for n in np.random.default_rng(5).integers(256, 3000, 2)) for _ in range(3)]
    for path in sample_pngs():
        scores = segmenter.probabilities(model_input(read_radiograph(path).pixels, segmenter.size)[None])[0]
        quantized = np.rint(scores * 255).astype(np.uint8)
        for shape in shapes:
            bands = whole(quantized, shape)
            np.testing.assert_array_equal(_resize_uint8(scores, shape), bands, err_msg=f"{path.name} {shape}")
            label = _full_resolution_label(scores, shape)
            np.testing.assert_array_equal(label, _winning_class(bands), err_msg=f"{path.name} {shape}")
    empty = np.zeros((3, 256, 256), np.float32)
    empty[0] = 1.0
    assert not _full_resolution_label(empty, (600, 500)).any()


def test_intensity_normalization_uses_torch_quantile_percentiles():
    """The NumPy preprocessing scales by the same percentiles as torch.quantile, which the models trained with."""
    import torch

    from lungseg.inference.preprocess import HIGH_PERCENTILE, LOW_PERCENTILE, normalize_intensity

    generator = torch.Generator().manual_seed(0)
    for shape in [(256, 256), (3, 40, 70), (2, 1, 17, 5)]:
        image = torch.rand(shape, generator=generator) * 4095
        flat = image.reshape(*shape[:-2], -1)
        low = torch.quantile(flat, LOW_PERCENTILE / 100, dim=-1, keepdim=True)
        high = torch.quantile(flat, HIGH_PERCENTILE / 100, dim=-1, keepdim=True)
        expected = ((flat - low) / (high - low)).clamp(0, 1).reshape(shape)
        np.testing.assert_allclose(normalize_intensity(image.numpy()), expected.numpy(), atol=1e-6, rtol=0)


def test_resizing_samples_as_torch_does():
    """The NumPy resize (preprocessing, ensemble members, probability maps) gives torch's `interpolate` values,
    bilinear with half-pixel centres, with and without antialiasing, shrinking and enlarging."""
    import torch
    import torch.nn.functional as F

    from lungseg.inference.preprocess import resize

    rng = np.random.default_rng(0)
    for source, target in [
        ((1024, 900), (256, 256)),
        ((256, 256), (384, 384)),
        ((200, 300), (256, 256)),
        ((256, 256), (183, 91)),
        ((512, 512), (384, 384)),
    ]:
        x = rng.random(source, dtype=np.float32)
        for antialias in (True, False):
            expected = F.interpolate(
                torch.from_numpy(x)[None, None], size=target, mode="bilinear", align_corners=False, antialias=antialias
            )[0, 0].numpy()
            np.testing.assert_allclose(resize(x, target, antialias), expected, atol=1e-4, rtol=0)
