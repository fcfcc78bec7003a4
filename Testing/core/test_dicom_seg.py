"""DICOM-SEG output (issue 13): `lungseg segment --format dicom-seg`, verified by reading the SEG back.

One batch writes SEGs for the real chest CR of pydicom-data (RG1_UNCR), its JPEG 2000 copies (RG1_J2KR lossless,
RG1_J2KI lossy), a DX stored mirrored (PatientOrientation R/F, ImagerPixelSpacing) and a DX with an Image Plane
module (orientation, position, frame of reference), plus a PNG that must fail alone. A second batch writes LungSeg's
own NRRD labelmaps of the same DICOM files: highdicom's reader must give the same masks, pixel for pixel.
"""

from __future__ import annotations

import copy
import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import importorskip, pydicom_data_file, require_or_skip

from lungseg.definitions import LEFT_LUNG, LUNG_CATEGORY, LUNG_LATERALITY, LUNG_SEGMENT_NAMES, LUNG_TYPE, RIGHT_LUNG
from lungseg.samples import sample_pngs

hd = importorskip("highdicom")

CR_FILES = {"rg1_uncr.dcm": "RG1_UNCR.dcm", "rg1_j2kr.dcm": "RG1_J2KR.dcm", "rg1_j2ki.dcm": "RG1_J2KI.dcm"}
DX_SPACING = [0.15, 0.16]  # (row, column) mm


def run_cli(*args):
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "lungseg", *map(str, args)], capture_output=True, text=True, env=env, timeout=900
    )


def rows_of(out):
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        return {os.path.basename(r["input"]): r for r in csv.DictReader(f)}


def dx_copy(source, path, mirrored=False, oriented=False):
    """The real CR as a DX (For Presentation) with its own SOP instance: stored mirrored (columns run toward the
    patient's right, PatientOrientation R/F), or with an Image Plane module (orientation, position, frame of
    reference, PixelSpacing) as DX may carry."""
    ds = pydicom.dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "DX"
    del ds.PixelSpacing  # RG1's "0.000"
    ds.ImagerPixelSpacing = DX_SPACING
    if mirrored:
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
        ds.PatientOrientation = ["R", "F"]
    if oriented:
        ds.PixelSpacing = DX_SPACING
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # rows toward the patient's left, columns toward the feet
        ds.ImagePositionPatient = [-150.0, 0.0, 140.0]
        ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """(inputs folder, SEG output folder, NRRD output folder, the two CLI results)."""
    root = tmp_path_factory.mktemp("dicom_seg")
    inputs = root / "in"
    inputs.mkdir()
    for name, testfile in CR_FILES.items():
        os.symlink(pydicom_data_file(testfile), inputs / name)
    dx_copy(pydicom_data_file("RG1_UNCR.dcm"), inputs / "mirrored_dx.dcm", mirrored=True)
    dx_copy(pydicom_data_file("RG1_UNCR.dcm"), inputs / "oriented_dx.dcm", oriented=True)
    dicoms = sorted(inputs.iterdir())
    shutil.copy(sample_pngs()[0], inputs / "chest.png")
    seg_result = run_cli("segment", inputs, "-o", root / "seg", "--format", "dicom-seg")
    nrrd_result = run_cli("segment", *dicoms, "-o", root / "nrrd")
    assert nrrd_result.returncode == 0, nrrd_result.stderr
    return inputs, root / "seg", root / "nrrd", seg_result


DICOM_INPUTS = [*CR_FILES, "mirrored_dx.dcm", "oriented_dx.dcm"]


def seg_path(batches, name):
    row = rows_of(batches[1])[name]
    assert row["status"] == "ok", row["error"]
    assert row["output"].endswith(".seg.dcm")
    return row["output"]


def nrrd_label(batches, name):
    return sitk.GetArrayFromImage(sitk.ReadImage(rows_of(batches[2])[name]["output"])).squeeze()


