"""The stand-ins in Testing/slicer/support behave as real Slicer does, where the module can tell the difference.

Each test pins one behaviour against the Slicer/CTK/PythonQt source that the stand-in names:
- parameterNodeWrapper: Slicer Base/Python/slicer/parameterNodeWrapper/ (wrapper.py, serializers.py,
  validators.py, guiConnectors.py, util.py) at v5.6.2, v5.8.1, v5.10.0, v5.12.0;
- ctkDirectoryButton: CTK Libs/Widgets/ctkDirectoryButton.cpp at the commits Slicer 5.8.1 and 5.10.0 pin;
- load_dicom_volume / load_volume_file: Modules/Scripted/DICOMPlugins/DICOMScalarVolumePlugin.py and
  qSlicerVolumesReader.cxx (v5.8.1), on slicer-core's real vtkITK reader;
- slicer.app.coreIOManager() (io_manager.py) and SampleData: qSlicerCoreIOManager.cxx, DICOM.py's
  DICOMFileReader and SampleData.py (v5.12.3, v5.8.1, v5.6.2);
- idle_holding_gil / spin_like_slicer: commontk/PythonQt src/PythonQtThreadSupport.cpp (`_enableGILScope = false`);
- ScriptedLoadableModule: Base/Python/slicer/ScriptedLoadableModule.py and slicer.util.reloadScriptedModule.
"""

from __future__ import annotations

import sys
import textwrap
import threading
import time
import types
import unittest
from pathlib import Path
from typing import Annotated, Optional, Union

import numpy as np
import pytest
from conftest import importorskip  # a failure, not a skip, under LUNGSEG_REQUIRE_DATA=1

importorskip(
    "slicer_core",
    reason="slicer-core is not installed (scripts/setup.sh test installs it from Testing/requirements-slicer.txt)",
)
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
import slicer_app  # noqa: E402

slicer, application = slicer_app.start_gui()
import ctk  # noqa: E402
import qMRMLWidgets  # noqa: E402
import qt  # noqa: E402
from slicer import parameterNodeWrapper as pnw  # noqa: E402
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper  # noqa: E402
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest  # noqa: E402

NONE_MESSAGE = "Unable to write value 'None' of type '<class 'NoneType'>'"


@pytest.fixture(autouse=True)
def clear_scene():
    yield
    slicer.mrmlScene.Clear()
    slicer.dicomDatabase = None


def new_parameter_node():
    return slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")


@parameterNodeWrapper
class Parameters:
    inputVolume: Optional[Union[slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLVectorVolumeNode]]
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    model: str = "unet"
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    uncertainty: bool = False
    count: int
    scale: float = 0.5


# ---------------------------------------------------------------------------------------- parameterNodeWrapper
def test_wrapper_writes_every_default_at_construction():
    """wrapper.py _initMethod: each parameter not yet in the node is written with its default, through its
    serializer (NodeSerializer: "" marker plus a reference; Optional Union: its None member under "name.2")."""
    node = new_parameter_node()
    Parameters(node)
    assert sorted(node.GetParameterNames()) == sorted(
        ["inputVolume.2", "outputSegmentation", "model", "device", "uncertainty", "count", "scale"]
    )
    assert node.GetParameter("inputVolume.2") == "True"  # NoneSerializer's marker (a BoolSerializer)
    assert node.GetParameter("outputSegmentation") == "" and node.GetNodeReference("outputSegmentation") is None
    assert [node.GetParameter(n) for n in ("model", "device", "uncertainty", "count", "scale")] == [
        "unet",
        "auto",
        "False",
        "0",
        "0.5",
    ]
    # an existing value is kept by a second wrapper
    node.SetParameter("model", "unet-full-extent")
    assert Parameters(node).model == "unet-full-extent"


