"""The LungSeg Slicer module's logic on real MRML nodes (slicer-core) made from real radiographs.

The module code runs unchanged; Testing/slicer_support provides only what slicer-core lacks (see slicer_app.py).
"""
from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("slicer_core", reason="slicer-core is not installed (scripts/setup.sh test installs it from "
                                          "Testing/requirements-slicer.txt)")
sys.path.insert(0, str(Path(__file__).resolve().parent / "slicer_support"))
import slicer_app  # noqa: E402

slicer = slicer_app.start()
import LungSeg  # noqa: E402  (not its TestCase by name: pytest would collect it)
from LungSeg import LungSegLogic  # noqa: E402
from LungSegLib import InstallLogic as install  # noqa: E402
from LungSegLib.BatchProcess import BatchProcess  # noqa: E402
from lungseg.samples import sample_pngs  # noqa: E402

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
    return [slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segments.GetSegmentIdBySegmentName(n),
                                                       volume)[0] > 0 for n in names]


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
    for segmentId, colour, code in (("RightLung", (0, 158, 115), "3341006"), ("LeftLung", (230, 159, 0), "44029006")):
        segment = segments.GetSegment(segmentId)
        np.testing.assert_allclose(segment.GetColor(), np.array(colour) / 255)
        terminology = segment.GetTerminology()
        assert f"SCT^123037004^Anatomical Structure~SCT^{code}^{segment.GetName()}" in terminology
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
    with pytest.raises(ValueError, match="3 slices"):
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


def dicom_volume(pixels):
    """A volume as Slicer's DICOM loader makes it from a single-frame CR: raw pixels, MONOCHROME1 not inverted."""
    volume = slicer.util.addVolumeFromArray(pixels[None].astype(np.int16), np.diag([-1.0, -1.0, 1.0, 1.0]), "CR")
    return volume


def lung_columns(segmentation, volume):
    return [np.nonzero(mask)[1].mean() for mask in lung_masks(segmentation, volume)]


def test_monochrome1_dicom(chest_dicom):
    import pydicom

    dataset = pydicom.dcmread(str(chest_dicom))
    assert dataset.PhotometricInterpretation == "MONOCHROME1"
    raw = dataset.pixel_array

    # no DICOM database: the intensities tell that air is bright
    volume = dicom_volume(raw)
    segmentation = new_segmentation()
    summary = LungSegLogic().process(volume, segmentation, device="cpu")
    assert summary.inverted and summary.inversionSource == "intensity statistics"
    right, left = lung_masks(segmentation, volume)
    assert right.mean() > 0.05 and left.mean() > 0.05
    right_column, left_column = lung_columns(segmentation, volume)
    assert right_column < raw.shape[1] / 2 < left_column  # patient's right lung on the image's left
    assert summary.rightAreaMm2 is None  # pixel spacing not meaningful without the header

    # loaded through the DICOM database: the header decides
    volume.SetAttribute("DICOM.instanceUIDs", str(dataset.SOPInstanceUID))
    slicer.dicomDatabase = types.SimpleNamespace(
        fileForInstance=lambda uid: str(chest_dicom) if uid == dataset.SOPInstanceUID else "")
    from_header = new_segmentation()
    summary = LungSegLogic().process(volume, from_header, device="cpu")
    assert summary.inverted and summary.inversionSource == "DICOM MONOCHROME1"
    for a, b in zip(lung_masks(from_header, volume), (right, left)):
        np.testing.assert_array_equal(a, b)

    # the same radiograph already inverted (as ITK reads it) is left alone
    slicer.dicomDatabase = None
    inverted = dicom_volume(raw.max() - raw)
    summary = LungSegLogic().process(inverted, new_segmentation(), device="cpu")
    assert not summary.inverted


def test_dicom_stored_mirrored_keeps_patient_sides(chest_dicom, tmp_path):
    """PatientOrientation ['R', 'F']: columns run toward the patient's right. The core's shared orientation step
    segments it in the standard view and labels the stored grid, so the right lung lands on the image's right."""
    import pydicom

    dataset = pydicom.dcmread(str(chest_dicom))
    dataset.PatientOrientation = ["R", "F"]
    dataset.PixelData = np.ascontiguousarray(dataset.pixel_array[:, ::-1]).tobytes()
    dataset.save_as(tmp_path / "mirrored.dcm")
    mirrored = dataset.pixel_array
    volume = dicom_volume(mirrored)
    volume.SetAttribute("DICOM.instanceUIDs", str(dataset.SOPInstanceUID))
    slicer.dicomDatabase = types.SimpleNamespace(fileForInstance=lambda uid: str(tmp_path / "mirrored.dcm"))
    try:
        segmentation = new_segmentation()
        LungSegLogic().process(volume, segmentation, device="cpu")
    finally:
        slicer.dicomDatabase = None
    right_column, left_column = lung_columns(segmentation, volume)
    assert left_column < mirrored.shape[1] / 2 < right_column


