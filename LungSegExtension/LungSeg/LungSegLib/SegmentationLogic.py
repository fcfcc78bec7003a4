"""The computation of the LungSeg module; it needs no GUI.

`process` segments a radiograph volume into a "Right lung" and a "Left lung" segment; it is `readInput` (MRML, main
thread), `compute` (numpy and torch only, safe in a worker thread) and `writeOutputs` (MRML, main thread), which the
panel runs separately to keep the GUI responsive. `exportLabelmap` writes 0/1/2 labelmaps and `processFolder` runs
the core's batch command in a child process.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from .BatchProcess import BatchProcess
from .InstallLogic import corePythonPath

RIGHT_LUNG, LEFT_LUNG = 1, 2
# label value: (segment ID, name, SNOMED CT code); category "Anatomical Structure" in Slicer's anatomy list
SEGMENTS = {RIGHT_LUNG: ("RightLung", "Right lung", "3341006"), LEFT_LUNG: ("LeftLung", "Left lung", "44029006")}
TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
CATEGORY = ("SCT", "123037004", "Anatomical Structure")
LABELMAP_SUFFIXES = (".nrrd", ".nii.gz", ".png")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

_segmenters: dict = {}  # (model, device) -> lungseg Segmenter, shared by every logic instance
_segmentersLock = threading.Lock()


@dataclass
class RadiographInput:
    """The input volume as the worker thread needs it."""
    pixels: np.ndarray                  # (rows, columns) float32; luminance for RGB
    arrayShape: tuple                   # shape of the volume's scalar array, (1, rows, columns)
    pixelAreaMm2: float | None          # None when the spacing is not a real pixel size
    photometric: str = ""               # DICOM PhotometricInterpretation when the volume came from DICOM
    displayFlips: tuple = (False, False)  # from DICOM PatientOrientation: stored mirrored or upside down


@dataclass
class SegmentationResult:
    label: np.ndarray                   # (rows, columns) uint8: 0 background, 1 right lung, 2 left lung
    uncertainty: np.ndarray | None
    qcReasons: list
    card: dict
    inverted: bool
    inversionSource: str
    seconds: float


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
    inverted: bool = False
    inversionSource: str = ""
    seconds: float = 0.0

    def statusText(self) -> str:
        if self.rightAreaMm2 is not None:
            areas = f"Right lung {self.rightAreaMm2:,.0f} mm², left lung {self.leftAreaMm2:,.0f} mm²"
        else:
            areas = (f"Right lung {self.rightAreaPx:,} px, left lung {self.leftAreaPx:,} px "
                     "(no pixel spacing, so no mm²)")
        text = f"{areas} — model {self.model}, {self.definition} definition."
        if self.inverted:
            text += f" Inverted before segmenting ({self.inversionSource})."
        qc = "; ".join(self.qcReasons) if self.qcReasons else "OK"
        return f"{text}\nQC ({self.definition}): {qc}"


def availableModels() -> list[dict]:
    """Model cards of the shipped and user models (LUNGSEG_MODELS_PATH); readable before torch is installed."""
    corePythonPath()
    from lungseg.models import list_models

    return list_models()


def getSegmenter(model: str, device: str):
    with _segmentersLock:
        key = (model, device)
        if key not in _segmenters:
            from lungseg.inference import Segmenter

            _segmenters[key] = Segmenter(model, device)
        return _segmenters[key]


def _dicomHeader(volumeNode):
    """The DICOM header of the file the volume was loaded from, or None (not from DICOM, or file not found)."""
    uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)
    if not uids or database is None:
        return None
    path = database.fileForInstance(uids[0])
    if not path or not os.path.isfile(path):
        return None
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True, force=True)


def _spacingIsPixelSize(volumeNode, dicomHeader) -> bool:
    """The core's rule (lungseg.io): DICOM (Imager)PixelSpacing above zero; otherwise the file's stated spacing."""
    from lungseg.io import dicom_pixel_spacing, stated_spacing

    if dicomHeader is not None:
        return dicom_pixel_spacing(dicomHeader) is not None
    storage = volumeNode.GetStorageNode()
    fileName = (storage.GetFileName() if storage else None) or ""
    column, row = volumeNode.GetSpacing()[:2]
    return stated_spacing(row, column, fileName) is not None


def _ijkToLps(volumeNode):
    """(spacing, origin, direction) of the volume's grid in ITK's LPS convention."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    ijkToRas = slicer.util.arrayFromVTKMatrix(matrix)
    axes = RAS_TO_LPS @ ijkToRas[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    return spacing, RAS_TO_LPS @ ijkToRas[:3, 3], axes / spacing


class SegmentationLogic(ScriptedLoadableModuleLogic):
    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastSummary: SegmentationSummary | None = None

    # --- one radiograph -------------------------------------------------------------------------------------

    def process(self, inputVolume, outputSegmentation, model: str = "unet", device: str = "auto",
                uncertaintyVolume=None) -> SegmentationSummary:
        """Fill `outputSegmentation` with the right and left lung of `inputVolume` (and `uncertaintyVolume` with the
        per-pixel uncertainty, when given); returns the summary for the status line."""
        radiograph = self.readInput(inputVolume)
        result = self.compute(radiograph, model, device, uncertainty=uncertaintyVolume is not None)
        return self.writeOutputs(inputVolume, radiograph, result, outputSegmentation, uncertaintyVolume)

    def readInput(self, inputVolume) -> RadiographInput:
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError("Select an input volume that has image data.")
        corePythonPath()
        from lungseg.io import MIN_SIDE, display_flips

        array = slicer.util.arrayFromVolume(inputVolume)
        if array.ndim == 4:  # vector volume: RGB(A) as ITU-R BT.601 luma like the core, else the first component
            components = array.shape[3]
            array = (array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
                     if components >= 3 else array[..., 0])
        if array.shape[0] != 1:
            raise ValueError(f"'{inputVolume.GetName()}' has {array.shape[0]} slices; LungSeg segments 2D "
                             "radiographs (single-slice volumes).")
        pixels = array[0].astype(np.float32)
        if min(pixels.shape) < MIN_SIDE:
            raise ValueError(f"'{inputVolume.GetName()}' is too small ({pixels.shape[1]}x{pixels.shape[0]} pixels).")
        finite = np.isfinite(pixels)
        if not finite.any() or pixels[finite].min() == pixels[finite].max():
            raise ValueError(f"'{inputVolume.GetName()}' has no contrast to segment.")
        pixels = np.where(finite, pixels, pixels[finite].min()).astype(np.float32)
        header = _dicomHeader(inputVolume)
        spacing = inputVolume.GetSpacing()
        area = spacing[0] * spacing[1] if _spacingIsPixelSize(inputVolume, header) else None
        photometric = str(header.get("PhotometricInterpretation", "")) if header is not None else ""
        flips = display_flips(header.get("PatientOrientation")) if header is not None else (False, False)
        return RadiographInput(pixels, (1, *pixels.shape), area, photometric, flips)

    def compute(self, radiograph: RadiographInput, model: str = "unet", device: str = "auto",
                uncertainty: bool = False) -> SegmentationResult:
        """The model run; touches no MRML node, so it may run in a worker thread."""
        from lungseg.qc import quality_flags

        start = time.time()
        segmenter = getSegmenter(model, device)
        pixels = radiograph.pixels
        # Slicer does not invert MONOCHROME1 on load: trust the DICOM header, else the model's own confidence
        if radiograph.photometric:
            inverted, source = radiograph.photometric == "MONOCHROME1", f"DICOM {radiograph.photometric}"
        else:
            inverted, source = segmenter.needs_inversion(pixels), "intensity statistics"
        if inverted:
            pixels = pixels.max() - pixels
        prediction = segmenter.segment(pixels, uncertainty=uncertainty, display_flips=radiograph.displayFlips)
        reasons = quality_flags(prediction.label, prediction.raw_label, prediction.uncertainty, segmenter.definition)
        return SegmentationResult(prediction.label, prediction.uncertainty, reasons, segmenter.card, inverted,
                                  source if inverted else "", time.time() - start)

    def writeOutputs(self, inputVolume, radiograph: RadiographInput, result: SegmentationResult,
                     outputSegmentation, uncertaintyVolume=None) -> SegmentationSummary:
        from lungseg.io import LABEL_COLOURS
        from lungseg.labels import lung_areas

        if outputSegmentation is None:
            raise ValueError("Select or create an output segmentation.")
        outputSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        if outputSegmentation.GetDisplayNode() is None:
            outputSegmentation.CreateDefaultDisplayNodes()
        segmentation = outputSegmentation.GetSegmentation()
        for value, (segmentId, name, code) in SEGMENTS.items():
            for existing in {segmentId, segmentation.GetSegmentIdBySegmentName(name)}:
                if existing and segmentation.GetSegment(existing):
                    segmentation.RemoveSegment(existing)  # a rerun replaces the lungs and keeps other segments
            segmentId = segmentation.AddEmptySegment(segmentId, name, [c / 255 for c in LABEL_COLOURS[value]])
            self._setTerminology(segmentation.GetSegment(segmentId), name, code)
            mask = (result.label == value).astype(np.uint8).reshape(radiograph.arrayShape)
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask, outputSegmentation, segmentId, inputVolume)
        if uncertaintyVolume is not None and result.uncertainty is not None:
            matrix = vtk.vtkMatrix4x4()
            inputVolume.GetIJKToRASMatrix(matrix)
            uncertaintyVolume.SetIJKToRASMatrix(matrix)
            uncertaintyVolume.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
            slicer.util.updateVolumeFromArray(uncertaintyVolume,
                                              result.uncertainty.astype(np.float32).reshape(radiograph.arrayShape))
            if uncertaintyVolume.GetDisplayNode() is None:
                uncertaintyVolume.CreateDefaultDisplayNodes()
        areas = lung_areas(result.label, radiograph.pixelAreaMm2)
        card = result.card
        self.lastSummary = SegmentationSummary(
            model=card["name"], definition=card.get("definition", ""), definitionText=card.get("definition_text", ""),
            rightAreaPx=areas["right_area_px"], leftAreaPx=areas["left_area_px"],
            rightAreaMm2=areas["right_area_mm2"] if areas["right_area_mm2"] != "" else None,
            leftAreaMm2=areas["left_area_mm2"] if areas["left_area_mm2"] != "" else None,
            qcReasons=list(result.qcReasons), inverted=result.inverted, inversionSource=result.inversionSource,
            seconds=result.seconds)
        return self.lastSummary

    @staticmethod
    def _setTerminology(segment, name: str, code: str) -> None:
        entry = slicer.vtkSlicerTerminologyEntry()
        entry.SetTerminologyContextName(TERMINOLOGY_CONTEXT)
        for coded, (scheme, value, meaning) in ((entry.GetCategoryObject(), CATEGORY),
                                                (entry.GetTypeObject(), ("SCT", code, name))):
            coded.SetCodingSchemeDesignator(scheme)
            coded.SetCodeValue(value)
            coded.SetCodeMeaning(meaning)
        text = slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry)
        if hasattr(segment, "SetTerminology"):  # Slicer 5.8+
            segment.SetTerminology(text)
        else:
            segment.SetTag(segment.GetTerminologyEntryTagName(), text)

    # --- labelmap export ------------------------------------------------------------------------------------

    def exportLabelmap(self, segmentationNode, referenceVolume, path) -> Path:
        """Write the lungs as a labelmap (0 background, 1 right, 2 left) on the reference volume's grid.

        .nrrd and .nii.gz keep the full geometry (a single-slice volume that overlays the input exactly);
        .png keeps the pixel spacing, which is all a PNG can hold. Where the lungs overlap after editing, left wins.
        """
        import SimpleITK as sitk

        corePythonPath()
        from lungseg.io import suffix_of, write_labelmap

        path = Path(path)
        suffix = suffix_of(path)
        if suffix not in LABELMAP_SUFFIXES:
            raise ValueError(f"{path.name}: choose a labelmap file ending in {', '.join(LABELMAP_SUFFIXES)}")
        dimensions = referenceVolume.GetImageData().GetDimensions()
        if dimensions[2] != 1:
            raise ValueError(f"'{referenceVolume.GetName()}' has {dimensions[2]} slices; export needs a radiograph.")
        segmentation = segmentationNode.GetSegmentation()
        label = np.zeros((dimensions[1], dimensions[0]), np.uint8)
        for value, (segmentId, name, _) in SEGMENTS.items():
            found = segmentation.GetSegmentIdBySegmentName(name) or (
                segmentId if segmentation.GetSegment(segmentId) else "")
            if not found:
                raise ValueError(f"'{segmentationNode.GetName()}' has no '{name}' segment; segment the lungs first.")
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, found, referenceVolume)
            label[mask[0] > 0] = value
        spacing, origin, direction = _ijkToLps(referenceVolume)
        if suffix == ".png":
            reference = sitk.Image(dimensions[0], dimensions[1], sitk.sitkUInt8)
            reference.SetSpacing([float(s) for s in spacing[:2]])
        else:
            reference = sitk.Image(list(dimensions), sitk.sitkUInt8)
            reference.SetSpacing([float(s) for s in spacing])
            reference.SetOrigin([float(o) for o in origin])
            reference.SetDirection([float(d) for d in direction.flatten()])
        write_labelmap(label, reference, path)
        return path

    # --- a folder, in a child process -----------------------------------------------------------------------

    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's PythonSlicer, which runs Slicer's Python with its environment; outside Slicer this Python."""
        return shutil.which("PythonSlicer") or sys.executable

    def processFolder(self, inputDir, outputDir, model: str = "unet", device: str = "auto", overlays: bool = True,
                      labelmapFormat: str = "nrrd", python: str | None = None) -> BatchProcess:
        """Start `lungseg segment` on every image of `inputDir` in a child process and return it: poll its
        progress, `cancel()` it, or `wait()` for the exit status (0 all segmented, 1 some failed, 2 usage error).
        Labelmaps, overlays and results.csv go to `outputDir`."""
        inputDir, outputDir = Path(inputDir), Path(outputDir)
        if not inputDir.is_dir():
            raise ValueError(f"{inputDir}: not a folder")
        if outputDir.resolve() == inputDir.resolve():
            raise ValueError("Choose an output folder other than the input folder.")
        args = [python or self.pythonExecutable(), "-m", "lungseg", "segment", str(inputDir), "-o", str(outputDir),
                "--model", model, "--device", device, "--format", labelmapFormat, "--progress-lines"]
        if overlays:
            args.append("--overlays")
        environment = slicer.util.startupEnvironment()  # as launchConsoleProcess does for PythonSlicer
        # the child finds the core that ships with the extension
        environment["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(corePythonPath()), environment.get("PYTHONPATH", "")) if p)
        process = BatchProcess(args, environment, outputDir)
        process.start()
        return process