def test_union_without_none_raises_at_construction():
    """UnionSerializer: the default of Union[A, B] is A's default (None), and _findBestSerializer(None) finds no
    member that serializes NoneType; the class itself decorates fine."""

    @parameterNodeWrapper
    class Strict:
        inputVolume: Union[slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLVectorVolumeNode]

    with pytest.raises(TypeError) as raised:
        Strict(new_parameter_node())
    assert str(raised.value) == NONE_MESSAGE


def test_optional_union_stores_none_and_a_vector_volume():
    parameters = Parameters(new_parameter_node())
    node = parameters.parameterNode
    assert parameters.inputVolume is None
    vector = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVectorVolumeNode")
    parameters.inputVolume = vector
    assert parameters.inputVolume is vector
    # the first member that accepts it: vtkMRMLVectorVolumeNode is a vtkMRMLScalarVolumeNode
    assert node.GetNodeReference("inputVolume.0") is vector and not node.HasParameter("inputVolume.2")
    parameters.inputVolume = None
    assert parameters.inputVolume is None and node.HasParameter("inputVolume.2")
    assert not node.HasParameter("inputVolume.0")
    with pytest.raises(TypeError, match="Value must be of type"):  # IsInstance of the member that fits the type
        parameters.inputVolume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(TypeError, match="Unable to write value"):
        parameters.inputVolume = "vtkMRMLScalarVolumeNode1"
    with pytest.raises(TypeError, match="Value must be of type"):  # plain node type: IsInstance
        parameters.outputSegmentation = vector
    parameters.outputSegmentation = None  # IsInstance lets None pass


def test_choice_refuses_values_outside_it():
    parameters = Parameters(new_parameter_node())
    with pytest.raises(ValueError, match="must be in one of the following"):
        parameters.device = "gpu"
    with pytest.raises(ValueError):
        parameters.setValue("device", "gpu")
    assert parameters.device == "auto"
    with pytest.raises(TypeError):  # StringSerializer's IsInstance(str)
        parameters.model = 3

    @parameterNodeWrapper
    class BadDefault:
        device: Annotated[str, Choice(["cpu"])] = "auto"

    with pytest.raises(ValueError):
        BadDefault(new_parameter_node())


def test_node_selector_gets_the_node_types_without_none():
    assert pnw.getNodeTypes(Parameters.dataType("inputVolume")) == (
        "vtkMRMLScalarVolumeNode",
        "vtkMRMLVectorVolumeNode",
    )
    selector = qMRMLWidgets.qMRMLNodeComboBox()
    selector.setMRMLScene(slicer.mrmlScene)
    Parameters(new_parameter_node()).connectParametersToGui({"inputVolume": selector})
    assert selector.nodeTypes == ["vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"]


def make_gui():
    """A `self.ui`-like object (connectGui reads its __dict__) with the widget kinds the panel binds."""
    ui = types.SimpleNamespace(
        uncertaintyCheckBox=qt.QCheckBox(), deviceComboBox=qt.QComboBox(), modelLabel=qt.QLabel()
    )
    ui.uncertaintyCheckBox.setProperty("SlicerParameterName", "uncertainty")
    ui.deviceComboBox.setProperty("SlicerParameterName", "device")
    return ui


def test_gui_connectors_follow_and_update_the_parameters():
    parameters = Parameters(new_parameter_node())
    ui = make_gui()
    parameters.connectParametersToGui({"uncertainty": ui.uncertaintyCheckBox, "device": ui.deviceComboBox})
    assert [ui.deviceComboBox.itemText(i) for i in range(ui.deviceComboBox.count())] == ["auto", "cpu", "cuda"]
    ui.uncertaintyCheckBox.setChecked(True)
    ui.deviceComboBox.setCurrentIndex(1)
    assert parameters.uncertainty is True and parameters.device == "cpu"
    parameters.device = "cuda"
    assert ui.deviceComboBox.currentIndex() == 2
    # a QComboBox bound to a str without Choice: QComboBoxToStringableConnector.create raises
    with pytest.raises(RuntimeError, match="requires the Choice annotation"):
        parameters.connectParametersToGui({"model": qt.QComboBox()})
    # a widget that names no parameter: _checkParamName
    stray = qt.QCheckBox()
    stray.setProperty("SlicerParameterName", "noSuchParameter")
    with pytest.raises(ValueError, match="Cannot find a param"):
        parameters.connectGui(types.SimpleNamespace(stray=stray))


