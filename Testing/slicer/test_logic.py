"""The LungSeg Slicer module's logic on real MRML nodes (slicer-core) made from real radiographs.

The module code runs unchanged; Testing/slicer/support provides only what slicer-core lacks (see slicer_app.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import importorskip  # a failure, not a skip, under LUNGSEG_REQUIRE_DATA=1

importorskip(
    "slicer_core",
    reason="slicer-core is not installed (scripts/setup.sh test installs it from Testing/requirements-slicer.txt)",
)
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
import slicer_app  # noqa: E402

slicer = slicer_app.start()
from lungseg.io.radiograph import ImageReadError  # noqa: E402
from lungseg.samples import sample_pngs  # noqa: E402

import LungSeg  # noqa: E402  (not its TestCase by name: pytest would collect it)
from LungSeg import LungSegLogic  # noqa: E402
from LungSegLib import InstallLogic as install  # noqa: E402
from LungSegLib.BatchProcess import BatchProcess  # noqa: E402

JSRT_CASES = ["JPCLN106", "JPCNN057"]  # validation images (never trained on)


@pytest.fixture(autouse=True)
def clear_scene():
    yield
    slicer.mrmlScene.Clear()
    slicer.dicomDatabase = None


def new_segmentation():
    return slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")


def lung_masks(segmentation, volume):
    segments = segmentation.GetSegmentation()
    names = [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
    assert names == ["Right lung", "Left lung"]
    return [
        slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segments.GetSegmentIdBySegmentName(n), volume)[0] > 0
        for n in names
    ]


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def ijk_to_ras(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def test_stand_in_loader_matches_slicers_reader(tmp_path):
    """load_volume (SimpleITK for PNG) gives the geometry that Slicer's own archetype reader gives."""
    image = sitk.ReadImage(str(sample_pngs()[0]))
    image.SetSpacing((0.3, 0.2))
    sitk.WriteImage(image, str(tmp_path / "chest.png"))
    sitk.WriteImage(image, str(tmp_path / "chest.nrrd"))
    ours = slicer_app.load_volume(tmp_path / "chest.png")
    slicers = slicer.modules.volumes.logic().AddArchetypeVolume(str(tmp_path / "chest.nrrd"), "chest", 4)
    np.testing.assert_allclose(ijk_to_ras(ours), ijk_to_ras(slicers))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(ours), slicer.util.arrayFromVolume(slicers))


@pytest.mark.parametrize("name", JSRT_CASES)
def test_jsrt_lungs_match_the_reference(jsrt, name):
    volume = slicer_app.load_volume(jsrt / "images" / f"{name}.png")
    segmentation = new_segmentation()
    summary = LungSegLogic().process(volume, segmentation, device="cpu")

    right, left = lung_masks(segmentation, volume)
    reference_right = sitk.GetArrayFromImage(sitk.ReadImage(str(jsrt / "masks_right" / f"{name}.png"))) > 0
    reference_left = sitk.GetArrayFromImage(sitk.ReadImage(str(jsrt / "masks_left" / f"{name}.png"))) > 0
    assert dice(right, reference_right) >= 0.9
    assert dice(left, reference_left) >= 0.9

    segments = segmentation.GetSegmentation()
    # Slicer's General Anatomy list: Anatomical Structure / Lung with laterality as the type modifier
    # (SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json, 5.6-5.12)
    for segmentId, colour, side in (
        ("RightLung", (0, 158, 115), "SCT^24028007^Right"),
        ("LeftLung", (230, 159, 0), "SCT^7771000^Left"),
    ):
        segment = segments.GetSegment(segmentId)
        np.testing.assert_allclose(segment.GetColor(), np.array(colour) / 255)
        assert f"SCT^123037004^Anatomical Structure~SCT^39607008^Lung~{side}~" in segment.GetTerminology()
    assert (summary.rightAreaPx, summary.leftAreaPx) == (right.sum(), left.sum())
    assert summary.rightAreaMm2 is None  # JSRT PNGs carry no pixel spacing here
    assert summary.model == "unet" and summary.definition == "lung-fields" and summary.definitionText
    assert "no pixel spacing" in summary.statusText() and "QC (lung-fields)" in summary.statusText()


