"""The computation of the LungSeg module; it needs no GUI.

`process` segments a radiograph volume into a "Right lung" and a "Left lung" segment: `readInput` turns the volume
into the core's radiograph (`lungseg.io.radiograph.radiograph_from_array`, the same checks and gray conversion as
the batch command), `compute` runs the model and `writeOutputs` fills the MRML nodes. All three run on the main thread:
a radiograph takes well under a second, and Slicer's main thread holds Python's GIL while idle (PythonQt), which
starves any Python worker thread. `exportLabelmap` writes 0/1/2 labelmaps and `processFolder` runs the core's batch
command in a PythonSlicer child process (both in FileLogic.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from .FileLogic import SEGMENT_IDS, FileLogic
from .InstallLogic import corePythonPath

# The segments carry the codes of Slicer's "3D Slicer General Anatomy list" (Modules/Loadable/Terminologies/Resources/
# SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json, 5.6-5.12): Anatomical Structure / Lung, laterality as
# the type modifier; the core's DICOM-SEG writer uses the same ones.
corePythonPath()
# pure Python: importable before torch
from lungseg.definitions import (  # noqa: E402
    LUNG_CATEGORY,
    LUNG_LATERALITY,
    LUNG_SEGMENT_NAMES,
    LUNG_TYPE,
)

TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"

_segmenters: dict = {}  # (model, device) -> lungseg Segmenter, shared by every logic instance


@dataclass
class RadiographInput:
    """The input volume as the core's radiograph, and whether it must be inverted before segmenting."""

    radiograph: object  # lungseg.io.radiograph.Radiograph
    invert: bool | None  # None: no file to compare with (the orientation classifier finds an inverted film)
    inversionSource: str = ""

    @property
    def arrayShape(self) -> tuple:
        """Shape of the volume's scalar array, (1, rows, columns)."""
        return (1, *self.radiograph.shape)


@dataclass
class SegmentationResult:
    label: np.ndarray  # (rows, columns) uint8: 0 background, 1 right lung, 2 left lung
    uncertainty: np.ndarray | None
    qcReasons: list
    card: dict
    quality: float | None  # predicted Dice (`lungseg.qc.model.assess`), None for a card without `qc`
    inverted: bool
    inversionSource: str
    seconds: float
    orientationCorrected: str = ""  # what the orientation classifier corrected, e.g. "rotated 90 (from the pixels)"


@dataclass
class SegmentationSummary:
    """What the status line shows; returned by `process`."""

    model: str
    definition: str
    definitionText: str
    rightAreaPx: int
    leftAreaPx: int
    rightAreaMm2: float | None
    leftAreaMm2: float | None
    qcReasons: list = field(default_factory=list)
    quality: float | None = None
    inverted: bool = False
    inversionSource: str = ""
    seconds: float = 0.0
    orientationCorrected: str = ""

    def statusText(self) -> str:
        if self.rightAreaMm2 is not None:
            areas = f"Right lung {self.rightAreaMm2:,.0f} mm², left lung {self.leftAreaMm2:,.0f} mm²"
        else:
            areas = (
                f"Right lung {self.rightAreaPx:,} px, left lung {self.leftAreaPx:,} px (no pixel spacing, so no mm²)"
            )
        text = f"{areas} — model {self.model}, {self.definition} definition."
        if self.inverted:
            text += f" Inverted before segmenting ({self.inversionSource})."
        if self.orientationCorrected:
            text += f" Corrected before segmenting: {self.orientationCorrected}; the segments lie on the loaded image."
        qc = "check: " + "; ".join(self.qcReasons) if self.qcReasons else "OK"
        quality = f"predicted quality {self.quality:.2f}, " if self.quality is not None else ""
        return f"{text}\nQC ({self.definition}): {quality}{qc}"


def availableModels() -> list[dict]:
    """Model cards of the shipped and user models (LUNGSEG_MODELS_PATH); readable before torch is installed."""
    corePythonPath()
    from lungseg.models.cards import list_models

    return list_models()


def isModelLoaded(model: str, device: str) -> bool:
    return (model, device) in _segmenters