def test_connect_gui_returns_none_on_5_8_and_a_tag_on_5_10(monkeypatch):
    monkeypatch.setattr(pnw, "SLICER_VERSION", (5, 8))
    parameters = Parameters(new_parameter_node())
    assert parameters.connectGui(make_gui()) is None
    assert len(parameters._parameterGUIs) == 1
    parameters.disconnectGui(None)  # what a module does with that None: nothing
    assert len(parameters._parameterGUIs) == 1

    monkeypatch.setattr(pnw, "SLICER_VERSION", (5, 10))
    parameters = Parameters(new_parameter_node())
    widget = qt.QWidget()  # a widget: findChildren
    box = qt.QCheckBox(widget)
    box.setProperty("SlicerParameterName", "uncertainty")
    tag = parameters.connectGui(widget)
    assert isinstance(tag, int) and parameters._parameterGUIs[tag]
    parameters.disconnectGui(tag)
    assert parameters._parameterGUIs == {}
    box.setChecked(True)  # the connector's callback is gone
    assert parameters.uncertainty is False


@pytest.mark.parametrize("version, per_change", [((5, 6), 2), ((5, 8), 2), ((5, 10), 2), ((5, 12), 1)])
def test_gui_observers_pile_up_before_5_12(monkeypatch, version, per_change):
    """Connect, disconnect with what connectGui returned, connect again (as a module's enter() does twice):
    the ModifiedEvent observer of the first connection stays before v5.12.0 (_guiVtkObserverTags), so every
    parameter change rewrites the GUI twice."""
    monkeypatch.setattr(pnw, "SLICER_VERSION", version)
    parameters = Parameters(new_parameter_node())
    tag = parameters.connectGui(make_gui())
    parameters.disconnectGui(tag)
    parameters.connectGui(make_gui())
    before = pnw.guiUpdates
    parameters.uncertainty = True
    assert pnw.guiUpdates - before == per_change
    before = pnw.guiUpdates
    parameters.device = "cpu"
    assert pnw.guiUpdates - before == per_change


def test_version_follows_the_environment(monkeypatch):
    monkeypatch.setenv("LUNGSEG_TEST_SLICER_VERSION", "5.10")
    assert pnw._versionFromEnvironment() == (5, 10)
    monkeypatch.delenv("LUNGSEG_TEST_SLICER_VERSION")
    assert pnw._versionFromEnvironment() == (5, 8)


# ------------------------------------------------------------------------------------------ ctkDirectoryButton
@pytest.mark.parametrize("version", [(5, 8), (5, 10)])
def test_directory_button_defaults_to_dot_and_signals_only_changes(monkeypatch, tmp_path, version):
    monkeypatch.setattr(pnw, "SLICER_VERSION", version)
    button = ctk.ctkDirectoryButton()
    assert button.directory == "."  # QDir().path(), never ""
    changed, selected = [], []
    button.directoryChanged.connect(changed.append)
    button.directorySelected.connect(selected.append)
    button.setDirectory("")  # QDir("") == QDir(): no change
    button.setDirectory(".")
    assert changed == [] and len(selected) == 2
    button.setDirectory(str(tmp_path))
    button.setDirectory(str(tmp_path) + "/")  # the same folder
    assert changed == [str(tmp_path)] and button.directory == str(tmp_path)
    monkeypatch.chdir(tmp_path.parent)
    button.setDirectory("..")
    # CTK before 5f750c88 (Slicer 5.6/5.8) keeps the path as given; from it (5.10+) the absolute path
    assert button.directory == (".." if version < (5, 10) else str(tmp_path.parent.parent))
    assert changed[-1] == str(tmp_path.parent.parent)


