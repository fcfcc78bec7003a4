"""Films not stored upright (issue 35): the 16 states, the classifier's decisions, and the corrections end to end
through `lungseg segment`, the Python API and the DICOM header, with the shipped orientation graph."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from test_batch import results, run_cli

from lungseg.definitions import LEFT_LUNG, RIGHT_LUNG
from lungseg.evaluation.orientation import stored_copy
from lungseg.inference.orientation import (
    STATES,
    UPRIGHT,
    Corrections,
    State,
    apply_geometry,
    apply_to_input,
    undo_geometry,
    undo_on_input,
    upright_shape,
)
from lungseg.inference.orientation_classifier import (
    MIN_PROBABILITY,
    MIRROR_OF,
    classifier_input,
    decide,
    two_passes,
)
from lungseg.inference.preprocess import model_input
from lungseg.samples import sample_pngs

NONE = Corrections.parse("none")


def asymmetric(shape=(5, 7)):
    return np.random.default_rng(0).random(shape).astype(np.float32)


def test_sixteen_states_move_images_and_keep_label_values():
    image, labels = asymmetric(), np.random.default_rng(1).integers(0, 3, (2, 5, 7))
    assert [s.index for s in STATES] == list(range(16)) and STATES[0] == UPRIGHT
    assert len({apply_to_input(s, image).tobytes() for s in STATES}) == 16
    for state in STATES:
        stored = apply_geometry(state, labels)
        assert upright_shape(state, stored.shape[1:]) == (5, 7) and (stored.shape[1:] != (5, 7)) == state.turned
        np.testing.assert_array_equal(undo_geometry(state, stored), labels)
        np.testing.assert_allclose(undo_on_input(state, apply_to_input(state, image)), image, atol=1e-7)
        assert sorted(np.unique(stored)) == sorted(np.unique(labels))


def test_states_mean_what_their_names_say():
    corner = np.zeros((4, 6))
    corner[0, 0] = 1  # the film's top left: apex side, the patient's right
    assert apply_geometry(State(k=1), corner)[-1, 0] == 1  # a quarter turn counterclockwise: top edge to the left
    assert apply_geometry(State(k=3), corner)[0, -1] == 1
    assert apply_geometry(State(mirrored=True), corner)[0, -1] == 1
    assert State(k=1, mirrored=True, inverted=True).name == "rotated 90 + mirrored + inverted"


def test_the_mirror_image_of_a_state_is_the_state_mirror_of_gives():
    image = asymmetric((6, 6))
    for state in STATES:
        mirrored = apply_to_input(state, image)[..., ::-1]
        np.testing.assert_array_equal(mirrored, apply_to_input(STATES[MIRROR_OF[state.index]], image))


def test_model_input_commutes_with_the_states():
    """The classifier's training moves model inputs; the batch reads moved files: the two must agree."""
    pixels = np.random.default_rng(3).integers(0, 4096, (300, 220)).astype(np.float32)
    base = model_input(pixels, 256)
    for state in STATES:
        stored = stored_copy(state, pixels)
        np.testing.assert_allclose(model_input(stored, 256), apply_to_input(state, base), atol=2e-5)
    assert (
        classifier_input(base[None]).shape == classifier_input(model_input(pixels, 512)[None]).shape == (1, 1, 128, 128)
    )


def test_the_classifier_input_is_the_mean_of_2_by_2_blocks_as_it_was_trained(films):
    inputs = np.stack([model_input(pixels, 256) for _, pixels in films])
    blocks = inputs.reshape(len(inputs), 1, 128, 2, 128, 2)
    np.testing.assert_array_equal(classifier_input(inputs), blocks.mean(axis=(3, 5)))


def probabilities(index: int, p: float) -> np.ndarray:
    out = np.full(16, (1 - p) / 15)
    out[index] = p
    return out


