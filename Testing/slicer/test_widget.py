"""The LungSeg panel with PySide6 offscreen: the .ui loads, its widgets exist, Apply reaches the logic without
freezing the GUI, export and the batch section work, and the screenshot renders."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import importorskip  # a failure, not a skip, under LUNGSEG_REQUIRE_DATA=1

importorskip("slicer_core", reason="slicer-core is not installed (scripts/setup.sh test)")
importorskip("PySide6", reason="PySide6 is not installed (scripts/setup.sh test)")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Testing" / "slicer" / "support"))
import slicer_app  # noqa: E402

slicer, application = slicer_app.start_gui()
import qt  # noqa: E402  (the PySide6 stand-in)

from lungseg.samples import sample_pngs  # noqa: E402

from LungSeg import LungSegWidget  # noqa: E402
from LungSegLib.BatchProcess import BatchProcess  # noqa: E402

UI = REPO / "LungSegExtension" / "LungSeg" / "Resources" / "UI" / "LungSeg.ui"
NAMED = {
    "inputSelector": "qMRMLNodeComboBox",
    "modelComboBox": "QComboBox",
    "deviceComboBox": "QComboBox",
    "uncertaintyCheckBox": "QCheckBox",
    "outputSelector": "qMRMLNodeComboBox",
    "uncertaintySelector": "qMRMLNodeComboBox",
    "applyButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "exportButton": "QPushButton",
    "batchCollapsibleButton": "ctkCollapsibleButton",
    "batchInputDirectoryButton": "ctkDirectoryButton",
    "batchOutputDirectoryButton": "ctkDirectoryButton",
    "batchRunButton": "QPushButton",
    "batchCancelButton": "QPushButton",
    "batchProgressBar": "QProgressBar",
    "batchStatusLabel": "QLabel",
}


@pytest.fixture
def module_widget():
    volume = slicer_app.load_volume(sample_pngs()[0], "chest")
    widget = LungSegWidget()
    widget.setup()
    yield widget, volume
    widget.cleanup()
    slicer.mrmlScene.Clear()


def spin(condition, timeout=120.0):
    """Run Slicer's event loop, as emulated in slicer_app (the main thread holds the GIL while idle), until
    `condition()`; returns the longest time between two event-loop turns."""
    return slicer_app.spin_like_slicer(application, condition, timeout)


def test_ui_loads_with_its_named_widgets():
    widget = slicer.util.loadUI(str(UI))
    ui = slicer.util.childWidgetVariables(widget)
    for name, className in NAMED.items():
        assert getattr(ui, name).metaObject().className() == className, name
    bound = {
        name: getattr(ui, name).property("SlicerParameterName")
        for name in ("inputSelector", "outputSelector", "deviceComboBox", "uncertaintyCheckBox", "uncertaintySelector")
    }
    assert bound == {
        "inputSelector": "inputVolume",
        "outputSelector": "outputSegmentation",
        "deviceComboBox": "device",
        "uncertaintyCheckBox": "uncertainty",
        "uncertaintySelector": "uncertaintyVolume",
    }
    assert ui.inputSelector.nodeTypes == ["vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"]
    assert ui.batchCollapsibleButton.collapsed


def test_models_are_grouped_by_lung_definition(module_widget):
    widget, _ = module_widget
    combo = widget.panel.ui.modelComboBox
    texts = [combo.itemText(i) for i in range(combo.count())]
    assert texts[0].startswith("Lung fields") and "    unet" in texts
    header = combo.model().index(0, 0)
    assert not combo.model().flags(header) & qt.Qt.ItemIsEnabled  # a group title, not a choice
    assert combo.currentText().strip() == "unet"
    assert "lung fields" in widget.panel.ui.modelDefinitionLabel.text()


def test_apply_segments_on_the_main_thread_while_the_panel_shows_it_is_busy(module_widget, monkeypatch):
    """In Slicer the main thread holds the GIL while idle (PythonQt), so a worker thread would be starved: the
    segmentation is done when Apply returns, and the panel showed that it was busy before the model ran."""
    widget, volume = module_widget
    ui, parameterNode = widget.panel.ui, widget.logic.getParameterNode()
    assert parameterNode.inputVolume is volume and ui.inputSelector.currentNode() is volume
    # the parameter node's annotations set the selectors' node types
    assert ui.inputSelector.nodeTypes == ["vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"]
    assert ui.uncertaintySelector.nodeTypes == ["vtkMRMLScalarVolumeNode"]
    ui.deviceComboBox.setCurrentIndex(ui.deviceComboBox.findText("cpu"))
    ui.uncertaintyCheckBox.setChecked(True)
    assert (parameterNode.device, parameterNode.uncertainty) == ("cpu", True)
    assert ui.applyButton.isEnabled()

    seen = []
    compute = widget.logic.compute

    def spy(*args, **kwargs):
        seen.append(
            (ui.progressBar.maximum(), ui.applyButton.isEnabled(), ui.batchRunButton.isEnabled(), ui.statusLabel.text())
        )
        return compute(*args, **kwargs)

    monkeypatch.setattr(widget.logic, "compute", spy)
    ui.applyButton.click()
    ((maximum, applyEnabled, batchEnabled, message),) = seen
    assert maximum == 0 and not applyEnabled and not batchEnabled and "unet" in message  # busy, and says so

    segmentation = parameterNode.outputSegmentation
    assert ui.outputSelector.currentNode() is segmentation and segmentation.GetName() == "chest lungs"
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2  # done when the click returned
    uncertainty = slicer.util.arrayFromVolume(parameterNode.uncertaintyVolume)
    assert uncertainty.shape == slicer.util.arrayFromVolume(volume).shape
    status = ui.statusLabel.text()
    assert status == widget.logic.lastSummary.statusText()
    assert "Right lung" in status and "QC (lung-fields)" in status
    assert ui.applyButton.isEnabled() and ui.progressBar.maximum() == 1
    assert not [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]


def pretend_onnxruntime_is_missing(monkeypatch, installLogic):
    """The real InstallLogic with onnxruntime absent until a pip call 'installs' it (Slicer before 5.12: no
    slicer.packaging, so slicer.util.pip_install); the user confirms."""
    from LungSegLib import InstallLogic as install

    installed = {"onnxruntime": False}
    real = install.InstallLogic._installedVersion
    monkeypatch.setattr(
        install.InstallLogic,
        "_installedVersion",
        staticmethod(lambda name: real(name) if name != "onnxruntime" or installed["onnxruntime"] else None),
    )
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    confirmations = []
    monkeypatch.setattr(
        slicer.util,
        "confirmOkCancelDisplay",
        lambda *args, **kwargs: confirmations.append(args[0]) or True,
        raising=False,
    )
    return installed, confirmations


def test_a_second_click_during_installation_does_not_install_again(module_widget, monkeypatch):
    """slicer.util.pip_install processes events while pip runs (util.py logProcessOutput), so a second click reaches
    the panel: it must neither install again nor segment; after the one install, the first click segments."""
    widget, _ = module_widget
    panel, ui = widget.panel, widget.panel.ui
    installed, confirmations = pretend_onnxruntime_is_missing(monkeypatch, panel.installLogic)
    installs, states = [], []

    def pip_install(arguments):
        installs.append(arguments)
        states.append((ui.applyButton.isEnabled(), ui.batchRunButton.isEnabled(), ui.statusLabel.text()))
        panel.onApply()  # what processEvents would deliver
        panel.onRunBatch()
        installed["onnxruntime"] = True

    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    ui.applyButton.click()
    (arguments,) = installs
    assert arguments[0] == "-c" and arguments[2:] == ["onnxruntime>=1.19"]  # this venv has tqdm
    assert len(confirmations) == 1 and "onnxruntime>=1.19" in confirmations[0]
    assert states[0][:2] == (False, False) and "Python packages" in states[0][2]
    segmentation = widget.logic.getParameterNode().outputSegmentation
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2  # segmented once the install was done
    assert "Right lung" in ui.statusLabel.text() and ui.applyButton.isEnabled()

    # declined: nothing installed, nothing segmented, and the panel says why
    installed["onnxruntime"] = False
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *args, **kwargs: False)
    ui.applyButton.click()
    assert len(installs) == 1 and "not installed" in ui.statusLabel.text() and ui.applyButton.isEnabled()


def test_a_failed_installation_names_what_could_not_be_installed(module_widget, monkeypatch):
    """pip's resolution fails (e.g. Python 3.12 on an Intel Mac before macOS 11: no onnxruntime wheel; see
    test_install.py): the status line and the error dialog name onnxruntime, and the panel is usable again."""
    import subprocess

    widget, _ = module_widget
    panel, ui = widget.panel, widget.panel.ui
    pretend_onnxruntime_is_missing(monkeypatch, panel.installLogic)

    def pip_install(arguments):
        raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", *arguments])

    shown = []
    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: shown.append(text))
    monkeypatch.setattr(slicer.app, "testingEnabled", lambda: False)  # tryWithErrorDisplay shows nothing in tests
    with pytest.raises(RuntimeError, match=r"could not install onnxruntime>=1\.19"):
        panel.onApply()
    assert "could not install onnxruntime>=1.19" in ui.statusLabel.text()
    assert "Failed to segment" in shown[0] and "onnxruntime>=1.19" in shown[0]
    assert ui.applyButton.isEnabled() and ui.progressBar.maximum() == 1
    assert widget.logic.getParameterNode().outputSegmentation is None


def test_export_dialog_opens_in_a_folder_and_gives_the_chosen_filters_suffix(module_widget, tmp_path, monkeypatch):
    widget, volume = module_widget
    widget.logic.process(volume, slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode"), device="cpu")
    parameterNode = widget.logic.getParameterNode()
    parameterNode.outputSegmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    opened = []

    def choose(name, nameFilter):
        def exec_(dialog):  # the user picks a filter and types a name without a suffix
            opened.append(dialog.directory().absolutePath())
            dialog.selectNameFilter(nameFilter)
            dialog.filterSelected.emit(nameFilter)
            dialog.selectFile(str(tmp_path / name))
            return 1

        return exec_

    import SimpleITK as sitk

    monkeypatch.setattr(qt.QFileDialog, "exec_", choose("chest-lungs", "PNG (*.png)"))
    widget.panel.ui.exportButton.click()
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "chest-lungs.png")))
    assert set(np.unique(label)) == {0, 1, 2}
    assert "chest-lungs.png" in widget.panel.ui.statusLabel.text()
    # the first time in the radiograph's folder, not the working directory; then where the last export went
    assert opened[0] == str(sample_pngs()[0].parent)
    monkeypatch.setattr(qt.QFileDialog, "exec_", choose("again", "NIfTI (*.nii.gz)"))
    widget.panel.ui.exportButton.click()
    assert opened[1] == str(tmp_path) and (tmp_path / "again.nii.gz").is_file()


def test_export_dialog_proposes_a_file_name_windows_accepts(module_widget, monkeypatch):
    """The DICOM module names a volume "SeriesNumber: SeriesDescription" (DICOMLib/DICOMPlugin.py:281-295, Slicer
    v5.12.3); Windows refuses \\/:*?"<>| in a file name (and a trailing dot or space)."""
    widget, volume = module_widget
    volume.SetName("1: Unnamed Series")
    widget.logic.getParameterNode().outputSegmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    proposed = []

    def exec_(dialog):  # the user looks at the proposed name and cancels
        proposed.append(Path(dialog.selectedFiles()[0]).name)
        return 0

    monkeypatch.setattr(qt.QFileDialog, "exec_", exec_)
    widget.panel.ui.exportButton.click()
    assert proposed == ["1_ Unnamed Series-lungs.nrrd"]  # the first filter's suffix added by the dialog
    from LungSegLib.Widget import fileNameFor

    assert fileNameFor('a\\b/c:d*e?f"g<h>i|j\tk. .') == "a_b_c_d_e_f_g_h_i_j_k"


