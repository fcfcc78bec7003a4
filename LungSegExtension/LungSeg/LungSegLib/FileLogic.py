"""The files the LungSeg module writes: a labelmap of a lung segmentation (`exportLabelmap`), and a folder of
radiographs segmented by the core's batch command in a PythonSlicer child process (`processFolder`).
`SegmentationLogic` inherits both from `FileLogic`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import slicer
import vtk

from .BatchProcess import BatchProcess
from .InstallLogic import corePythonPath

corePythonPath()
# pure Python: importable before torch
from lungseg.definitions import LEFT_LUNG, LUNG_SEGMENT_NAMES, RIGHT_LUNG  # noqa: E402

SEGMENT_IDS = {RIGHT_LUNG: "RightLung", LEFT_LUNG: "LeftLung"}  # the module's segment IDs, by label value
LABELMAP_SUFFIXES = (".nrrd", ".nii.gz", ".png")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _ijkToLps(volumeNode):
    """(spacing, origin, direction) of the volume's grid in ITK's LPS convention."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    ijkToRas = slicer.util.arrayFromVTKMatrix(matrix)
    axes = RAS_TO_LPS @ ijkToRas[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    return spacing, RAS_TO_LPS @ ijkToRas[:3, 3], axes / spacing


class FileLogic:
    # --- labelmap export ------------------------------------------------------------------------------------

    def exportLabelmap(self, segmentationNode, referenceVolume, path) -> Path:
        """Write the lungs as a labelmap (0 background, 1 right, 2 left) on the reference volume's grid.

        .nrrd and .nii.gz keep the full geometry (a single-slice volume that overlays the input exactly);
        .png keeps the pixel spacing, which is all a PNG can hold. Where the lungs overlap after editing, left wins.
        """
        import SimpleITK as sitk

        corePythonPath()
        from lungseg.io.files import suffix_of
        from lungseg.io.radiograph import write_labelmap

        path = Path(path)
        suffix = suffix_of(path)
        if suffix not in LABELMAP_SUFFIXES:
            raise ValueError(f"{path.name}: choose a labelmap file ending in {', '.join(LABELMAP_SUFFIXES)}")
        dimensions = referenceVolume.GetImageData().GetDimensions()
        if dimensions[2] != 1:
            raise ValueError(f"'{referenceVolume.GetName()}' has {dimensions[2]} slices; export needs a radiograph.")
        segmentation = segmentationNode.GetSegmentation()
        label = np.zeros((dimensions[1], dimensions[0]), np.uint8)
        for value, segmentId in SEGMENT_IDS.items():
            name = LUNG_SEGMENT_NAMES[value]
            found = segmentation.GetSegmentIdBySegmentName(name) or (
                segmentId if segmentation.GetSegment(segmentId) else ""
            )
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
        """Slicer's PythonSlicer, which runs Slicer's Python with its environment. Inside Slicer `sys.executable`
        is the application itself, so there is no fallback (as slicer.util._executePythonModule)."""
        executable = shutil.which("PythonSlicer")
        if not executable:
            raise RuntimeError("PythonSlicer executable not found; the batch needs Slicer's own Python launcher")
        return executable

    def processFolder(
        self,
        inputDir,
        outputDir,
        model: str = "unet",
        device: str = "auto",
        overlays: bool = True,
        labelmapFormat: str = "nrrd",
        python: str | None = None,
        corrections: str = "turns,inversion,mirroring",
    ) -> BatchProcess:
        """Start `lungseg segment` on every image of `inputDir` in a child process and return it: poll its
        progress, `cancel()` it, or `wait()` for the exit status (0 all segmented, 1 some failed, 2 usage error,
        3 crash, 130 interrupted; `ranToEnd()` tells a crash from a finished run).
        Labelmaps, overlays and results.csv go to `outputDir`; `corrections` is the command's `--corrections`."""
        inputDir, outputDir = Path(inputDir), Path(outputDir)
        if not inputDir.is_dir():
            raise ValueError(f"{inputDir}: not a folder")
        if outputDir.resolve() == inputDir.resolve():
            raise ValueError("Choose an output folder other than the input folder.")
        args = [
            python or self.pythonExecutable(),
            "-m",
            "lungseg",
            "segment",
            str(inputDir),
            "-o",
            str(outputDir),
            "--model",
            model,
            "--device",
            device,
            "--format",
            labelmapFormat,
            "--corrections",
            corrections,
            "--progress-lines",
        ]
        if overlays:
            args.append("--overlays")
        environment = slicer.util.startupEnvironment()  # as launchConsoleProcess does for PythonSlicer
        # the child finds the core that ships with the extension
        environment["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(corePythonPath()), environment.get("PYTHONPATH", "")) if p
        )
        # a pipe otherwise gets the ANSI code page on Windows; BatchProcess reads UTF-8
        environment["PYTHONIOENCODING"] = "utf-8"
        process = BatchProcess(args, environment, outputDir)
        process.start()
        return process
