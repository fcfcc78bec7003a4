"""Make the PyPI `slicer-core` package (Slicer's compiled core, without the application) look like the Python
environment of a Slicer started with --testing, so that the LungSeg module runs unchanged in pytest.

slicer-core has MRML, the module logics and Slicer's own `slicer/util.py`; it lacks `slicer.app`,
`slicer.mrmlScene`, `slicer.modules`, the segmentation converter rules that the application registers at startup,
and the pure-Python parts of Slicer (ScriptedLoadableModule, parameterNodeWrapper, i18n). This folder holds small
stand-ins for exactly those; everything else (scene, nodes, storage, segmentation logic) is real Slicer code.
"""
from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path

SUPPORT = Path(__file__).resolve().parent
REPO = SUPPORT.parents[1]
MODULE_DIR = REPO / "LungSegExtension" / "LungSeg"


class TestingApp:
    """The few `slicer.app` calls that slicer.util and the module make, answered as in `Slicer --testing`."""

    applicationName = "Slicer"

    def testingEnabled(self) -> bool:
        return True

    def commandOptions(self):
        return types.SimpleNamespace(testingEnabled=True, noMainWindow=True)

    def startupEnvironment(self):
        """The environment before the launcher's changes; outside the application that is os.environ."""
        import os

        return types.SimpleNamespace(keys=lambda: list(os.environ), value=os.environ.get)

    def applicationLogic(self):
        import slicer

        return slicer._applicationLogic

    def processEvents(self) -> None:
        if "PySide6.QtWidgets" in sys.modules:
            from PySide6.QtWidgets import QApplication

            if QApplication.instance():
                QApplication.processEvents()

    def setOverrideCursor(self, cursor) -> None:
        pass

    def restoreOverrideCursor(self) -> None:
        pass


def start():
    """Import slicer with the stand-ins on its path and a fresh application state; returns the slicer module."""
    for folder in (SUPPORT, MODULE_DIR):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    import slicer

    # slicer/__init__.py extends its package path when first imported; cover an earlier import too
    if str(SUPPORT / "slicer") not in slicer.__path__:
        slicer.__path__.append(str(SUPPORT / "slicer"))
    if getattr(slicer, "mrmlScene", None) is not None:
        return slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        factory.RegisterConverterRule(rule())

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    slicer.app = TestingApp()
    # the application logic with the Colors module logic, as the volumes logic looks it up for labelmap colours
    home = Path(tempfile.mkdtemp(prefix="slicer-core-home-"))
    (home / "share" / "ColorFiles").mkdir(parents=True)
    # the default labelmap colours, which the application ships; two entries are enough for its logic
    (home / "share" / "ColorFiles" / "GenericColors.txt").write_text("0 Background 0 0 0 0\n1 tissue 128 174 128 255\n")
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.SetHomeDirectory(str(home))
    app_logic.SetShareDirectory("share")
    slicer._applicationLogic = app_logic
    logics = {}
    for name, cls in (("colors", slicer.vtkSlicerColorLogic), ("volumes", slicer.vtkSlicerVolumesLogic),
                      ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name.capitalize(), logic)
        logics[name] = types.SimpleNamespace(logic=lambda logic=logic: logic, path="")
    logics["lungseg"] = types.SimpleNamespace(path=str(MODULE_DIR / "LungSeg.py"))
    slicer.modules = types.SimpleNamespace(**logics)
    slicer.dicomDatabase = None  # no DICOM database in testing mode unless a test provides one
    return slicer


def load_volume(path: str | Path, name: str | None = None):
    """A volume node for an image file as `slicer.util.loadVolume(path, {"singleFile": True})` makes it.

    slicer-core's ITK has no PNG/JPEG reader, so the pixels come from SimpleITK (the same ITK reader the application
    uses) and the node gets the application's geometry: ITK's LPS grid turned to RAS, RGB as a vector volume, and a
    storage node naming the file. `test_slicer_logic` checks this against Slicer's own reader on an NRRD copy.
    """
    import numpy as np
    import SimpleITK as sitk
    import slicer

    image = sitk.ReadImage(str(path))
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    array = sitk.GetArrayFromImage(image)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = lps_to_ras @ direction @ np.diag(image.GetSpacing())
    ijk_to_ras[:3, 3] = lps_to_ras @ np.array(image.GetOrigin())
    vector = image.GetNumberOfComponentsPerPixel() > 1
    node = slicer.util.addVolumeFromArray(array, ijk_to_ras, name or Path(path).stem,
                                          "vtkMRMLVectorVolumeNode" if vector else "vtkMRMLScalarVolumeNode")
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetSingleFile(True)
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def start_gui():
    """`start()` plus an offscreen QApplication and PythonQt's `name` for child widgets (PySide6 has objectName())."""
    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    slicer = start()
    from PySide6.QtWidgets import QApplication, QWidget

    application = QApplication.instance() or QApplication([])

    def childWidgetVariables(widget):
        ui = type("", (), {})()
        for child in widget.findChildren(QWidget):
            if child.objectName():
                setattr(ui, child.objectName(), child)
        return ui

    slicer.util.childWidgetVariables = childWidgetVariables
    return slicer, application