def fake_batch(lines, pause=0.0):
    script = "import time\n" + "".join(f"print({line!r}, flush=True)\ntime.sleep({pause})\n" for line in lines)
    process = BatchProcess([sys.executable, "-c", script])
    process.start()
    return process


def test_batch_section_shows_progress_and_cancels(module_widget, tmp_path, monkeypatch):
    widget, _ = module_widget
    ui, panel = widget.panel.ui, widget.panel
    calls = []

    def processFolder(inputDir, outputDir, **options):
        calls.append((inputDir, outputDir, options))
        return fake_batch([f"lungseg-progress {i}/3 {('check', 'error', 'ok')[i - 1]} /in/{i}.png" for i in (1, 2, 3)])

    monkeypatch.setattr(panel.logic, "processFolder", processFolder)
    # CTK's directory buttons show "." until a folder is picked: that is no choice
    assert ui.batchInputDirectoryButton.directory == "." and ui.batchOutputDirectoryButton.directory == "."
    ui.batchRunButton.click()
    assert not calls and panel._batch is None
    ui.batchInputDirectoryButton.directory = str(tmp_path)  # only the input folder: still refused
    ui.batchRunButton.click()
    assert not calls and panel._batch is None
    ui.batchOutputDirectoryButton.directory = str(tmp_path / "out")
    ui.batchRunButton.click()
    assert calls == [
        (
            str(tmp_path),
            str(tmp_path / "out"),
            {"model": "unet", "device": "auto", "overlays": True, "corrections": "turns,inversion,mirroring"},
        )
    ]
    spin(lambda: panel._batch is None, timeout=60)
    assert (ui.batchProgressBar.value(), ui.batchProgressBar.maximum()) == (3, 3)
    text = ui.batchStatusLabel.text()
    assert text.startswith("2 of 3 segmented, 1 failed; see results.csv") and text.endswith(
        "1 of the folder's 2 results flagged by QC to check: open review.html there."
    ), text  # no results.csv: counted

    monkeypatch.setattr(
        panel.logic,
        "processFolder",
        lambda *a, **k: fake_batch(
            ["lungseg-progress 1/3 ok /in/1.png", "lungseg-progress 2/3 ok /in/2.png"], pause=30
        ),
    )
    ui.batchRunButton.click()
    spin(lambda: panel._batch is not None and panel._batch.progress()[0] == 1, timeout=60)
    batch = panel._batch
    slicer.mrmlScene.Clear(0)  # File > Close Scene: the batch does not use the scene and goes on
    spin(lambda: True)
    assert panel._batch is batch and batch.running and not batch.cancelled
    ui.batchCancelButton.click()
    spin(lambda: panel._batch is None, timeout=60)
    assert ui.batchStatusLabel.text().startswith("Cancelled after 1 of 3")
    assert ui.batchRunButton.isEnabled()


