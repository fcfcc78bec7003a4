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
REPO = SUPPORT.parents[2]
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

    # qSlicerCoreApplication's `majorVersion`/`minorVersion` properties (Base/QTCore/qSlicerCoreApplication.h,
    # v5.8.1, Q_PROPERTY ... CONSTANT; PythonQt reads them as attributes). They follow
    # slicer.parameterNodeWrapper.SLICER_VERSION (5.8 unless LUNGSEG_TEST_SLICER_VERSION or a test changes it);
    # assigning one overrides it.
    @property
    def majorVersion(self) -> int:
        return self.__dict__.get("_majorVersion", _slicer_version()[0])

    @majorVersion.setter
    def majorVersion(self, value: int) -> None:
        self.__dict__["_majorVersion"] = int(value)

    @property
    def minorVersion(self) -> int:
        return self.__dict__.get("_minorVersion", _slicer_version()[1])

    @minorVersion.setter
    def minorVersion(self, value: int) -> None:
        self.__dict__["_minorVersion"] = int(value)

    def coreIOManager(self):
        """qSlicerCoreIOManager, with the readers that claim a DICOM file (io_manager.py)."""
        if "_coreIOManager" not in self.__dict__:
            import io_manager

            self.__dict__["_coreIOManager"] = io_manager.CoreIOManager()
        return self.__dict__["_coreIOManager"]

    def moduleManager(self):
        """qSlicerModuleManager's string-signature connect/disconnect, as ScriptedLoadableModuleWidget and
        slicer.util.reloadScriptedModule use them (moduleAboutToBeUnloaded(QString))."""
        if "_moduleManager" not in self.__dict__:
            self.__dict__["_moduleManager"] = _ModuleManager()
        return self.__dict__["_moduleManager"]


def _slicer_version() -> tuple[int, int]:
    import importlib

    return importlib.import_module("slicer.parameterNodeWrapper").SLICER_VERSION


class _ModuleManager:
    def __init__(self):
        self.connections: list[tuple[str, object]] = []

    def connect(self, signal: str, slot) -> bool:
        self.connections.append((signal, slot))
        return True

    def disconnect(self, signal: str, slot) -> bool:
        if (signal, slot) in self.connections:
            self.connections.remove((signal, slot))
            return True
        return False


def start():
    """Import slicer with the stand-ins on its path and a fresh application state; returns the slicer module."""
    if "slicer" not in sys.modules:
        # slicer-core's slicer/__init__.py imports every module found on the package path and copies its public
        # names into `slicer`, which would make `slicer.parameterNodeWrapper` the decorator function and add names
        # (slicer.Choice, slicer.tr, ...) that real Slicer's namespace lacks; so import it before the stand-ins
        # are on its path
        saved = list(sys.path)
        sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != SUPPORT]
        try:
            import slicer
        finally:
            sys.path[:] = saved
    for folder in (SUPPORT, MODULE_DIR):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    import slicer

    # the stand-in submodules (slicer.ScriptedLoadableModule, slicer.parameterNodeWrapper, slicer.i18n), as real
    # Slicer's own are found; repair the attributes if slicer was imported earlier with the stand-ins on its path
    if str(SUPPORT / "slicer") not in slicer.__path__:
        slicer.__path__.append(str(SUPPORT / "slicer"))
    for standIn in (SUPPORT / "slicer").glob("*.py"):
        module = sys.modules.get(f"slicer.{standIn.stem}")
        if module is not None:
            setattr(slicer, standIn.stem, module)
    if getattr(slicer, "mrmlScene", None) is not None:
        return slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
    ):
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
    for name, cls in (
        ("colors", slicer.vtkSlicerColorLogic),
        ("volumes", slicer.vtkSlicerVolumesLogic),
        ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
    ):
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
    storage node naming the file. `slicer/test_logic.py` checks this against Slicer's own reader on an NRRD copy.
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
    node = slicer.util.addVolumeFromArray(
        array, ijk_to_ras, name or Path(path).stem, "vtkMRMLVectorVolumeNode" if vector else "vtkMRMLScalarVolumeNode"
    )
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


