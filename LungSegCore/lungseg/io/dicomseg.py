"""DICOM Segmentation (DICOM-SEG) output, written with highdicom: `lungseg segment --format dicom-seg`.

One SEG instance per DICOM input, in the source's study, in a new series. It references the source image (the
Referenced Series and Source Image sequences, and a Derivation Image reference in each frame), shares the source's
Frame of Reference where it has one, and has two segments, "Right lung" and "Left lung", coded as the Slicer module
codes them (`definitions.LUNG_CATEGORY`, `LUNG_TYPE`, `LUNG_LATERALITY`). The segments follow the patient's side: the
labelmap is on the stored pixel grid, so a mirrored image (PatientOrientation R/F) keeps its patient's right lung in
"Right lung".

Type BINARY: LungSeg's result is a cleaned labelmap (argmax, one component per lung, holes filled), and a binary SEG
holds exactly that, pixel for pixel. FRACTIONAL would store the raw probabilities before the clean-up, so it would no
longer be the segmentation the rest of LungSeg reports (areas, QC, NRRD), and many viewers show it thresholded or
not at all.

Two traps of 2D projection radiographs (CR, most DX) are handled here:
- they have no Image Plane module, so their spacing is ImagerPixelSpacing (or a PixelSpacing), which highdicom does not
  carry into the SEG by itself; the writer passes `pixel_measures`, without which highdicom's own reader refuses the
  SEG. A spacing that is not above zero ("0.000") is unknown and is left out rather than copied.
- without patient orientation, the SEG has no plane position or orientation either; readers that place frames in
  patient space (dcmqi, the converter of Slicer's QuantitativeReporting) cannot read such a SEG, while readers that
  match frames to the source by its SOP instance (highdicom, OHIF-style viewers) can.
"""

from __future__ import annotations

import copy
import datetime
from pathlib import Path

import numpy as np

from ..definitions import (
    DEFINITIONS,
    LEFT_LUNG,
    LUNG_CATEGORY,
    LUNG_LATERALITY,
    LUNG_SEGMENT_NAMES,
    LUNG_TYPE,
    RIGHT_LUNG,
)
from ..errors import LungSegError
from .files import atomic_path, is_dicom
from .radiograph import ImageReadError, dicom_pixel_spacing, image_dicom_header

SERIES_NUMBER = 9901  # a new series in the source's study; high, so that it sorts after the acquired series
# A projection radiograph has no slice, but highdicom's and dcmqi's readers need a Slice Thickness beside the spacing:
# a nominal 1 mm where the source states none.
NOMINAL_THICKNESS_MM = 1.0
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def require_highdicom() -> None:
    """LungSegError, before any work, where highdicom is not installed."""
    import importlib.util

    if importlib.util.find_spec("highdicom") is None:
        raise LungSegError(
            "--format dicom-seg needs the Python package highdicom (Python 3.10 or newer); install "
            "it with: pip install 'lungseg[dicom-seg]'"
        )


def check_source(path: Path | str) -> None:
    """ImageReadError unless `path` is a DICOM file whose header has what a SEG must reference (header only);
    NotAnImageError for a DICOM object without an image (a DICOMDIR has no study), which a batch skips."""
    path = Path(path)
    if not is_dicom(path):
        raise ImageReadError(
            path,
            "is not a DICOM file; --format dicom-seg writes a DICOM Segmentation, which must "
            "reference a DICOM source image (use nrrd, nii.gz, mha or png for other inputs)",
        )
    ds = image_dicom_header(path)
    missing = [k for k in REQUIRED_UIDS if not ds.get(k)]
    if missing:
        raise ImageReadError(path, f"lacks {', '.join(missing)}, which a DICOM Segmentation must reference")


def _coded(term: tuple[str, str, str]):
    from highdicom.sr import CodedConcept

    scheme, value, meaning = term
    return CodedConcept(value, scheme, meaning)