def test_batch_accepts_the_folder_the_dialog_opens_in(module_widget, tmp_path, monkeypatch):
    """The folder dialog opens in the button's folder, "." (Slicer's working directory) until one is picked;
    accepting it there emits only directorySelected (ctkDirectoryButton.cpp:143-165), and it counts as a pick."""
    widget, _ = module_widget
    ui, panel = widget.panel.ui, widget.panel
    images = tmp_path / "images"
    images.mkdir()
    monkeypatch.chdir(images)  # Slicer started from a terminal in the images folder
    opened = []

    def accept(parent, caption, folder):  # the user clicks "Choose" without moving elsewhere
        opened.append(folder)
        return os.path.abspath(folder)

    monkeypatch.setattr(qt.QFileDialog, "getExistingDirectory", staticmethod(accept))
    calls = []
    monkeypatch.setattr(
        panel.logic,
        "processFolder",
        lambda inputDir, outputDir, **options: (
            calls.append((inputDir, outputDir)) or fake_batch(["lungseg-progress 1/1 ok /in/1.png"])
        ),
    )
    ui.batchInputDirectoryButton.click()
    assert opened == ["."] and ui.batchInputDirectoryButton.directory == "."  # unchanged, as in CTK
    ui.batchOutputDirectoryButton.directory = str(tmp_path / "out")
    ui.batchRunButton.click()
    assert calls == [(str(images), str(tmp_path / "out"))]
    spin(lambda: panel._batch is None, timeout=60)