# --------------------------------------------------------------------------------------------------------------
# DICOM: the DICOM module's scalar-volume loading, on slicer-core's real vtkITK reader
# --------------------------------------------------------------------------------------------------------------
class DICOMDatabase:
    """The few ctkDICOMDatabase calls that the DICOM plugins and LungSeg make (CTK Libs/DICOM/Core/
    ctkDICOMDatabase.h: fileForInstance, instanceForFile, filesForSeries, fileValue), over an in-memory index of
    the files that `load_dicom_volume` imported. Values come from pydicom, as strings the way ctkDICOMDatabase
    returns them: "" when absent, multiple values joined with a backslash."""

    def __init__(self):
        self._files: dict[str, str] = {}  # SOPInstanceUID -> path
        self._headers: dict[str, object] = {}  # path -> pydicom dataset (no pixel data)

    def insert(self, path: str | Path) -> str:
        import pydicom

        path = str(Path(path).resolve())
        header = pydicom.dcmread(path, stop_before_pixels=True)
        self._headers[path] = header
        self._files[str(header.SOPInstanceUID)] = path
        return path

    def fileForInstance(self, sopInstanceUID: str) -> str:
        return self._files.get(str(sopInstanceUID), "")

    def instanceForFile(self, path: str) -> str:
        header = self._headers.get(str(Path(path).resolve()))
        return str(header.SOPInstanceUID) if header is not None else ""

    def filesForSeries(self, seriesUID: str, hits: int = -1) -> list[str]:
        files = [p for p, h in self._headers.items() if str(h.get("SeriesInstanceUID", "")) == seriesUID]
        return files if hits < 0 else files[:hits]

    def fileValue(self, path: str, tag: str) -> str:
        header = self._headers.get(str(Path(path).resolve()))
        group, element = (int(part, 16) for part in tag.split(","))
        if header is None or (group, element) not in header:
            return ""
        value = header[group, element].value
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            return "\\".join(str(v) for v in value)
        return "" if value is None else str(value)


def dicom_database() -> DICOMDatabase:
    """`slicer.dicomDatabase`, created on first use (the tests' clear_scene fixture sets it back to None)."""
    import slicer

    if getattr(slicer, "dicomDatabase", None) is None:
        slicer.dicomDatabase = DICOMDatabase()
    return slicer.dicomDatabase


def _series_reader(path: str, approach: str):
    """DICOMScalarVolumePlugin.loadFilesWithSeriesReader's reader set-up (Slicer v5.8.1
    Modules/Scripted/DICOMPlugins/DICOMScalarVolumePlugin.py:422-452), grayscale, one file. None on a read
    error, as the plugin returns None."""
    import slicer
    import vtk

    reader = slicer.vtkITKArchetypeImageSeriesScalarReader()
    reader.SetArchetype(path)
    reader.AddFileName(path)
    reader.SetSingleFile(0)
    reader.SetOutputScalarTypeToNative()
    reader.SetDesiredCoordinateOrientationToNative()
    reader.SetUseNativeOriginOn()
    if approach == "GDCM":
        reader.SetDICOMImageIOApproachToGDCM()
    elif approach == "DCMTK":  # slicer-core's ITK has no DCMTKImageIO: this read fails there
        reader.SetDICOMImageIOApproachToDCMTK()
    else:
        raise ValueError(f"Invalid imageIOName of {approach}")
    reader.Update()
    if reader.GetErrorCode() != vtk.vtkErrorCode.NoError:
        return None
    return reader