@pytest.fixture(scope="module")
def chest_nrrd(tmp_path_factory):
    """A sample radiograph as NRRD with a real pixel size and origin, loaded by Slicer's own reader."""
    image = sitk.ReadImage(str(sample_pngs()[0]))
    image.SetSpacing((0.35, 0.25))
    image.SetOrigin((12.0, -30.0))
    path = tmp_path_factory.mktemp("nrrd") / "chest.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def test_export_keeps_the_geometry(chest_nrrd, tmp_path):
    volume = slicer.modules.volumes.logic().AddArchetypeVolume(str(chest_nrrd), "chest", 4)
    segmentation = new_segmentation()
    summary = LungSegLogic().process(volume, segmentation, device="cpu")
    right, left = lung_masks(segmentation, volume)
    expected = np.where(left, 2, np.where(right, 1, 0))
    assert summary.rightAreaMm2 == pytest.approx(right.sum() * 0.35 * 0.25, abs=0.1)
    assert "mm²" in summary.statusText().splitlines()[0]

    logic = LungSegLogic()
    nrrd = logic.exportLabelmap(segmentation, volume, tmp_path / "lungs.nrrd")
    # read back with Slicer's own reader: the labelmap overlays the radiograph exactly
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(nrrd))
    assert storage.ReadData(labelmap)
    np.testing.assert_allclose(ijk_to_ras(labelmap), ijk_to_ras(volume), atol=1e-6)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap)[0], expected)

    nifti = sitk.ReadImage(str(logic.exportLabelmap(segmentation, volume, tmp_path / "lungs.nii.gz")))
    np.testing.assert_allclose(nifti.GetSpacing(), (0.35, 0.25, 1.0))
    np.testing.assert_allclose(nifti.GetOrigin()[:2], (12.0, -30.0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nifti)[0], expected)

    png = sitk.ReadImage(str(logic.exportLabelmap(segmentation, volume, tmp_path / "lungs.png")))
    assert png.GetDimension() == 2 and png.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(png.GetSpacing(), (0.35, 0.25), atol=1e-3)  # PNG holds spacing, not origin
    np.testing.assert_array_equal(sitk.GetArrayFromImage(png), expected)

    with pytest.raises(ValueError, match="labelmap file ending"):
        logic.exportLabelmap(segmentation, volume, tmp_path / "lungs.jpg")
    assert not list(tmp_path.glob(".*partial*"))


def test_a_turned_film_is_segmented_upright_on_the_loaded_volume(chest_nrrd, tmp_path):
    """Issue 35: the orientation classifier turns the film upright for the model; the segments come back on the
    volume as loaded, each lung still the patient's side. With the correction off the film is flagged instead."""
    image = sitk.ReadImage(str(chest_nrrd))
    turned = sitk.GetImageFromArray(np.ascontiguousarray(np.rot90(sitk.GetArrayFromImage(image))))
    turned.SetSpacing(image.GetSpacing()[::-1])
    sitk.WriteImage(turned, str(tmp_path / "turned.nrrd"))
    volumes = slicer.modules.volumes.logic()
    upright = volumes.AddArchetypeVolume(str(chest_nrrd), "chest", 4)
    stored = volumes.AddArchetypeVolume(str(tmp_path / "turned.nrrd"), "turned", 4)
    logic = LungSegLogic()
    reference = new_segmentation()
    logic.process(upright, reference, device="cpu")
    right, left = lung_masks(reference, upright)
    segmentation = new_segmentation()
    summary = logic.process(stored, segmentation, device="cpu")
    assert summary.orientationCorrected == "rotated 90 (from the pixels)"
    assert "Corrected before segmenting: rotated 90 (from the pixels)" in summary.statusText()
    turned_right, turned_left = lung_masks(segmentation, stored)
    assert dice(turned_right, np.rot90(right)) > 0.99 and dice(turned_left, np.rot90(left)) > 0.99

    result = logic.compute(logic.readInput(stored), device="cpu", corrections="none")
    assert result.orientationCorrected == "" and "looks rotated 90; not corrected" in "; ".join(result.qcReasons)