# A PythonSlicer for the real processFolder (found on PATH, as shutil.which finds Slicer's): a real Python child
# that checks the command the panel gives it, reports one input, and ends as MODE says. The core's statuses
# (lungseg/cli.py): 0 all segmented, 1 some inputs failed (results.csv written), 2 usage error, 3 crash
# ("lungseg: internal error: ..." after the traceback); an exception that escapes Python also exits 1.
FAKE_PYTHONSLICER = """#!{python}
import os, signal, sys
assert sys.argv[1:4] == ["-m", "lungseg", "segment"] and "--progress-lines" in sys.argv, sys.argv
out, mode = sys.argv[sys.argv.index("-o") + 1], {mode!r}
print("loading model unet", flush=True)
print("lungseg-progress 1/3 ok /in/1.png", flush=True)


def pool():
    raise ValueError("cannot find context for 'fork'")  # what the core's pool hit on Windows (review 2, R3)


if mode == "some-failed":
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.csv"), "w") as f:
        f.write("input,status,qc\\n/in/1.png,ok,ok\\n/in/2.png,error,\\n")
    print("lungseg-progress 2/2 error /in/2.png", flush=True)
    sys.exit(1)
if mode == "usage":
    print("lungseg: error: no images found in " + sys.argv[4], file=sys.stderr, flush=True)
    sys.exit(2)
if mode == "internal-error":
    import traceback
    try:
        pool()
    except ValueError as error:
        traceback.print_exc()
        print("lungseg: internal error: " + repr(error), file=sys.stderr, flush=True)
        print(file=sys.stderr, flush=True)  # a trailing empty line: not the reason
        sys.exit(3)
if mode == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
pool()  # uncaught: a traceback on stderr, exit 1, no results.csv
"""
CRASH = "ValueError: cannot find context for 'fork'"
ENDINGS = {
    "traceback": f"Failed: {CRASH}",
    "traceback-after-an-earlier-run": f"Failed: {CRASH}",  # results.csv is there, but not from this run
    "internal-error": "Failed: lungseg: internal error: ValueError(\"cannot find context for 'fork'\")",
    "usage": "Failed: lungseg: error: no images found in ",
    "some-failed": "1 of 2 segmented, 1 failed; see results.csv in ",
}
if hasattr(signal, "SIGKILL"):  # POSIX
    ENDINGS["killed"] = "Failed: killed by SIGKILL; last output: lungseg-progress 1/3 ok /in/1.png"