# ------------------------------------------------------------------------------------------------------ DICOM
@pytest.fixture(scope="module")
def cr_file():
    from lungseg.samples import chest_dicom

    path = chest_dicom()
    if path is None:
        from conftest import require_or_skip

        require_or_skip("pydicom-data (RG1_UNCR.dcm) is not installed")
    return Path(path)


def spacing(volume):
    return tuple(round(s, 6) for s in volume.GetSpacing())


def test_dicom_loader_inverts_monochrome1_and_registers_the_instance(cr_file):
    import pydicom
    import vtk

    dataset = pydicom.dcmread(str(cr_file))
    assert dataset.PhotometricInterpretation == "MONOCHROME1"
    volume = slicer_app.load_dicom_volume(cr_file)
    voxels = slicer.util.arrayFromVolume(volume)
    assert voxels.shape == (1, 1955, 1841) and voxels.dtype == np.uint16
    r = np.corrcoef(voxels[0].ravel().astype(float), dataset.pixel_array.ravel().astype(float))[0, 1]
    assert r < -0.999  # GDCM turned MONOCHROME1 into MONOCHROME2
    assert spacing(volume) == (1.0, 1.0, 1.0)  # CR: no ImagerPixelSpacing (PixelSpacing is 0\0 here): 1.0
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), np.diag([-1.0, -1.0, 1.0, 1.0]), atol=1e-9)
    assert volume.GetName() == "1: Unnamed Series"
    uid = volume.GetAttribute("DICOM.instanceUIDs")
    assert uid == dataset.SOPInstanceUID
    assert slicer.dicomDatabase.fileForInstance(uid) == str(cr_file.resolve())
    assert slicer.dicomDatabase.fileValue(str(cr_file), "0028,0004") == "MONOCHROME1"
    assert volume.GetStorageNode() is None  # the DICOM module leaves no storage node
    assert volume.GetScalarVolumeDisplayNode().GetNumberOfWindowLevelPresets() == 1


def small_cr(source, path, **attributes):
    """A 64x48 crop of the CR with the given header attributes (None deletes one)."""
    import pydicom

    dataset = pydicom.dcmread(str(source))
    pixels = np.ascontiguousarray(dataset.pixel_array[900:948, 900:964])
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.PixelData = pixels.tobytes()
    for key, value in attributes.items():
        if value is None:
            if key in dataset:
                delattr(dataset, key)
        else:
            setattr(dataset, key, value)
    dataset.save_as(str(path))
    return path


def test_gdcm_takes_cr_spacing_from_imager_pixel_spacing_only(cr_file, tmp_path):
    """GDCM's rule for CR/DX storage: ImagerPixelSpacing, else 1.0; PixelSpacing is ignored."""
    only_pixel = small_cr(cr_file, tmp_path / "pixel.dcm", PixelSpacing=[0.15, 0.15], ImagerPixelSpacing=None)
    assert spacing(slicer_app.load_dicom_volume(only_pixel)) == (1.0, 1.0, 1.0)
    imager = small_cr(
        cr_file,
        tmp_path / "imager.dcm",
        PixelSpacing=[0.15, 0.15],
        ImagerPixelSpacing=[0.2, 0.3],
        SOPInstanceUID="1.2.3.4.5",
    )
    volume = slicer_app.load_dicom_volume(imager)
    assert spacing(volume) == (0.3, 0.2, 1.0)  # (column, row): ImagerPixelSpacing is row\column
    assert slicer.dicomDatabase.fileForInstance("1.2.3.4.5") == str(imager.resolve())