def test_rgb_and_single_slice_inputs(tmp_path):
    gray = sitk.ReadImage(str(sample_pngs()[1]))
    rgb = sitk.GetImageFromArray(np.repeat(sitk.GetArrayFromImage(gray)[..., None], 3, axis=2), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.png"))
    rgb_volume = slicer_app.load_volume(tmp_path / "rgb.png")
    assert rgb_volume.IsA("vtkMRMLVectorVolumeNode")
    from_rgb = new_segmentation()
    LungSegLogic().process(rgb_volume, from_rgb, device="cpu")

    # a single-slice volume made in Python, without any file behind it
    array = sitk.GetArrayFromImage(gray)[None].astype(np.int16)
    single = slicer.util.addVolumeFromArray(array, np.diag([-0.2, -0.2, 1.0, 1.0]), "single slice")
    from_single = new_segmentation()
    summary = LungSegLogic().process(single, from_single, device="cpu")
    assert summary.rightAreaMm2 is not None  # 0.2 mm is a real pixel size

    for a, b in zip(lung_masks(from_rgb, rgb_volume), lung_masks(from_single, single)):
        assert a.sum() > 0.03 * a.size
        np.testing.assert_array_equal(a, b)  # the luminance of equal channels is the gray image

    stack = slicer.util.addVolumeFromArray(np.repeat(array, 3, axis=0), name="three slices")
    with pytest.raises(ImageReadError, match="3 slices"):
        LungSegLogic().process(stack, new_segmentation(), device="cpu")


@pytest.mark.parametrize("model", ["unet", "prob_unet"])  # test-time augmentation, and prior samples
def test_uncertainty_map_on_the_input_grid(chest_nrrd, model):
    volume = slicer.modules.volumes.logic().AddArchetypeVolume(str(chest_nrrd), "chest", 4)
    uncertainty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    segmentation = new_segmentation()
    LungSegLogic().process(volume, segmentation, model=model, device="cpu", uncertaintyVolume=uncertainty)
    values = slicer.util.arrayFromVolume(uncertainty)
    assert values.shape == slicer.util.arrayFromVolume(volume).shape and values.dtype == np.float32
    np.testing.assert_allclose(ijk_to_ras(uncertainty), ijk_to_ras(volume))
    assert 0 <= values.min() and values.max() <= 1 and values.max() > 0.05
    right, left = lung_masks(segmentation, volume)
    lungs = right | left
    interior = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(lungs.astype(np.uint8)), [8, 8])) > 0
    edges = lungs & ~interior
    assert values[0][interior].mean() < values[0][edges].mean()  # the model doubts the borders, not the middle
    assert uncertainty.GetDisplayNode() is not None


def lung_columns(segmentation, volume):
    return [np.nonzero(mask)[1].mean() for mask in lung_masks(segmentation, volume)]


@pytest.fixture(scope="module")
def cli_labels(chest_dicom, tmp_path_factory):
    """The batch command's labelmap and results row for the CR: what the module must reproduce."""
    import csv

    out = tmp_path_factory.mktemp("cli")
    subprocess.run(
        [sys.executable, "-m", "lungseg", "segment", str(chest_dicom), "-o", str(out), "--device", "cpu"],
        check=True,
        capture_output=True,
    )
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{chest_dicom.stem}.nrrd")))
    with open(out / "results.csv", newline="") as f:
        row = next(csv.DictReader(f))
    return label.reshape(label.shape[-2:]), row