def segment_descriptions(model: str, version: str, definition: str) -> list:
    """The two segments, "Right lung" (1) and "Left lung" (2), with the algorithm that made them."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from ..batch.overlay import LABEL_COLOURS

    algorithm = hd.AlgorithmIdentificationSequence(
        name=model,
        version=version or "unversioned",
        family=codes.cid7162.ArtificialIntelligence,
        source="LungSeg",
        parameters={"lung_definition": definition},
    )
    descriptions = []
    for number, value in enumerate((RIGHT_LUNG, LEFT_LUNG), start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=LUNG_SEGMENT_NAMES[value],
            segmented_property_category=_coded(LUNG_CATEGORY),
            segmented_property_type=_coded(LUNG_TYPE),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*LABEL_COLOURS[value]),
        )
        description.SegmentedPropertyTypeModifierCodeSequence = [_coded(LUNG_LATERALITY[value])]
        description.SegmentDescription = f"{LUNG_SEGMENT_NAMES[value]}, {definition} definition"[:64]
        descriptions.append(description)
    return descriptions


def slice_thickness(source) -> float:
    """The source's SliceThickness when above zero, else the nominal 1 mm."""
    try:
        thickness = float(source.get("SliceThickness") or 0)
    except (TypeError, ValueError):
        thickness = 0.0
    return thickness if thickness > 0 else NOMINAL_THICKNESS_MM


def _source_for_highdicom(ds, thickness: float):
    """The source header as highdicom should see it, changed in a copy only: a PixelSpacing that is not above zero
    (RG1_UNCR's "0.000") means unknown and is dropped instead of being copied into the SEG; a source in patient
    space (with ImageOrientationPatient) gets the Slice Thickness that `pixel_measures` states, since highdicom reads
    one from such a source."""
    try:
        drop_spacing = not all(float(v) > 0 for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        drop_spacing = "PixelSpacing" in ds
    add_thickness = "ImageOrientationPatient" in ds and "SliceThickness" not in ds
    if drop_spacing or add_thickness:
        ds = copy.deepcopy(ds)  # Dataset.copy() is shallow: deleting from it would edit the caller's header
        if drop_spacing:
            del ds.PixelSpacing
        if add_thickness:
            ds.SliceThickness = thickness
    return ds


def build_dicom_seg(label: np.ndarray, source, model: str, version: str, definition: str):
    """A highdicom Segmentation of `label` ((rows, columns), 0 background, 1 right lung, 2 left lung, on the source's
    stored pixel grid) that references the pydicom dataset `source` (its header is enough)."""
    import highdicom as hd

    from .. import __version__

    if label.shape != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"labelmap {label.shape} is not on the source grid ({source.Rows}, {source.Columns})")
    spacing = dicom_pixel_spacing(source)  # PixelSpacing, else ImagerPixelSpacing, when above zero
    thickness = slice_thickness(source)
    pixel_measures = (
        None if spacing is None else hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=thickness)
    )
    masks = np.stack([label == RIGHT_LUNG, label == LEFT_LUNG], axis=-1)[None]  # (frame, rows, columns, segment)
    now = datetime.datetime.now()
    seg = hd.seg.Segmentation(
        source_images=[_source_for_highdicom(source, thickness)],
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(model, version, definition),
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="LungSeg",
        manufacturer_model_name=model,
        software_versions=f"lungseg {__version__}",
        device_serial_number="0",  # software: it has no serial number, and highdicom requires one
        pixel_measures=pixel_measures,
        omit_empty_frames=False,  # a lung that was not found stays an empty segment
        content_label="LUNGS",
        content_description=f"Right and left lung ({DEFINITIONS[definition].title})"[:64]
        if definition in DEFINITIONS
        else "Right and left lung",
        series_description=f"LungSeg lungs ({model}, {definition})"[:64],
        content_qualification="RESEARCH",
        series_date=now.date(),
        series_time=now.time(),
        content_date=now.date(),
        content_time=now.time(),
    )
    # Type 2 attributes (present, possibly empty) that highdicom leaves out when it has no value; DCMTK-based readers
    # (dcmqi) warn about them.
    if "ContentCreatorName" not in seg:
        seg.ContentCreatorName = ""
    if "FrameOfReferenceUID" in seg and "PositionReferenceIndicator" not in seg:
        seg.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
    return seg


def write_dicom_seg(
    label: np.ndarray, source: Path | str, path: Path | str, model: str, version: str, definition: str
) -> None:
    """Write the SEG of `label` for the DICOM file `source` to `path`, atomically (a temporary name, then a rename)."""
    import pydicom

    ds = pydicom.dcmread(str(source), stop_before_pixels=True, force=True)
    seg = build_dicom_seg(label, ds, model, version, definition)
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