def getSegmenter(model: str, device: str):
    key = (model, device)
    if key not in _segmenters:
        from lungseg.inference.segmenter import Segmenter

        _segmenters[key] = Segmenter(model, device)
    return _segmenters[key]


def sourceFile(volumeNode) -> str:
    """The file the volume was loaded from: the DICOM database's file for its first instance (DICOM module), else
    its storage node's file (Add Data); "" for a volume made in Python."""
    uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)
    if uids and database is not None:
        path = database.fileForInstance(uids[0])
        if path and os.path.isfile(path):
            return path
    storage = volumeNode.GetStorageNode()
    path = (storage.GetFileName() if storage else None) or ""
    return path if os.path.isfile(path) else ""


def setTerminology(segment, laterality: tuple) -> None:
    entry = slicer.vtkSlicerTerminologyEntry()
    entry.SetTerminologyContextName(TERMINOLOGY_CONTEXT)
    for coded, (scheme, value, meaning) in (
        (entry.GetCategoryObject(), LUNG_CATEGORY),
        (entry.GetTypeObject(), LUNG_TYPE),
        (entry.GetTypeModifierObject(), laterality),
    ):
        coded.SetCodingSchemeDesignator(scheme)
        coded.SetCodeValue(value)
        coded.SetCodeMeaning(meaning)
    text = slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry)
    if hasattr(segment, "SetTerminology"):  # vtkSegment::SetTerminology exists from Slicer 5.10
        segment.SetTerminology(text)
    else:
        segment.SetTag(segment.GetTerminologyEntryTagName(), text)