def test_monochrome1_through_the_dicom_module_is_not_inverted_twice(chest_dicom, cli_labels):
    """Slicer's DICOM module reads CR/DX with GDCM, which inverts MONOCHROME1 on load: LungSeg must not invert
    again. Its DCMTK fallback does not invert; a volume without a file behind it is judged by its intensities.
    Every route gives the batch command's segmentation."""
    import pydicom

    raw = pydicom.dcmread(str(chest_dicom)).pixel_array
    expected, _ = cli_labels

    gdcm = slicer_app.load_dicom_volume(chest_dicom)  # the DICOM module's default reader, database entry included
    loaded = slicer.util.arrayFromVolume(gdcm)[0].astype(np.float32)
    assert np.corrcoef(loaded.ravel()[::97], raw.ravel()[::97])[0, 1] < -0.99  # GDCM inverted it already
    segmentation = new_segmentation()
    summary = LungSegLogic().process(gdcm, segmentation, device="cpu")
    assert not summary.inverted and summary.qcReasons == []
    right, left = lung_masks(segmentation, gdcm)
    np.testing.assert_array_equal(right, expected == 1)
    np.testing.assert_array_equal(left, expected == 2)

    # the DCMTK fallback: the stored pixels, with the same database entry
    dcmtk = slicer.util.addVolumeFromArray(raw[None].astype(np.int16), np.diag([-1.0, -1.0, 1.0, 1.0]), "CR raw")
    dcmtk.SetAttribute("DICOM.instanceUIDs", gdcm.GetAttribute("DICOM.instanceUIDs"))
    summary = LungSegLogic().process(dcmtk, segmentation, device="cpu")
    assert summary.inverted and summary.inversionSource == "loaded without inverting DICOM MONOCHROME1"
    for mask, value in zip(lung_masks(segmentation, dcmtk), (1, 2)):
        assert dice(mask, expected == value) > 0.99

    # no file behind the volume: the orientation classifier sees that air is bright
    slicer.dicomDatabase = None
    summary = LungSegLogic().process(dcmtk, segmentation, device="cpu")
    assert not summary.inverted and summary.orientationCorrected == "inverted (from the pixels)"
    assert "Corrected before segmenting: inverted (from the pixels)" in summary.statusText()
    for mask, value in zip(lung_masks(segmentation, dcmtk), (1, 2)):
        assert dice(mask, expected == value) > 0.99
    assert summary.rightAreaMm2 is None  # no pixel spacing without the header


def cr_copy(chest_dicom, folder, name, **tags):
    """The CR with other header tags (None deletes one), saved under a new SOP instance UID."""
    import pydicom
    from pydicom.uid import generate_uid

    dataset = pydicom.dcmread(str(chest_dicom))
    for tag, value in tags.items():
        if value is None:
            if tag in dataset:
                delattr(dataset, tag)
        else:
            setattr(dataset, tag, value)
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    path = Path(folder) / name
    dataset.save_as(path)
    return path


def test_areas_in_mm2_use_the_dicom_spacing(chest_dicom, tmp_path):
    """GDCM gives a CR its ImagerPixelSpacing or 1.0 mm, never PixelSpacing: LungSeg takes the header's spacing, as
    the batch command does."""
    path = cr_copy(chest_dicom, tmp_path, "pixel-spacing.dcm", PixelSpacing=[0.15, 0.15], ImagerPixelSpacing=None)
    volume = slicer_app.load_dicom_volume(path)
    assert volume.GetSpacing()[:2] != (0.15, 0.15)  # what Slicer's reader makes of it
    summary = LungSegLogic().process(volume, new_segmentation(), device="cpu")
    assert summary.rightAreaMm2 == pytest.approx(summary.rightAreaPx * 0.15 * 0.15, abs=0.05)  # 0.1 mm² steps
    assert summary.leftAreaMm2 == pytest.approx(summary.leftAreaPx * 0.15 * 0.15, abs=0.05)
    assert 3_000 < summary.rightAreaMm2 < 40_000  # an adult lung field, not px counted as mm²


def test_same_answer_in_the_dicom_module_as_a_plain_file_and_in_the_batch(chest_dicom, tmp_path):
    """Right and left areas (px and mm²) within 1 % and the same QC: DICOM module (GDCM + database), Add Data of
    the file, and `lungseg segment`."""
    import csv

    path = cr_copy(chest_dicom, tmp_path, "cr.dcm", ImagerPixelSpacing=[0.143, 0.143])
    out = tmp_path / "cli"
    subprocess.run(
        [sys.executable, "-m", "lungseg", "segment", str(path), "-o", str(out), "--device", "cpu"],
        check=True,
        capture_output=True,
    )
    with open(out / "results.csv", newline="") as f:
        row = next(csv.DictReader(f))
    batch = {
        "rightAreaPx": float(row["right_area_px"]),
        "leftAreaPx": float(row["left_area_px"]),
        "rightAreaMm2": float(row["right_area_mm2"]),
        "leftAreaMm2": float(row["left_area_mm2"]),
    }
    batch_qc = [r for r in row["qc_reasons"].split("; ") if r]
    batch_quality = float(row["quality"])  # the predicted Dice (issue 12): the card has a fitted qc block

    through_dicom = LungSegLogic().process(slicer_app.load_dicom_volume(path), new_segmentation(), device="cpu")
    slicer.dicomDatabase = None
    as_file = LungSegLogic().process(slicer_app.load_volume_file(path), new_segmentation(), device="cpu")
    for summary in (through_dicom, as_file):
        for key, value in batch.items():
            assert getattr(summary, key) == pytest.approx(value, rel=0.01), key
        assert summary.qcReasons == batch_qc and not summary.inverted
        assert summary.quality == pytest.approx(batch_quality, abs=2e-3)
        assert f"predicted quality {batch_quality:.2f}" in summary.statusText()