def test_process_folder_reports_progress_and_failures(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for sample in sample_pngs()[:2]:
        shutil.copy(sample, inputs)
    (inputs / "broken.png").write_bytes(b"not a png")
    batch = LungSegLogic().processFolder(inputs, tmp_path / "out", device="cpu", python=sys.executable)
    assert batch.wait(timeout=300) == 1  # one input failed, the others were segmented
    done, total, failed, last = batch.progress()
    assert (done, total, failed) == (3, 3, 1)
    results = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(results) == 4 and sum(",ok," in row for row in results) == 2
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


def test_batch_process_parses_progress_lines(tmp_path):
    script = ("print('loading model', flush=True)\n"
              "print('lungseg-progress 1/3 ok /data/a.png', flush=True)\n"
              "print('lungseg: error: /data/b b.png: corrupt', flush=True)\n"
              "print('lungseg-progress 2/3 error /data/b b.png', flush=True)\n"
              "print('lungseg-progress 3/3 ok /data/c.png', flush=True)\n"
              "raise SystemExit(1)\n")
    batch = BatchProcess([sys.executable, "-c", script], outputDir=tmp_path)
    batch.start()
    assert batch.wait(timeout=60) == 1
    assert batch.progress() == (3, 3, 1, "/data/c.png")
    assert batch.log[0] == "loading model" and len(batch.log) == 5


class Recorder:
    def __init__(self, result=None):
        self.calls, self.result = [], result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


def test_install_logic_installs_only_what_is_missing(monkeypatch):
    confirm = Recorder(True)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm, raising=False)
    assert install.InstallLogic().ensureDependencies() and not confirm.calls  # this venv has everything

    versions = {"torch": None, "monai": "1.3.0", "numpy": "1.26.4", "SimpleITK": "2.4.1"}
    real = install.InstallLogic._installedVersion
    monkeypatch.setattr(install.InstallLogic, "_installedVersion",
                        staticmethod(lambda name: versions[name] if name in versions else real(name)))
    assert install.InstallLogic().missingRequirements() == ["torch>=2.1", "monai>=1.4"]

    torch_logic = Recorder(object())
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(
        PyTorchUtilsLogic=lambda: types.SimpleNamespace(installTorch=torch_logic)))
    ensure = Recorder()
    monkeypatch.setitem(sys.modules, "slicer.packaging", types.SimpleNamespace(pip_ensure=ensure))
    assert install.InstallLogic().ensureDependencies()
    assert len(confirm.calls) == 1 and "torch>=2.1" in confirm.calls[0][0][0]
    assert torch_logic.calls == [((), {"askConfirmation": False, "torchVersionRequirement": ">=2.1"})]
    (requirements,), options = ensure.calls[0]
    assert [str(r) for r in requirements] == ["monai>=1.4"]
    assert set(options["skip_packages"]) == {"numpy", "SimpleITK", "torch"} and not options["prompt_install"]
    assert Path(options["constraints"]).read_text().split() == ["numpy==1.26.4", "SimpleITK==2.4.1"]

    # before Slicer 5.12 (no slicer.packaging): monai without its torch dependency, the rest pinned
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    versions["scipy"] = None
    pip = Recorder()
    monkeypatch.setattr(slicer.util, "pip_install", pip)
    assert install.InstallLogic().ensureDependencies()
    assert pip.calls[0][0][0] == ["--no-deps", "monai>=1.4"]
    assert pip.calls[1][0][0][0] == "-c" and pip.calls[1][0][0][2:] == ["scipy>=1.10"]

    declined = Recorder(False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", declined)
    pip.calls.clear()
    assert not install.InstallLogic().ensureDependencies() and not pip.calls


def test_parameter_node_defaults_and_choices():
    parameterNode = LungSegLogic().getParameterNode()
    assert (parameterNode.model, parameterNode.device, parameterNode.uncertainty) == ("unet", "auto", False)
    assert parameterNode.inputVolume is None and parameterNode.outputSegmentation is None
    with pytest.raises(ValueError):
        parameterNode.device = "tpu"
    assert parameterNode.parameterNode is LungSegLogic().getParameterNode().parameterNode  # a singleton


def test_module_self_test_runs(monkeypatch):
    """LungSegTest.runTest(), which `Slicer --testing` runs, on slicer-core (loadVolume needs the application)."""
    monkeypatch.setattr(slicer.util, "loadVolume", lambda path, properties: slicer_app.load_volume(path))
    LungSeg.LungSegTest().runTest()
    segmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2
