"""DICOM inputs as archives hand them over (issue 13): compressed transfer syntaxes, PACS/CD exports with files
without an extension and a DICOMDIR, and non-image objects (reports, presentation states, segmentations) beside the
images, which are skipped with a note instead of failing."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import importorskip, pydicom_data_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    generate_uid,
)

from lungseg.io.files import list_inputs
from lungseg.io.radiograph import ImageReadError, NotAnImageError, non_image_object, read_radiograph


def jpeg_lossless_copy(source, path):
    """The CR with its pixels in JPEG Lossless, Process 14 SV1 (1.2.840.10008.1.2.4.70), encoded by GDCM."""
    ds = pydicom.dcmread(source)
    encoded = path.with_name("gdcm_jpeg.dcm")
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(encoded))
    writer.SetImageIO("GDCMImageIO")
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    writer.Execute(sitk.GetImageFromArray(ds.pixel_array))
    jpeg = pydicom.dcmread(encoded)
    assert jpeg.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    ds.file_meta.TransferSyntaxUID = jpeg.file_meta.TransferSyntaxUID
    ds.PixelData = jpeg.PixelData
    ds["PixelData"].VR = "OB"
    ds.BitsStored, ds.HighBit = jpeg.BitsStored, jpeg.HighBit  # GDCM encodes 16-bit samples
    ds.save_as(path)
    return path


def pydicom_compressed_copy(source, path, syntax):
    ds = pydicom.dcmread(source)
    ds.compress(syntax)
    ds.save_as(path)
    return path


@pytest.mark.parametrize("kind", ["J2KR", "J2KI", "JPEG lossless", "JPEG-LS lossless"])
def test_compressed_dicom_reads_like_the_uncompressed_file(tmp_path, kind):
    reference = read_radiograph(pydicom_data_file("RG1_UNCR.dcm"))
    if kind in ("J2KR", "J2KI"):
        path = pydicom_data_file(f"RG1_{kind}.dcm")
    elif kind == "JPEG lossless":
        path = jpeg_lossless_copy(pydicom_data_file("RG1_UNCR.dcm"), tmp_path / "jpeg_lossless.dcm")
    else:
        importorskip("jpeg_ls", reason="pyjpegls (a highdicom dependency) encodes JPEG-LS")
        path = pydicom_compressed_copy(
            pydicom_data_file("RG1_UNCR.dcm"), tmp_path / "c.dcm", pydicom.uid.JPEGLSLossless
        )
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax.is_compressed, syntax
    image = read_radiograph(path)
    assert image.shape == reference.shape and image.photometric == "MONOCHROME1"
    difference = image.pixels - reference.pixels
    if kind == "J2KI":  # lossy: close, not equal
        assert np.corrcoef(image.pixels.ravel()[::31], reference.pixels.ravel()[::31])[0, 1] > 0.999
    else:  # lossless: the same pixels (up to the constant of the MONOCHROME1 inversion, which follows BitsStored)
        assert difference.min() == difference.max(), kind
        if kind != "JPEG lossless":
            assert difference.max() == 0


def dataset(sop_class, modality, study):
    """A minimal non-image object of `study`'s patient and study, as an archive would hold it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    for key in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        setattr(ds, key, study.get(key, ""))
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber, ds.Modality = generate_uid(), 99, 1, modality
    ds.ContentDate, ds.ContentTime = "20240101", "120000"
    return ds


def code(value, scheme, meaning):
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def report(study):
    sr = dataset(BasicTextSRStorage, "SR", study)
    sr.ValueType, sr.ContinuityOfContent, sr.CompletionFlag, sr.VerificationFlag = (
        "CONTAINER",
        "SEPARATE",
        "COMPLETE",
        "UNVERIFIED",
    )
    sr.ConceptNameCodeSequence = [code("18748-4", "LN", "Diagnostic imaging report")]
    text = Dataset()
    text.RelationshipType, text.ValueType, text.TextValue = "CONTAINS", "TEXT", "Lungs clear."
    text.ConceptNameCodeSequence = [code("121071", "DCM", "Finding")]
    sr.ContentSequence = [text]
    return sr