def load_dicom_volume(path: str | Path, name: str | None = None, approach: str = "GDCM"):
    """Load a single-frame grayscale DICOM file (CR/DX) as Slicer's DICOM module does: import it into the
    (stand-in) DICOM database, then DICOMScalarVolumePlugin.load with the default reader approach.

    Copied behaviour, Slicer v5.8.1 Modules/Scripted/DICOMPlugins/DICOMScalarVolumePlugin.py (the same in
    v5.6.2 and v5.10.0):
    - approach "GDCM" is the default "GDCM with DCMTK fallback" (readerApproaches()[0], load():602-605): GDCM,
      then DCMTK if GDCM fails; "DCMTK" is DCMTK only (slicer-core's ITK has no DCMTK ImageIO, so it fails);
    - loadFilesWithSeriesReader (:422-473): slicer-core's real vtkITKArchetypeImageSeriesScalarReader with
      SetArchetype/AddFileName/SetSingleFile(0)/native scalar type/native orientation/native origin and the GDCM
      ImageIO, a vtkImageChangeInformation to unit spacing and zero origin, a vtkMRMLScalarVolumeNode named
      GenerateUniqueName(name), SetMetaDataDictionaryFromReader, SetRASToIJKMatrix(reader.GetRasToIjkMatrix())
      and CreateDefaultDisplayNodes;
    - setVolumeNodeProperties (:475-580): the IJK right-handedness fix, the "DICOM.instanceUIDs" attribute
      (SOPInstanceUID from the database, "Unknown" if empty), the first WindowCenter/WindowWidth pairs as
      window/level presets. Not emulated: subject hierarchy, slice-view propagation, PET colours, quantity/units,
      the acquisition-geometry transform (none for one frame).
    - the default name: DICOMPlugin.defaultSeriesNodeName, "SeriesNumber: SeriesDescription" ("Unnamed Series"
      without a description), cleaned by cleanNodeName.

    What slicer-core's reader gives (pinned in Testing/slicer/test_stand_ins.py):
    - GDCM turns MONOCHROME1 into MONOCHROME2 on read (ITK GDCMImageIO::Read), so the voxels correlate at -1 with
      pydicom's stored `pixel_array`;
    - spacing of CR/DX (ComputedRadiography/DigitalXRay storage): GDCM takes ImagerPixelSpacing (0018,1164) only
      and otherwise uses 1.0, ignoring PixelSpacing (0028,0030) (GDCM gdcmImageHelper.cxx, the ITK that Slicer
      bundles); the origin is 0 and IJK->RAS is diag(-1, -1, 1) times the spacing (LPS to RAS).
    """
    import slicer
    import vtk

    path = str(Path(path).resolve())
    database = dicom_database()
    database.insert(path)
    if name is None:
        series = database.fileValue(path, "0020,000E")
        first = (database.filesForSeries(series, 1) or [path])[0]
        description = database.fileValue(first, "0008,103E") or "Unnamed Series"
        number = database.fileValue(first, "0020,0011")
        name = f"{number}: {description}" if number else description
        for bad, good in (("|", "-"), ("/", "-"), ("\\", "-"), ("*", "(star)")):
            name = name.replace(bad, good)
    if approach == "GDCM":
        reader = _series_reader(path, "GDCM") or _series_reader(path, "DCMTK")
    else:
        reader = _series_reader(path, approach)
    if reader is None:
        raise RuntimeError(f"Could not read scalar volume using {approach} approach: {path}")

    change = vtk.vtkImageChangeInformation()
    change.SetInputConnection(reader.GetOutputPort())
    change.SetOutputSpacing(1, 1, 1)
    change.SetOutputOrigin(0, 0, 0)
    change.Update()
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(name))
    volume.SetAndObserveImageData(change.GetOutputDataObject(0))
    slicer.vtkMRMLVolumeArchetypeStorageNode.SetMetaDataDictionaryFromReader(volume, reader)
    volume.SetRASToIJKMatrix(reader.GetRasToIjkMatrix())
    volume.CreateDefaultDisplayNodes()

    ijkToRas = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijkToRas)
    if not slicer.vtkMRMLVolumeNode.IsIJKCoordinateSystemRightHanded(ijkToRas):
        slicer.vtkMRMLVolumeNode.ReverseSliceOrder(volume.GetImageData(), ijkToRas)
        volume.SetIJKToRASMatrix(ijkToRas)
    volume.SetAttribute("DICOM.instanceUIDs", database.fileValue(path, "0008,0018") or "Unknown")
    display = volume.GetScalarVolumeDisplayNode()
    centers, widths = database.fileValue(path, "0028,1050"), database.fileValue(path, "0028,1051")
    if display and (centers or widths):
        centers, widths = centers.split("\\"), widths.split("\\")
        if len(centers) == len(widths):
            for center, width in zip(centers, widths):
                display.AddWindowLevelPreset(float(width), float(center))
            display.SetWindowLevelFromPreset(0)
    return volume


def load_volume_file(path: str | Path, properties: dict | None = None):
    """`slicer.util.loadVolume(path, properties)` as "Add Data" does it for any file, a .dcm included: the
    Volumes module's reader (qSlicerVolumesReader::load, v5.8.1) turns the properties into loading options
    (labelmap 1, center 2, singleFile 4, autoWindowLevel 8, discardOrientation 16) and calls slicer-core's real
    vtkSlicerVolumesLogic::AddArchetypeVolume. The Add Data dialog ticks Single File for a name that is not just
    a number (qSlicerVolumesIOOptionsWidget::setFileNames), so the default here is {"singleFile": True}.

    For a CR/DX .dcm this reads through the same GDCM ImageIO, so it gives what `load_dicom_volume` gives
    (MONOCHROME1 inverted, CR/DX spacing from ImagerPixelSpacing or 1.0) but no DICOM attributes and no
    database entry; the storage node names the file. Without singleFile, slicer-core's reader fails on a CR whose
    PixelSpacing is 0 ("Zero-valued spacing is not supported"): the series path is used.
    """
    import slicer

    properties = {"singleFile": True} if properties is None else dict(properties)
    options = 0
    for key, bit in (
        ("labelmap", 1),
        ("center", 2),
        ("singleFile", 4),
        ("autoWindowLevel", 8),
        ("discardOrientation", 16),
    ):
        if properties.get(key):
            options |= bit
    name = properties.get("name") or Path(path).name.split(".")[0]
    node = slicer.modules.volumes.logic().AddArchetypeVolume(str(path), name, options)
    if node is None:
        raise RuntimeError(f"Failed to load volume: {path}")
    return node