def test_plain_file_loader_reads_the_dcm_like_the_dicom_module_without_its_attributes(cr_file):
    dicom = slicer_app.load_dicom_volume(cr_file)
    plain = slicer_app.load_volume_file(cr_file)
    assert plain.GetName() == "RG1_UNCR"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(plain), slicer.util.arrayFromVolume(dicom))
    assert spacing(plain) == (1.0, 1.0, 1.0)
    assert plain.GetAttribute("DICOM.instanceUIDs") is None
    assert plain.GetStorageNode().GetFileName() == str(cr_file)


# ---------------------------------------------------------------------------------------- IO manager, SampleData
def test_io_manager_gives_a_dcm_to_the_dicom_import_which_loads_nothing(cr_file, tmp_path):
    """qSlicerCoreIOManager ranks readers by confidence: the DICOM module's 0.6 beats the Volumes reader's 0.54
    for a .dcm; the DICOM import loads the folder into the database and no node; a PNG is a VolumeFile."""
    import shutil

    import vtk

    from lungseg.samples import sample_pngs

    manager = slicer.app.coreIOManager()
    dcm, png = tmp_path / "chest.dcm", tmp_path / "chest.png"
    shutil.copy(cr_file, dcm)
    shutil.copy(sample_pngs()[0], png)
    assert manager.fileType(str(dcm)) == "DICOMFileImport" and manager.fileType(str(png)) == "VolumeFile"
    assert manager.fileType(str(tmp_path / "absent.dcm")) == "NoFile"
    nodes = vtk.vtkCollection()
    assert manager.loadNodes("DICOMFileImport", {"fileName": str(dcm)}, nodes) and nodes.GetNumberOfItems() == 0
    assert slicer.dicomDatabase.fileForInstance(slicer.dicomDatabase.instanceForFile(str(dcm))) == str(dcm)
    assert manager.loadNodes("VolumeFile", {"fileName": str(dcm), "singleFile": True}, nodes)
    assert nodes.GetItemAsObject(0).IsA("vtkMRMLScalarVolumeNode")


@pytest.mark.parametrize("version", [(5, 6), (5, 8)])
def test_sample_data_registration_takes_each_versions_arguments(monkeypatch, version):
    import SampleData

    monkeypatch.setattr(pnw, "SLICER_VERSION", version)
    monkeypatch.setattr(slicer.modules, "sampleDataSources", {}, raising=False)
    register = SampleData.SampleDataLogic.registerCustomSampleDataSource
    register(sampleName="a", uris="https://x/a.dcm", fileNames="a.dcm", nodeNames="a")
    register(sampleName="b", uris="https://x/b.dcm", fileNames="b.dcm", nodeNames="b", loadFileType="VolumeFile")
    a, b = slicer.modules.sampleDataSources["Custom"]
    assert a.loadFileTypes == ["VolumeFile" if version < (5, 8) else None] and b.loadFileTypes == ["VolumeFile"]
    with pytest.raises(TypeError if version < (5, 8) else ValueError):
        register(
            sampleName="c",
            uris="https://x/c.dcm",
            fileNames="c.dcm",
            loadFileType="VolumeFile",
            loadFileTypes="VolumeFile",
        )


# -------------------------------------------------------------------------------------------------------- GIL
def count_in_thread(body):
    """(iterations, longest pause in seconds) of a pure-Python worker thread while `body()` runs on this one."""
    progress, stamps, stop = [0], [], [False]

    def work():
        while not stop[0]:
            progress[0] += 1
            if progress[0] % 512 == 0:
                stamps.append(time.perf_counter())

    worker = threading.Thread(target=work)
    worker.start()
    time.sleep(0.05)  # let it start
    before, start = progress[0], time.perf_counter()
    body()
    after, end = progress[0], time.perf_counter()
    stop[0] = True
    worker.join()
    inside = [start] + [t for t in stamps if start < t < end] + [end]
    return after - before, max(np.diff(inside))