class SegmentationLogic(FileLogic, ScriptedLoadableModuleLogic):
    """One radiograph segmented into the scene; `FileLogic` adds the labelmap export and the folder batch."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastSummary: SegmentationSummary | None = None

    # --- one radiograph -------------------------------------------------------------------------------------

    def process(
        self, inputVolume, outputSegmentation, model: str = "unet", device: str = "auto", uncertaintyVolume=None
    ) -> SegmentationSummary:
        """Fill `outputSegmentation` with the right and left lung of `inputVolume` (and `uncertaintyVolume` with the
        per-pixel uncertainty, when given); returns the summary for the status line."""
        radiograph = self.readInput(inputVolume)
        result = self.compute(radiograph, model, device, uncertainty=uncertaintyVolume is not None)
        return self.writeOutputs(inputVolume, radiograph, result, outputSegmentation, uncertaintyVolume)

    def readInput(self, inputVolume) -> RadiographInput:
        """The volume as the core's radiograph. Where it came from a file, the file decides what the core would
        decide for it: the pixel spacing (GDCM gives CR/DX files 1.0 mm unless ImagerPixelSpacing is set), the
        display orientation, and the polarity (Slicer's GDCM reader inverts MONOCHROME1, its DCMTK fallback does
        not)."""
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError("Select an input volume that has image data.")
        corePythonPath()
        from lungseg.io.files import is_dicom
        from lungseg.io.radiograph import dicom_header, inverted_against_file, radiograph_from_array, stated_spacing

        array = slicer.util.arrayFromVolume(inputVolume)  # (slices, rows, columns[, components])
        components = array.shape[3] if array.ndim == 4 else 1
        path = sourceFile(inputVolume)
        dicom = bool(path) and is_dicom(Path(path))
        if dicom:
            spacing, photometric, flips, stated = dicom_header(Path(path))
        else:
            column, row = inputVolume.GetSpacing()[:2]
            spacing, photometric = stated_spacing(row, column, path or inputVolume.GetName()), ""
            flips, stated = (False, False), False
        radiograph = radiograph_from_array(
            array,
            inputVolume.GetName(),
            components,
            spacing=spacing,
            photometric=photometric,
            display_flips=flips,
            orientation_stated=stated,
        )
        invert = inverted_against_file(radiograph.pixels, path) if dicom else None
        source = f"loaded without inverting DICOM {photometric}" if invert else ""
        return RadiographInput(radiograph, invert, source)

    def compute(
        self,
        radiographInput: RadiographInput,
        model: str = "unet",
        device: str = "auto",
        uncertainty: bool = False,
        corrections: str = "turns,inversion,mirroring",
    ) -> SegmentationResult:
        """The model run on the core's radiograph; touches no MRML node. The orientation classifier checks the
        film first and corrects what `corrections` (as `lungseg segment --corrections`) allows; the labelmap comes
        back on the volume's own grid."""
        from lungseg.inference.orientation import Corrections
        from lungseg.qc.model import assess

        start = time.time()
        segmenter = getSegmenter(model, device)
        radiograph = radiographInput.radiograph
        pixels = radiograph.pixels
        invert, source = bool(radiographInput.invert), radiographInput.inversionSource
        if invert:
            pixels = pixels.max() - pixels
        prediction = segmenter.segment(
            pixels,
            uncertainty=uncertainty,
            display_flips=radiograph.display_flips,
            orientation_stated=radiograph.orientation_stated,
            corrections=Corrections.parse(corrections),
        )
        assessment = assess(prediction, segmenter)  # the batch's QC: the same rules and predicted quality
        return SegmentationResult(
            prediction.label,
            prediction.uncertainty,
            assessment.reasons,
            segmenter.card,
            assessment.quality,
            invert,
            source if invert else "",
            time.time() - start,
            prediction.orientation.corrected if prediction.orientation else "",
        )

    def writeOutputs(
        self,
        inputVolume,
        radiographInput: RadiographInput,
        result: SegmentationResult,
        outputSegmentation,
        uncertaintyVolume=None,
    ) -> SegmentationSummary:
        from lungseg.batch.overlay import LABEL_COLOURS
        from lungseg.inference.labels import lung_areas

        if outputSegmentation is None:
            raise ValueError("Select or create an output segmentation.")
        outputSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        if outputSegmentation.GetDisplayNode() is None:
            outputSegmentation.CreateDefaultDisplayNodes()
        segmentation = outputSegmentation.GetSegmentation()
        for value, segmentId in SEGMENT_IDS.items():
            name = LUNG_SEGMENT_NAMES[value]
            for existing in {segmentId, segmentation.GetSegmentIdBySegmentName(name)}:
                if existing and segmentation.GetSegment(existing):
                    segmentation.RemoveSegment(existing)  # a rerun replaces the lungs and keeps other segments
            segmentId = segmentation.AddEmptySegment(segmentId, name, [c / 255 for c in LABEL_COLOURS[value]])
            setTerminology(segmentation.GetSegment(segmentId), LUNG_LATERALITY[value])
            mask = (result.label == value).astype(np.uint8).reshape(radiographInput.arrayShape)
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask, outputSegmentation, segmentId, inputVolume)
        if uncertaintyVolume is not None and result.uncertainty is not None:
            matrix = vtk.vtkMatrix4x4()
            inputVolume.GetIJKToRASMatrix(matrix)
            uncertaintyVolume.SetIJKToRASMatrix(matrix)
            uncertaintyVolume.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
            slicer.util.updateVolumeFromArray(
                uncertaintyVolume, result.uncertainty.astype(np.float32).reshape(radiographInput.arrayShape)
            )
            if uncertaintyVolume.GetDisplayNode() is None:
                uncertaintyVolume.CreateDefaultDisplayNodes()
        areas = lung_areas(result.label, radiographInput.radiograph.pixel_area_mm2)
        card = result.card
        self.lastSummary = SegmentationSummary(
            model=card["name"],
            definition=card.get("definition", ""),
            definitionText=card.get("definition_text", ""),
            rightAreaPx=areas["right_area_px"],
            leftAreaPx=areas["left_area_px"],
            rightAreaMm2=areas["right_area_mm2"] if areas["right_area_mm2"] != "" else None,
            leftAreaMm2=areas["left_area_mm2"] if areas["left_area_mm2"] != "" else None,
            qcReasons=list(result.qcReasons),
            quality=result.quality,
            inverted=result.inverted,
            inversionSource=result.inversionSource,
            seconds=result.seconds,
            orientationCorrected=result.orientationCorrected,
        )
        return self.lastSummary