def presentation_state(study):
    pr = dataset(GrayscaleSoftcopyPresentationStateStorage, "PR", study)
    pr.PresentationCreationDate, pr.PresentationCreationTime = "20240101", "120000"
    pr.ContentLabel, pr.ContentDescription, pr.ContentCreatorName = "DISPLAY", "window", ""
    image = Dataset()
    image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = study.SOPClassUID, study.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID, series.ReferencedImageSequence = study.SeriesInstanceUID, [image]
    pr.ReferencedSeriesSequence = [series]
    return pr


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A CD/PACS export: DICOMDIR and extensionless files (the CR, a report, a presentation state) written by
    pydicom's FileSet, plus a nested `.dcm` (the JPEG 2000 CR), an earlier LungSeg SEG, and non-DICOM files."""
    from pydicom.fileset import FileSet

    importorskip("highdicom")  # for the SEG object
    from lungseg.io.dicomseg import build_dicom_seg

    root = tmp_path_factory.mktemp("export") / "export"
    cr = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"))
    fileset = FileSet()
    for ds in (cr, report(cr), presentation_state(cr)):
        fileset.add(ds)
    fileset.write(root)
    nested = root / "more" / "deeper"
    nested.mkdir(parents=True)
    os.symlink(pydicom_data_file("RG1_J2KR.dcm"), nested / "chest j2k.dcm")
    label = np.zeros((cr.Rows, cr.Columns), np.uint8)
    label[400:1400, 200:800], label[400:1400, 1000:1600] = 1, 2
    build_dicom_seg(label, cr, "unet", "1.0", "lung-fields").save_as(nested / "earlier.seg.dcm")
    (root / "README.TXT").write_text("exported by a PACS\n")
    (root / "NOTES").write_text("no DICM preamble here\n")
    return root


def test_export_finds_extensionless_dicom_recursively(export):
    found = {p.relative_to(export).as_posix() for p in list_inputs([export], recursive=True)}
    assert found == {
        "DICOMDIR",
        "PT000000/ST000000/SE000000/IM000000",
        "PT000000/ST000000/SE000001/SR000000",
        "PT000000/ST000000/SE000002/PR000000",
        "more/deeper/chest j2k.dcm",
        "more/deeper/earlier.seg.dcm",
    }
    assert {p.name for p in list_inputs([export])} == {"DICOMDIR"}, "without --recursive only the top folder"


def test_non_image_objects_are_named_by_their_sop_class(export):
    kinds = {}
    for path in list_inputs([export], recursive=True):
        kinds[path.name] = non_image_object(pydicom.dcmread(path, stop_before_pixels=True, force=True))
    assert kinds == {
        "DICOMDIR": "Media Storage Directory Storage",
        "IM000000": None,
        "SR000000": "Basic Text SR Storage",
        "PR000000": "Grayscale Softcopy Presentation State Storage",
        "chest j2k.dcm": None,
        "earlier.seg.dcm": "Segmentation Storage",
    }
    with pytest.raises(NotAnImageError, match="not an image: a DICOM Basic Text SR Storage object"):
        read_radiograph(export / "PT000000" / "ST000000" / "SE000001" / "SR000000")
    assert issubclass(NotAnImageError, ImageReadError)


def test_non_image_objects_are_skipped_also_when_writing_dicom_seg(export):
    """With --format dicom-seg, the source check comes first; a DICOMDIR (which has no study to reference) must
    still be a skipped non-image, not an error."""
    from lungseg.batch.reader import read_input

    paths = [export / "DICOMDIR", export / "PT000000" / "ST000000" / "SE000001" / "SR000000"]
    for path in paths:
        item = read_input(path, 256, False, dicom_seg=True)
        assert item.get("status") == "skipped" and item["error"].startswith("not an image: a DICOM "), item


@pytest.mark.slow
def test_batch_over_an_export_skips_non_images_with_a_note(export, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "lungseg", "segment", str(export), "--recursive", "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr  # skipped objects are not failures
    assert "2 of 2 segmented, 0 failed, 4 non-image DICOM objects skipped" in result.stdout
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = {os.path.basename(r["input"]): r for r in csv.DictReader(f)}
    assert set(rows) == {"DICOMDIR", "IM000000", "SR000000", "PR000000", "chest j2k.dcm", "earlier.seg.dcm"}
    for name, kind in (
        ("DICOMDIR", "Media Storage Directory Storage"),
        ("SR000000", "Basic Text SR Storage"),
        ("PR000000", "Grayscale Softcopy Presentation State Storage"),
        ("earlier.seg.dcm", "Segmentation Storage"),
    ):
        assert rows[name]["status"] == "skipped", rows[name]
        assert rows[name]["error"] == f"not an image: a DICOM {kind} object"
        assert name not in result.stderr, "a skip is a note in results.csv, not an error message"
    for name in ("IM000000", "chest j2k.dcm"):
        assert rows[name]["status"] == "ok", rows[name]["error"]
        label = sitk.GetArrayFromImage(sitk.ReadImage(rows[name]["output"])).squeeze()
        assert label.shape == (1955, 1841) and set(np.unique(label)) == {0, 1, 2}