def test_idle_holding_gil_starves_a_python_worker():
    free, free_pause = count_in_thread(lambda: time.sleep(0.5))
    held, held_pause = count_in_thread(lambda: slicer_app.idle_holding_gil(0.5))
    assert free > 10_000 and free_pause < 0.4
    assert held_pause > 0.45  # the worker did not run at all while the main thread idled holding the GIL
    assert held < 0.05 * free  # only the switch-interval slices at either end


def test_spin_like_slicer_holds_the_gil_and_measures_stalls():
    # a main-thread callback that blocks the event loop for 0.4 s (time.sleep, like a synchronous compute)
    blocked = []
    qt.QTimer.singleShot(50, lambda: (time.sleep(0.4), blocked.append(True)))
    start = time.perf_counter()
    longest = slicer_app.spin_like_slicer(application, lambda: time.perf_counter() - start > 0.7, timeout=5)
    assert blocked and 0.38 < longest < 0.75
    assert slicer_app.spin_like_slicer(application, lambda: True, timeout=1) == 0.0
    with pytest.raises(TimeoutError):
        slicer_app.spin_like_slicer(application, lambda: False, timeout=0.3)
    # a worker thread gets little of the GIL while the loop idles, far less than while this thread sleeps
    free, _ = count_in_thread(lambda: time.sleep(0.5))
    end = time.perf_counter() + 0.55
    spun, _ = count_in_thread(lambda: slicer_app.spin_like_slicer(application, lambda: time.perf_counter() > end, 5))
    assert spun < 0.5 * free


# -------------------------------------------------------------------------------------- ScriptedLoadableModule
def test_slicer_version_properties(monkeypatch):
    monkeypatch.delenv("LUNGSEG_TEST_SLICER_VERSION", raising=False)
    monkeypatch.setattr(pnw, "SLICER_VERSION", pnw._versionFromEnvironment())
    assert (slicer.app.majorVersion, slicer.app.minorVersion) == (5, 8)
    monkeypatch.setattr(pnw, "SLICER_VERSION", (5, 12))
    assert (slicer.app.majorVersion, slicer.app.minorVersion) == (5, 12)
    app = slicer_app.TestingApp()
    app.minorVersion = 6
    assert (app.majorVersion, app.minorVersion) == (5, 6)


def test_skip_test_is_unittests():
    assert ScriptedLoadableModuleTest.skipTest is unittest.TestCase.skipTest


def test_developer_reload_reexecutes_the_module_and_sets_up_a_new_widget(tmp_path):
    from slicer import ScriptedLoadableModule as slm

    source = tmp_path / "ReloadProbe.py"
    template = textwrap.dedent("""
        import qt
        from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
        VERSION = {version}
        cleaned = []

        class ReloadProbeWidget(ScriptedLoadableModuleWidget):
            def setup(self):
                self.label = qt.QLabel(str(VERSION))
                self.layout.addWidget(self.label)

            def cleanup(self):
                cleaned.append(VERSION)
        """)
    source.write_text(template.format(version=1))
    sys.path.insert(0, str(tmp_path))
    try:
        import ReloadProbe

        first = ReloadProbe.ReloadProbeWidget()
        first.setup()
        assert slicer.modules.ReloadProbeWidget is first
        assert slicer.modules.reloadprobe.widgetRepresentation() is first.parent
        source.write_text(template.format(version=2))
        first.onReload()
        assert slm.reloadedModules[-1] == "ReloadProbe"
        assert ReloadProbe.cleaned == [1]  # the old widget's cleanup()
        second = slicer.modules.ReloadProbeWidget
        assert second is not first and second.parent is first.parent
        assert sys.modules["ReloadProbe"].VERSION == 2 and second.label.text() == "2"
        assert first.label.isHidden()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ReloadProbe", None)
        for attribute in ("ReloadProbeWidget", "reloadprobe"):
            if hasattr(slicer.modules, attribute):
                delattr(slicer.modules, attribute)