@pytest.mark.parametrize("mode", list(ENDINGS))
def test_batch_child_that_crashes_is_reported_as_a_failure(module_widget, tmp_path, monkeypatch, mode):
    """Through the real processFolder and BatchProcess: a crashed or killed child is a failure with its last
    output line, not "N of M segmented; see results.csv", which would point to a file it did not write."""
    widget, _ = module_widget
    ui, panel = widget.panel.ui, widget.panel
    (tmp_path / "bin").mkdir()
    child = tmp_path / "bin" / "PythonSlicer"
    child.write_text(FAKE_PYTHONSLICER.format(python=sys.executable, mode=mode.replace("-after-an-earlier-run", "")))
    child.chmod(0o755)
    monkeypatch.setenv("PATH", f"{child.parent}{os.pathsep}{os.environ['PATH']}")
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    if mode == "traceback-after-an-earlier-run":
        outputs.mkdir()
        (outputs / "results.csv").write_text("input,status,qc\n/in/0.png,ok,ok\n")
    ui.batchInputDirectoryButton.directory = str(inputs)
    ui.batchOutputDirectoryButton.directory = str(outputs)
    ui.batchRunButton.click()
    assert panel._batch is not None and panel._batch.args[0] == str(child)
    batch = panel._batch
    spin(lambda: panel._batch is None, timeout=60)
    text = ui.batchStatusLabel.text()
    assert text.startswith(ENDINGS[mode]), (text, batch.returnCode, batch.log)
    if mode != "some-failed":
        assert "segmented" not in text and "results.csv" not in text
    assert ui.batchRunButton.isEnabled() and not ui.batchCancelButton.isEnabled()