def test_dicom_stored_mirrored_keeps_patient_sides(chest_dicom, cli_labels, tmp_path):
    """PatientOrientation ['R', 'F']: columns run toward the patient's right. The core's shared orientation step
    segments it in the standard view and labels the stored grid, so the right lung lands on the image's right."""
    import pydicom

    dataset = pydicom.dcmread(str(chest_dicom))
    path = cr_copy(
        chest_dicom,
        tmp_path,
        "mirrored.dcm",
        PatientOrientation=["R", "F"],
        PixelData=np.ascontiguousarray(dataset.pixel_array[:, ::-1]).tobytes(),
    )
    volume = slicer_app.load_dicom_volume(path)
    segmentation = new_segmentation()
    summary = LungSegLogic().process(volume, segmentation, device="cpu")
    expected, _ = cli_labels
    right, left = lung_masks(segmentation, volume)
    # the same lungs as the unmirrored file, mirrored, and still called by the patient's side
    assert dice(right, (expected == 1)[:, ::-1]) > 0.99 and dice(left, (expected == 2)[:, ::-1]) > 0.99
    right_column, left_column = lung_columns(segmentation, volume)
    assert left_column < right.shape[1] / 2 < right_column
    assert summary.qcReasons == []


def test_process_folder_reports_progress_and_failures(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for sample in sample_pngs()[:2]:
        shutil.copy(sample, inputs)
    (inputs / "broken.png").write_bytes(b"not a png")
    pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_pngs()[0])))  # only the patient's right half: flagged
    sitk.WriteImage(
        sitk.GetImageFromArray(np.ascontiguousarray(pixels[:, : pixels.shape[1] // 2])), str(inputs / "one lung.png")
    )
    batch = LungSegLogic().processFolder(inputs, tmp_path / "out", device="cpu", python=sys.executable)
    assert batch.wait(timeout=300) == 1  # one input failed, the others were segmented
    assert batch.ranToEnd()  # the core's own exit 1: results.csv written by this run
    done, total, failed, last = batch.progress()
    assert (done, total, failed) == (4, 4, 1)
    results = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(results) == 5 and sum(",ok," in row for row in results) == 3
    assert batch.toCheck == 1 and batch.flaggedInFolder() == (1, 3)  # the half radiograph, as results.csv says
    for sample in sample_pngs()[:2]:
        stem = sample.stem
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{stem}.nrrd")))
        assert set(np.unique(label)) == {0, 1, 2}
        assert (tmp_path / "out" / f"{stem}_overlay.png").is_file()


def test_process_folder_cancel_stops_the_child_and_leaves_whole_files(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(200):  # far more than run before the first progress line
        (inputs / f"chest{i:03d}.png").symlink_to(sample_pngs()[i % 3])
    batch = LungSegLogic().processFolder(inputs, tmp_path / "out", device="cpu", python=sys.executable)
    import time

    deadline = time.time() + 240
    while batch.progress()[0] < 1 and batch.running and time.time() < deadline:
        time.sleep(0.05)
    assert batch.progress()[0] >= 1, batch.log
    started = time.time()
    batch.cancel()
    assert time.time() - started < 0.5  # cancel never blocks the caller (the GUI)
    assert batch.wait(timeout=60) != 0
    assert not batch.running and batch.cancelled
    outputs = sorted((tmp_path / "out").glob("*.nrrd"))
    assert 1 <= len(outputs) < 200
    assert not list((tmp_path / "out").rglob("*.partial*"))  # no temporary file left behind
    for output in outputs:
        assert sitk.ReadImage(str(output)).GetSize()[:2] == (256, 256)


def test_process_folder_reads_the_childs_output_as_utf8_whatever_the_code_page(tmp_path, monkeypatch):
    """On Windows a child's pipe gets the ANSI code page unless PYTHONIOENCODING says otherwise; emulate such a
    code page in the startup environment and check that a non-ASCII path comes back intact."""
    inputs = tmp_path / "Röntgen-Übersicht"
    inputs.mkdir()
    shutil.copy(sample_pngs()[0], inputs / "Thorax-ä.png")
    startup = dict(slicer.util.startupEnvironment(), PYTHONIOENCODING="latin-1")
    monkeypatch.setattr(slicer.util, "startupEnvironment", lambda: dict(startup))
    batch = LungSegLogic().processFolder(inputs, tmp_path / "out", device="cpu", python=sys.executable)
    assert batch.wait(timeout=300) == 0
    assert batch.progress()[3] == str(inputs / "Thorax-ä.png")
    assert batch.environment["PYTHONIOENCODING"] == "utf-8"


def test_batch_never_starts_the_application_as_its_python(monkeypatch, tmp_path):
    """Inside Slicer sys.executable is the application: without PythonSlicer there is no fallback."""
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    with pytest.raises(RuntimeError, match="PythonSlicer executable not found"):
        LungSegLogic().processFolder(tmp_path, tmp_path / "out", device="cpu")
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: f"/opt/Slicer/bin/{name}")
    assert LungSegLogic().pythonExecutable() == "/opt/Slicer/bin/PythonSlicer"


def test_batch_process_parses_progress_lines(tmp_path):
    script = (
        "print('loading model', flush=True)\n"
        "print('lungseg-progress 1/4 ok /data/a.png', flush=True)\n"
        "print('lungseg: error: /data/b b.png: corrupt', flush=True)\n"
        "print('lungseg-progress 2/4 error /data/b b.png', flush=True)\n"
        "print('lungseg-progress 3/4 check /data/c.png', flush=True)\n"
        "print('lungseg-progress 4/4 skipped /data/DICOMDIR', flush=True)\n"
        "raise SystemExit(1)\n"
    )
    batch = BatchProcess([sys.executable, "-c", script], outputDir=tmp_path)
    assert batch.flaggedInFolder() is None  # no results.csv yet
    batch.start()
    assert batch.wait(timeout=60) == 1
    assert batch.progress() == (4, 4, 1, "/data/DICOMDIR") and batch.skipped == 1  # skipped is no failure
    assert batch.toCheck == 1  # segmented and flagged by QC: no failure either
    assert batch.log[0] == "loading model" and len(batch.log) == 6


def test_cancel_on_windows_runs_taskkill_without_a_console_window(monkeypatch):
    """Slicer is a GUI program, so a console program it starts opens a console window unless CREATE_NO_WINDOW
    (0x08000000, Windows' process creation flag; subprocess has the name only on Windows). Windows is emulated
    as BatchProcess checks it (os.name), and subprocess.run is replaced by a recorder that accepts only calls the
    real one takes."""
    import inspect
    import os

    calls = []

    def run(args, *, capture_output=False, **popenOptions):
        inspect.signature(subprocess.Popen).bind(args, **popenOptions)  # a TypeError, as the real one raises
        calls.append((args, capture_output, popenOptions))
        return subprocess.CompletedProcess(args, 0)

    batch = BatchProcess(["PythonSlicer", "-m", "lungseg"])
    batch._process = types.SimpleNamespace(pid=4242, poll=lambda: None)  # a running child
    monkeypatch.setattr(subprocess, "CREATE_NO_WINDOW", 0x08000000, raising=False)
    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(os, "killpg", lambda *args: pytest.fail("a POSIX kill on Windows"), raising=False)
    with monkeypatch.context() as windows:
        windows.setattr(os, "name", "nt")
        batch.cancel()
    ((args, captured, options),) = calls
    assert args == ["taskkill", "/F", "/T", "/PID", "4242"] and captured and batch.cancelled
    assert options.get("creationflags", 0) & 0x08000000, options


class Recorder:
    def __init__(self, result=None, error=None):
        self.calls, self.result, self.error = [], result, error

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.error is not None:
            raise self.error
        return self.result


def pip_ensure_signature(
    requirements,
    constraints=None,
    skip_packages=None,
    prompt_install=True,
    prompt_restart=True,
    requester=None,
    skip_in_testing=True,
    show_progress=True,
):
    """The parameters of `slicer.packaging.pip_ensure` (Base/Python/slicer/packaging.py:327-336, Slicer HEAD
    583e9b37, 5.12): a call the real one would refuse raises TypeError here too."""


def test_install_logic_installs_onnxruntime_only_and_pins_slicers_packages(monkeypatch):
    """What the first Apply hands to pip: only onnxruntime (and tqdm where absent), never torch or MONAI; Slicer's
    numpy, scipy, SimpleITK, pydicom and Pillow pinned in the constraints file; pip_ensure (5.12+) without
    skip_packages (it would mean --no-deps per package); before 5.12 one pip_install call. pip itself resolves these
    arguments in test_install.py::test_pip_resolves_onnxruntime_against_slicers_packages."""
    import inspect

    confirm = Recorder(True)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm, raising=False)
    assert install.InstallLogic().ensureDependencies() and not confirm.calls  # this venv has everything
    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)  # as if not imported yet (restored afterwards)
    assert install.REQUIREMENTS == ["onnxruntime>=1.19", "tqdm>=4.60"]

    versions = {
        "onnxruntime": None,
        "tqdm": "4.66.1",
        "torch": None,
        "monai": None,
        "numpy": "1.26.1",
        "scipy": "1.11.3",
        "SimpleITK": "2.3.1",
        "pydicom": "2.4.3",
        "Pillow": "10.1.0",
    }
    monkeypatch.setattr(install.InstallLogic, "_installedVersion", staticmethod(lambda name: versions[name]))
    assert install.InstallLogic().missingRequirements() == ["onnxruntime>=1.19"]  # torch and MONAI: not needed
    pins = ["numpy==1.26.1", "scipy==1.11.3", "SimpleITK==2.3.1", "pydicom==2.4.3", "Pillow==10.1.0"]

    def installs(result=None, error=None):
        """A pip_ensure stand-in that checks its call against the real signature and then 'installs'."""
        recorder = Recorder(result, error)

        def pip_ensure(*args, **kwargs):
            inspect.signature(pip_ensure_signature).bind(*args, **kwargs)
            recorder(*args, **kwargs)
            if error is None:
                versions["onnxruntime"] = "1.19.2"

        return recorder, pip_ensure

    ensure, pip_ensure = installs()
    monkeypatch.setitem(sys.modules, "slicer.packaging", types.SimpleNamespace(pip_ensure=pip_ensure))
    assert install.InstallLogic().ensureDependencies()
    assert len(confirm.calls) == 1 and "onnxruntime>=1.19" in confirm.calls[0][0][0]
    assert "torch" not in confirm.calls[0][0][0].lower()
    (requirements,), options = ensure.calls[0]
    assert [str(r) for r in requirements] == ["onnxruntime>=1.19"]
    assert "skip_packages" not in options and not options["prompt_install"]
    assert Path(options["constraints"]).read_text().split() == pins

    # before Slicer 5.12 (no slicer.packaging): one pip call, constraints first, never --no-deps
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    versions.update(onnxruntime=None, tqdm=None, SimpleITK="2.3.1rc1.post1-not-pep440!")  # an odd version: unpinned
    pip = Recorder()
    monkeypatch.setattr(
        slicer.util,
        "pip_install",
        lambda arguments: (pip(arguments), versions.update(onnxruntime="1.19.2", tqdm="4.67.1")),
    )
    assert install.InstallLogic().ensureDependencies()
    (arguments,), _ = pip.calls[0]
    assert len(pip.calls) == 1 and arguments[0] == "-c" and "--no-deps" not in arguments
    assert arguments[2:] == ["onnxruntime>=1.19", "tqdm>=4.60"]
    assert Path(arguments[1]).read_text().split() == [p for p in pins if not p.startswith("SimpleITK")]

    # a failed resolution (pip's CalledProcessError, in 5.12 after Slicer's own "installation failed" dialog): a
    # message that names what could not be installed, on which Python and system
    versions.update(onnxruntime=None)
    failing = Recorder(error=subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install"]))
    monkeypatch.setattr(slicer.util, "pip_install", failing)
    with pytest.raises(RuntimeError, match=r"could not install onnxruntime>=1\.19 into Slicer's Python 3\.") as error:
        install.InstallLogic().ensureDependencies()
    assert "Python console" in str(error.value) and len(failing.calls) == 1
    # pip_ensure that installed nothing (it skips in Slicer's testing mode): the same message, not an ImportError later
    nothing = Recorder()
    monkeypatch.setitem(sys.modules, "slicer.packaging", types.SimpleNamespace(pip_ensure=nothing))
    with pytest.raises(RuntimeError, match="could not install onnxruntime"):
        install.InstallLogic().ensureDependencies()

    # an onnxruntime that this session imported before pip upgraded it: restart first
    versions.update(onnxruntime="1.19.2")
    monkeypatch.setattr(install.InstallLogic, "missingRequirements", lambda self: [] if pip.calls else ["x"])
    monkeypatch.setitem(sys.modules, "onnxruntime", types.SimpleNamespace(__version__="1.17.0"))
    monkeypatch.setattr(install.InstallLogic, "installPackages", lambda self, requirements: pip.calls.append(1))
    pip.calls.clear()
    with pytest.raises(RuntimeError, match="restart Slicer"):
        install.InstallLogic().ensureDependencies()

    declined = Recorder(False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", declined)
    pip.calls.clear()
    assert not install.InstallLogic().ensureDependencies() and not pip.calls


def test_logic_segments_with_torch_and_monai_unimportable(tmp_path):
    """The Slicer module's logic on ONNX Runtime alone: in a child process where importing torch or MONAI raises
    ImportError (as in a Slicer without them), the logic segments a radiograph, with the uncertainty map of
    test-time augmentation and of prob_unet's samples, and never imports either."""
    script = f"""
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "monai"):
            raise ImportError(f"{{name}} is not installed (blocked by the test)")

sys.meta_path.insert(0, NoTorch())
for name in ("torch", "monai"):
    try:
        __import__(name)
        raise SystemExit(name + " is importable: the block does not work")
    except ImportError:
        pass
sys.path.insert(0, {str(Path(__file__).resolve().parent / "support")!r})
import slicer_app
slicer = slicer_app.start()
from LungSeg import LungSegLogic
from LungSegLib.InstallLogic import InstallLogic
from lungseg.samples import sample_pngs
assert InstallLogic().missingRequirements() == []
for model in ("unet", "prob_unet"):
    volume = slicer_app.load_volume(sample_pngs()[0])
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    uncertainty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    summary = LungSegLogic().process(volume, segmentation, model=model, device="cpu", uncertaintyVolume=uncertainty)
    assert summary.rightAreaPx > 5000 and summary.leftAreaPx > 5000, summary
    assert slicer.util.arrayFromVolume(uncertainty).max() > 0.05
    print(model, summary.rightAreaPx, summary.leftAreaPx, summary.quality)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "monai", "onnxruntime")))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-3].startswith("unet ") and lines[-2].startswith("prob_unet ")
    imported = eval(lines[-1])
    assert "onnxruntime" in imported and not [m for m in imported if not m.startswith("onnxruntime")]


def test_parameter_node_is_created_and_takes_none_and_either_volume_type():
    """Slicer's wrapper writes every default when it is made, and refuses None for a node Union without None:
    with the real wrapper (5.6-5.12) the panel's parameter node could not be created at all."""
    parameterNode = LungSegLogic().getParameterNode()
    assert (parameterNode.model, parameterNode.device, parameterNode.uncertainty) == ("unet", "auto", False)
    assert parameterNode.inputVolume is None and parameterNode.outputSegmentation is None
    vector = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVectorVolumeNode")
    parameterNode.inputVolume = vector
    assert LungSegLogic().getParameterNode().inputVolume is vector
    parameterNode.inputVolume = None
    assert parameterNode.inputVolume is None
    with pytest.raises(ValueError):
        parameterNode.device = "tpu"
    assert parameterNode.parameterNode is LungSegLogic().getParameterNode().parameterNode  # a singleton


def test_module_self_test_runs(monkeypatch):
    """LungSegTest.runTest(), which `Slicer --testing` runs, on slicer-core (loadVolume needs the application)."""
    monkeypatch.setattr(slicer.util, "loadVolume", lambda path, properties: slicer_app.load_volume(path))
    LungSeg.LungSegTest().runTest()
    segmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2


def test_module_self_test_reports_a_skip_without_its_packages(monkeypatch):
    import unittest

    monkeypatch.setattr(install.InstallLogic, "missingRequirements", lambda self: ["onnxruntime>=1.19"])
    with pytest.raises(unittest.SkipTest, match="onnxruntime"):
        LungSeg.LungSegTest().runTest()