def test_decisions_follow_the_probabilities_the_header_and_the_user():
    turned = probabilities(State(k=1).index, 0.99)
    unclear = decide(probabilities(1, MIN_PROBABILITY - 0.05), 0.0)
    assert unclear.applied == UPRIGHT and "orientation unclear" in unclear.reasons[0]
    assert decide(probabilities(0, 0.99), 0.01).reasons == ()
    found = decide(turned, 0.99)
    assert found.applied == State(k=1, mirrored=True) and found.corrected == "rotated 90 + mirrored (from the pixels)"
    assert "Right and Left follow the anatomy" in found.reasons[0]
    unsure = decide(turned, 0.5)  # the turn is clear, the mirroring is not: turned back, and flagged
    assert (
        unsure.applied == State(k=1) and "cannot tell from the pixels whether the film is mirrored" in unsure.reasons[0]
    )
    header = decide(turned, 0.99, header=True)
    assert header.applied == UPRIGHT and "PatientOrientation says otherwise" in header.reasons[0]
    assert decide(probabilities(0, 0.99), 0.5, header=True).reasons == (), "an unsure pixel call does not contradict"
    off = decide(turned, 0.99, Corrections(turns=True, inversion=True, mirroring=False))
    assert off.applied == State(k=1) and "may be swapped" in off.reasons[0]
    nothing = decide(probabilities(State(k=2, inverted=True).index, 0.99), 0.0, NONE)
    assert nothing.applied == UPRIGHT
    assert nothing.reasons == ("looks rotated 180 + inverted; not corrected (the correction is off)",)
    with pytest.raises(ValueError, match="unknown correction"):
        Corrections.parse("turns,flips")


def test_the_mirror_decision_is_made_on_the_film_turned_upright():
    """The second pass sees the input with the first pass's turn and inversion undone."""
    image = asymmetric((8, 8))
    seen = []

    def probabilities_of(images):
        seen.append(images)
        return np.stack([probabilities(State(k=3, inverted=True).index, 0.95)] * len(images))

    stored = apply_to_input(State(k=3, mirrored=True, inverted=True), image)
    two_passes(probabilities_of, stored[None])
    np.testing.assert_allclose(seen[1][0], image[:, ::-1], atol=1e-6)  # upright, still mirrored


@pytest.fixture(scope="module")
def films(chest_dicom):
    """The demo films and the adult CR as (name, pixels)."""
    from lungseg.io.radiograph import read_radiograph

    return [(p.name, read_radiograph(p).pixels) for p in [*sample_pngs(), chest_dicom]]


def test_the_shipped_classifier_finds_every_state_of_the_demo_films(films, segmenter):
    for name, pixels in films:
        base = model_input(pixels, 256)[None]
        copies = np.stack([apply_to_input(state, base[0]) for state in STATES])
        found = [f.state for f in segmenter.orient(copies, [False] * 16)[1]]
        assert found == list(STATES), name


def test_corrected_films_segment_like_the_upright_film_on_their_own_grid(films, segmenter):
    name, pixels = films[-1]  # the adult CR, 2,140 x 1,760
    upright = segmenter.segment(pixels).label
    for state in (State(k=1), State(k=2), State(k=3), State(mirrored=True), State(inverted=True)):
        stored = stored_copy(state, pixels)
        prediction = segmenter.segment(stored)
        assert prediction.orientation.applied == state and prediction.label.shape == stored.shape
        assert (prediction.label == apply_geometry(state, upright)).mean() > 0.999, state.name  # values kept
        mirrored = "looks mirrored" in "; ".join(prediction.orientation.reasons)
        assert mirrored == state.mirrored


def test_non_chest_inputs_are_flagged_and_never_corrected(segmenter):
    import skimage.data

    rows, cols = np.mgrid[:256, :256] / 255.0
    inputs = {
        "noise": np.random.default_rng(0).random((256, 256)),
        "gradient": rows + cols,
        "camera": skimage.data.camera(),
        "coins": skimage.data.coins(),
    }
    for name, pixels in inputs.items():
        prediction = segmenter.segment(np.asarray(pixels, np.float32))
        assert prediction.orientation.applied == UPRIGHT, (name, prediction.orientation)
        assert prediction.orientation.reasons, name