def lung_masks(seg_file, source_uid):
    """{label value: mask} of the "Right lung" and "Left lung" segments for the source instance, found by label."""
    seg = hd.seg.segread(seg_file)
    numbers = {value: seg.get_segment_numbers(segment_label=name) for value, name in LUNG_SEGMENT_NAMES.items()}
    assert all(len(n) == 1 for n in numbers.values()), numbers
    pixels = seg.get_pixels_by_source_instance(
        [source_uid], segment_numbers=[numbers[RIGHT_LUNG][0], numbers[LEFT_LUNG][0]]
    )
    assert pixels.shape[0] == 1 and pixels.shape[-1] == 2
    return {RIGHT_LUNG: pixels[0, ..., 0].astype(bool), LEFT_LUNG: pixels[0, ..., 1].astype(bool)}


@pytest.mark.parametrize("name", DICOM_INPUTS)
def test_seg_masks_equal_the_nrrd_labelmap_pixel_for_pixel(batches, name):
    source = pydicom.dcmread(batches[0] / name, stop_before_pixels=True)
    masks = lung_masks(seg_path(batches, name), source.SOPInstanceUID)
    label = nrrd_label(batches, name)
    assert label.shape == (source.Rows, source.Columns)
    for value, mask in masks.items():
        assert mask.shape == label.shape
        assert mask.sum() > 0.05 * mask.size, "a real lung, so that equality is not two empty masks"
        assert np.array_equal(mask, label == value), (name, LUNG_SEGMENT_NAMES[value])


def _code(item):
    return item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning


@pytest.mark.parametrize("name", DICOM_INPUTS)
def test_seg_references_its_source_and_names_the_algorithm(batches, name):
    source = pydicom.dcmread(batches[0] / name, stop_before_pixels=True)
    seg = pydicom.dcmread(seg_path(batches, name))
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage and seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID, "the SEG belongs to the source's study"
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID and seg.SOPInstanceUID != source.SOPInstanceUID
    assert seg.PatientID == source.PatientID and seg.PatientName == source.PatientName
    assert seg.ContentQualification == "RESEARCH"

    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in series.ReferencedInstanceSequence] == [
        (source.SOPClassUID, source.SOPInstanceUID)
    ]
    assert [r.ReferencedSOPInstanceUID for r in seg.SourceImageSequence] == [source.SOPInstanceUID]
    frames = seg.PerFrameFunctionalGroupsSequence
    assert int(seg.NumberOfFrames) == len(frames) == 2
    for frame in frames:
        (derivation,) = frame.DerivationImageSequence
        (reference,) = derivation.SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert sorted(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber for f in frames) == [1, 2]

    shared = seg.SharedFunctionalGroupsSequence[0]
    if "FrameOfReferenceUID" in source:
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [
            float(v) for v in source.ImageOrientationPatient
        ]
    else:
        assert "FrameOfReferenceUID" not in seg, "a CR without a frame of reference must not get an invented one"
    if name in CR_FILES:  # PixelSpacing "0.000": unknown, so not copied
        assert "PixelMeasuresSequence" not in shared
    else:
        assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == DX_SPACING

    for segment in seg.SegmentSequence:
        value = RIGHT_LUNG if segment.SegmentLabel == "Right lung" else LEFT_LUNG
        assert segment.SegmentLabel == LUNG_SEGMENT_NAMES[value]
        assert _code(segment.SegmentedPropertyCategoryCodeSequence[0]) == LUNG_CATEGORY
        assert _code(segment.SegmentedPropertyTypeCodeSequence[0]) == LUNG_TYPE
        assert _code(segment.SegmentedPropertyTypeModifierCodeSequence[0]) == LUNG_LATERALITY[value]
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        row = rows_of(batches[1])[name]
        assert algorithm.AlgorithmName == row["model"] == "unet"
        assert algorithm.AlgorithmVersion == row["model_version"] != ""
        assert f"lung_definition={row['definition']}" in algorithm.AlgorithmParameters
        assert row["definition"] in segment.SegmentDescription