# --------------------------------------------------------------------------------------------------------------
# The GIL as real Slicer's main thread holds it
# --------------------------------------------------------------------------------------------------------------
# Slicer never enables PythonQt's GIL support: commontk/PythonQt (patched-9, db525aff, which CTK 82cae578 and so
# Slicer v5.8.1 pin) src/PythonQtThreadSupport.cpp:45 `PythonQtGILScope::_enableGILScope = false` and
# src/PythonQtMethodInfo.cpp:50 `_globalShouldAllowThreads = false`; no Slicer release calls
# setEnableThreadSupport. So the main thread keeps the GIL while it waits in Qt's C++ event loop, and a Python
# worker thread runs only while the main thread executes Python (timer callbacks, slots), in switch-interval
# slices. PySide6, by contrast, releases the GIL in its event loop. These helpers restore Slicer's behaviour.

_PYDLL = None


def _pydll_self():
    """The C library through ctypes.PyDLL (whose calls keep the GIL), opened once: dlopen itself releases it."""
    global _PYDLL
    if _PYDLL is None:
        import ctypes

        _PYDLL = ctypes.PyDLL("kernel32" if sys.platform == "win32" else None)
    return _PYDLL


def idle_holding_gil(seconds: float) -> None:
    """Sleep in C without releasing the GIL (ctypes.PyDLL calls keep it), as Slicer's idle main thread does."""
    if sys.platform == "win32":
        _pydll_self().Sleep(int(seconds * 1000))
    else:
        _pydll_self().usleep(int(seconds * 1e6))


def _event_loop_exec_holding_gil():
    """QEventLoop::exec(flags) from PySide6's own QtCore library, called through ctypes.PyDLL so that the whole
    C++ event loop, its idle waits included, runs with the GIL held, as PythonQt's does; None where the library
    or its symbol cannot be found (then spin_like_slicer falls back to turns of processEvents)."""
    import ctypes

    import PySide6

    candidates = [
        Path(PySide6.__file__).parent / "Qt" / "lib" / "libQt6Core.so.6",
        Path(PySide6.__file__).parent / "Qt" / "lib" / "QtCore.framework" / "QtCore",
    ]
    for library in candidates:
        if library.exists():
            try:
                function = ctypes.PyDLL(str(library))._ZN10QEventLoop4execE6QFlagsINS_17ProcessEventsFlagEE
            except (OSError, AttributeError):
                continue
            function.argtypes = [ctypes.c_void_p, ctypes.c_int]
            function.restype = ctypes.c_int
            return function
    return None


def spin_like_slicer(application, condition, timeout: float, tick: float = 0.1) -> float:
    """Run Qt's event loop as real Slicer's main thread runs it until `condition()` is true, and return the longest
    time between two turns (seconds); TimeoutError after `timeout` seconds.

    The loop is Qt's own C++ QEventLoop, entered through ctypes.PyDLL so that it holds the GIL all the time,
    waits included. Python runs on the main thread only in callbacks: the module's own timers and slots, and a
    `tick`-second QTimer (like a module's polling timer) that checks `condition` and records the time since the
    previous tick. So a worker thread gets the GIL only in switch-interval slices while the main thread runs
    Python, as in Slicer. A main-thread callback that blocks for S seconds shows as a gap of about max(tick, S).

    Fallback where Qt's symbol is unavailable: turns of `application.processEvents()` and
    `idle_holding_gil(tick)` (PySide6's processEvents releases the GIL for its duration, so this is more
    forgiving).
    """
    import time

    from PySide6.QtCore import QEventLoop, Qt, QTimer

    start = time.perf_counter()
    if condition():
        return 0.0
    deadline = start + timeout
    state = {"last": start, "longest": 0.0, "error": None, "met": False}
    exec_holding_gil = _event_loop_exec_holding_gil()
    loop = QEventLoop()

    def turn():
        now = time.perf_counter()
        state["longest"] = max(state["longest"], now - state["last"])
        state["last"] = now
        try:
            state["met"] = bool(condition())
        except BaseException as error:  # noqa: BLE001 - re-raised below, outside Qt
            state["error"] = error
        if state["met"] or state["error"] is not None or now > deadline:
            loop.exit(0)

    if exec_holding_gil is not None:
        import shiboken6

        timer = QTimer()
        timer.setTimerType(Qt.TimerType.PreciseTimer)
        timer.timeout.connect(turn)
        timer.start(max(1, int(round(tick * 1000))))
        try:
            exec_holding_gil(shiboken6.getCppPointer(loop)[0], 0)
        finally:
            timer.stop()
    else:
        while True:
            application.processEvents()
            idle_holding_gil(tick)
            turn()
            if state["met"] or state["error"] is not None or time.perf_counter() > deadline:
                break
    if state["error"] is not None:
        raise state["error"]
    if not state["met"]:
        raise TimeoutError(f"condition not met within {timeout} s (longest gap between turns {state['longest']:.2f} s)")
    return state["longest"]