@pytest.mark.parametrize("version", [(5, 6), (5, 8), (5, 10)])
def test_gui_connections_do_not_pile_up(module_widget, monkeypatch, version):
    """On 5.6 and 5.8 connectGui returns no tag and disconnectGui leaves the node's observer behind; entering the
    module and closing the scene must not add connections: one parameter change updates the GUI once."""
    import slicer.parameterNodeWrapper as wrapper

    widget, volume = module_widget
    monkeypatch.setattr(wrapper, "SLICER_VERSION", version)
    widget.cleanup()
    widget = LungSegWidget()
    widget.setup()
    widget.parent.isEntered = True
    for _ in range(5):
        widget.enter()
    for _ in range(2):
        slicer.mrmlScene.Clear(0)
    parameterNode = widget.logic.getParameterNode()
    before = wrapper.guiUpdates
    parameterNode.device = "cpu"
    assert wrapper.guiUpdates - before == 1
    assert widget.panel.ui.deviceComboBox.currentText() == "cpu"
    widget.panel.ui.deviceComboBox.setCurrentIndex(widget.panel.ui.deviceComboBox.findText("cuda"))
    assert parameterNode.device == "cuda"  # and the GUI still writes the node
    widget.cleanup()


def test_an_older_slicer_gets_a_message_not_a_traceback(monkeypatch):
    import slicer.parameterNodeWrapper as wrapper

    monkeypatch.setattr(wrapper, "SLICER_VERSION", (5, 4))  # slicer.app's version follows it
    assert slicer.app.minorVersion == 4
    widget = LungSegWidget()
    widget.setup()
    labels = widget.parent.findChildren(qt.QLabel)
    assert widget.panel is None and any("5.6 or later" in label.text() for label in labels)
    widget.cleanup()


def test_developer_reload_also_reloads_the_library(monkeypatch):
    import LungSegLib.Widget

    for name in [n for n in sys.modules if n.startswith("LungSegLib")]:
        monkeypatch.setitem(sys.modules, name, sys.modules[name])  # the other tests keep the loaded modules
    reloaded = []
    monkeypatch.setattr(LungSegWidget.__mro__[1], "onReload", lambda self: reloaded.append(True), raising=False)
    LungSegWidget().onReload()
    assert reloaded == [True] and "LungSegLib.Widget" not in sys.modules
    import LungSegLib.Widget as again  # the next import reads the files anew

    assert again is not LungSegLib.Widget


def test_panel_screenshot_renders(tmp_path):
    sys.path.insert(0, str(REPO / "LungSegExtension" / "Screenshots"))
    import render_panel

    path = render_panel.render(tmp_path / "panel.png")
    image = qt.QImage(str(path))
    assert image.width() >= 460 and image.height() >= 660
    pixels = np.array([image.pixelColor(x, y).lightness() for x in range(0, 460, 7) for y in range(0, 660, 7)])
    assert pixels.std() > 10  # a rendered panel, not a blank image