def write_png(pixels: np.ndarray, path):
    scaled = (pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255
    sitk.WriteImage(sitk.GetImageFromArray(scaled.astype(np.uint8)), str(path))
    return path


def test_segment_corrects_each_state_unless_told_not_to(tmp_path, films):
    pixels = films[0][1]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for state in (UPRIGHT, State(k=1), State(mirrored=True), State(inverted=True)):
        write_png(stored_copy(state, pixels), inputs / f"{state.index}.png")
    for options, expected in (
        (
            (),
            {
                "0": "",
                "1": "rotated 90 (from the pixels)",
                "4": "mirrored (from the pixels)",
                "8": "inverted (from the pixels)",
            },
        ),
        (("--corrections", "turns"), {"0": "", "1": "rotated 90 (from the pixels)", "4": "", "8": ""}),
        (("--no-orientation-check",), {"0": "", "1": "", "4": "", "8": ""}),
    ):
        out = tmp_path / f"out{len(options)}{options[-1] if options else ''}"
        done = run_cli("segment", inputs, "-o", out, "--workers", "0", *options)
        assert done.returncode == 0, done.stderr
        rows = {name.split(".")[0]: row for name, row in results(out).items()}
        assert {k: r["orientation_corrected"] for k, r in rows.items()} == expected, options
        labels = {k: sitk.GetArrayFromImage(sitk.ReadImage(r["output"])) for k, r in rows.items()}
        if not options:
            assert (labels["1"] == np.rot90(labels["0"])).mean() > 0.999
            assert (labels["4"] == labels["0"][:, ::-1]).mean() > 0.999  # the patient's right lung on the image's right
            assert rows["4"]["qc"] == "check" and "looks mirrored" in rows["4"]["qc_reasons"]
        if options == ("--corrections", "turns"):
            assert "may be swapped" in rows["4"]["qc_reasons"] and "inverted; not corrected" in rows["8"]["qc_reasons"]
        if options == ("--no-orientation-check",):  # labelled by position: the sides swap
            assert (
                rows["0"]["orientation"] == ""
                and (labels["4"] == np.where(labels["0"] > 0, 3 - labels["0"], 0)[:, ::-1]).mean() > 0.95
            )


def test_the_dicom_header_wins_and_a_disagreement_is_flagged(tmp_path, chest_dicom):
    ds = pydicom.dcmread(chest_dicom)
    ds.PixelData = np.ascontiguousarray(np.rot90(ds.pixel_array)).tobytes()
    ds.Rows, ds.Columns = ds.Columns, ds.Rows
    ds.PatientOrientation = ["L", "F"]  # says upright: wrong, but stated
    ds.save_as(tmp_path / "turned.dcm")
    del ds.PatientOrientation
    ds.save_as(tmp_path / "turned-no-header.dcm")
    done = run_cli("segment", tmp_path / "turned.dcm", tmp_path / "turned-no-header.dcm", "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    rows = results(tmp_path / "out")
    stated, unstated = rows["turned.dcm"], rows["turned-no-header.dcm"]
    assert stated["orientation_corrected"] == "" and stated["qc"] == "check"
    assert "PatientOrientation says otherwise" in stated["qc_reasons"]
    assert unstated["orientation_corrected"] == "rotated 90 (from the pixels)"
    right, left = (
        np.nonzero(sitk.GetArrayFromImage(sitk.ReadImage(unstated["output"])).squeeze() == v)[0].mean()
        for v in (RIGHT_LUNG, LEFT_LUNG)
    )
    assert right > left, "turned 90 degrees counterclockwise: the patient's right lung is at the bottom"