def test_mirrored_dx_keeps_the_patients_right_lung_as_right_lung(batches):
    """The mirrored DX stores the patient's right on the image's right; its "Right lung" must be there too, and be
    the normal CR's "Right lung" mirrored."""

    def masks(name):
        uid = pydicom.dcmread(batches[0] / name, stop_before_pixels=True).SOPInstanceUID
        return lung_masks(seg_path(batches, name), uid)

    normal, mirrored = masks("rg1_uncr.dcm"), masks("mirrored_dx.dcm")
    width = normal[RIGHT_LUNG].shape[1]
    assert np.nonzero(normal[RIGHT_LUNG])[1].mean() < width / 2 < np.nonzero(normal[LEFT_LUNG])[1].mean()
    assert np.nonzero(mirrored[LEFT_LUNG])[1].mean() < width / 2 < np.nonzero(mirrored[RIGHT_LUNG])[1].mean()
    for value in (RIGHT_LUNG, LEFT_LUNG):
        assert (mirrored[value] == normal[value][:, ::-1]).mean() > 0.995
    assert rows_of(batches[1])["mirrored_dx.dcm"]["orientation_corrected"] == "mirrored"


def test_a_non_dicom_input_fails_alone(batches):
    result = batches[3]
    assert result.returncode == 1, result.stderr
    rows = rows_of(batches[1])
    assert rows["chest.png"]["status"] == "error"
    assert "is not a DICOM file" in rows["chest.png"]["error"] and "dicom-seg" in rows["chest.png"]["error"]
    assert "chest.png" in result.stderr and "Traceback" not in result.stderr
    assert all(rows[name]["status"] == "ok" for name in DICOM_INPUTS)
    assert f"{len(DICOM_INPUTS)} of {len(DICOM_INPUTS) + 1} segmented, 1 failed" in result.stdout
    assert not [p for p in batches[1].rglob("*") if "partial" in p.name]


def dcmqi_tool():
    importorskip("dcmqi")
    tool = shutil.which(
        "segimage2itkimage", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    )
    if tool is None:
        require_or_skip("dcmqi's segimage2itkimage is not on the PATH")
    return tool


def test_dcmqi_reads_the_seg_of_an_oriented_source_back_to_the_same_labelmap(batches, tmp_path):
    tool = dcmqi_tool()
    result = subprocess.run(
        [
            tool,
            "--inputDICOM",
            seg_path(batches, "oriented_dx.dcm"),
            "--outputDirectory",
            str(tmp_path),
            "--outputType",
            "nrrd",
            "--mergeSegments",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (merged,) = tmp_path.glob("*.nrrd")
    image = sitk.ReadImage(str(merged))
    values = sitk.GetArrayFromImage(image).squeeze()
    label = nrrd_label(batches, "oriented_dx.dcm")
    # dcmqi numbers the merged labels by segment number: 1 "Right lung", 2 "Left lung", as LungSeg's labels
    assert np.array_equal(values, label)
    assert image.GetSpacing()[:2] == pytest.approx(DX_SPACING[::-1])  # ITK: (column, row)
    reference = sitk.ReadImage(rows_of(batches[2])["oriented_dx.dcm"]["output"])
    assert image.GetOrigin() == pytest.approx(reference.GetOrigin(), abs=1e-3)


def test_dcmqi_cannot_read_a_seg_whose_source_has_no_orientation(batches, tmp_path):
    """The limitation the README states: a CR (no Image Plane module) gives a SEG without plane orientation, which
    dcmqi, and so Slicer's QuantitativeReporting, refuses; highdicom reads it (the tests above)."""
    tool = dcmqi_tool()
    result = subprocess.run(
        [
            tool,
            "--inputDICOM",
            seg_path(batches, "rg1_uncr.dcm"),
            "--outputDirectory",
            str(tmp_path),
            "--outputType",
            "nrrd",
            "--mergeSegments",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "Plane Orientation (Patient) is missing" in result.stdout + result.stderr


def test_writer_drops_an_unknown_spacing_without_touching_the_callers_header():
    from lungseg.io.dicomseg import build_dicom_seg

    source = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    before = copy.deepcopy(source)
    label = np.zeros((source.Rows, source.Columns), np.uint8)
    label[400:1400, 200:800], label[400:1400, 1000:1600] = RIGHT_LUNG, LEFT_LUNG
    seg = build_dicom_seg(label, source, "unet", "1.0", "lung-fields")
    assert source == before and "PixelSpacing" in source
    assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]
    with pytest.raises(ValueError, match="not on the source grid"):
        build_dicom_seg(label[:-1], source, "unet", "1.0", "lung-fields")
