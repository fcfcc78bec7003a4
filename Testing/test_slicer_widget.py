"""The LungSeg panel with PySide6 offscreen: the .ui loads, its widgets exist, Apply reaches the logic without
freezing the GUI, export and the batch section work, and the screenshot renders."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer_core", reason="slicer-core is not installed (scripts/setup.sh test)")
pytest.importorskip("PySide6", reason="PySide6 is not installed (scripts/setup.sh test)")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing" / "slicer_support"))
import slicer_app  # noqa: E402

slicer, application = slicer_app.start_gui()
import qt  # noqa: E402  (the PySide6 stand-in)
from LungSeg import LungSegWidget  # noqa: E402
from LungSegLib.BatchProcess import BatchProcess  # noqa: E402
from lungseg.samples import sample_pngs  # noqa: E402

UI = REPO / "LungSegExtension" / "LungSeg" / "Resources" / "UI" / "LungSeg.ui"
NAMED = {"inputSelector": "qMRMLNodeComboBox", "modelComboBox": "QComboBox", "deviceComboBox": "QComboBox",
         "uncertaintyCheckBox": "QCheckBox", "outputSelector": "qMRMLNodeComboBox",
         "uncertaintySelector": "qMRMLNodeComboBox", "applyButton": "QPushButton", "cancelButton": "QPushButton",
         "progressBar": "QProgressBar", "statusLabel": "QLabel", "exportButton": "QPushButton",
         "batchCollapsibleButton": "ctkCollapsibleButton", "batchInputDirectoryButton": "ctkDirectoryButton",
         "batchOutputDirectoryButton": "ctkDirectoryButton", "batchRunButton": "QPushButton",
         "batchCancelButton": "QPushButton", "batchProgressBar": "QProgressBar", "batchStatusLabel": "QLabel"}


@pytest.fixture
def module_widget():
    volume = slicer_app.load_volume(sample_pngs()[0], "chest")
    widget = LungSegWidget()
    widget.setup()
    yield widget, volume
    widget.cleanup()
    slicer.mrmlScene.Clear()


def spin(condition, timeout=120.0):
    """Run the event loop until `condition()`; returns the longest time between two event-loop turns."""
    deadline, last, longest = time.time() + timeout, time.time(), 0.0
    while not condition():
        assert time.time() < deadline, "timed out"
        application.processEvents()
        now = time.time()
        longest, last = max(longest, now - last), now
        time.sleep(0.01)
    application.processEvents()
    return longest


def test_ui_loads_with_its_named_widgets():
    widget = slicer.util.loadUI(str(UI))
    ui = slicer.util.childWidgetVariables(widget)
    for name, className in NAMED.items():
        assert getattr(ui, name).metaObject().className() == className, name
    bound = {name: getattr(ui, name).property("SlicerParameterName") for name in
             ("inputSelector", "outputSelector", "deviceComboBox", "uncertaintyCheckBox", "uncertaintySelector")}
    assert bound == {"inputSelector": "inputVolume", "outputSelector": "outputSegmentation", "deviceComboBox":
                     "device", "uncertaintyCheckBox": "uncertainty", "uncertaintySelector": "uncertaintyVolume"}
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


def test_apply_runs_the_logic_and_keeps_the_gui_responsive(module_widget):
    widget, volume = module_widget
    ui, parameterNode = widget.panel.ui, widget.logic.getParameterNode()
    assert parameterNode.inputVolume is volume and ui.inputSelector.currentNode() is volume
    # the parameter node's annotations set the selectors' node types
    assert ui.inputSelector.nodeTypes == ["vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"]
    assert ui.uncertaintySelector.nodeTypes == ["vtkMRMLScalarVolumeNode"]
    ui.deviceComboBox.setCurrentIndex(ui.deviceComboBox.findText("cpu"))
    ui.uncertaintyCheckBox.setChecked(True)
    assert (parameterNode.device, parameterNode.uncertainty) == ("cpu", True)
    assert ui.applyButton.isEnabled() and not ui.cancelButton.isEnabled()

    ui.applyButton.click()
    assert ui.cancelButton.isEnabled() and not ui.applyButton.isEnabled()
    longest = spin(lambda: widget.panel._run is None)
    assert longest < 1.0, f"the GUI froze for {longest:.2f} s"

    segmentation = parameterNode.outputSegmentation
    assert ui.outputSelector.currentNode() is segmentation and segmentation.GetName() == "chest lungs"
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2
    uncertainty = slicer.util.arrayFromVolume(parameterNode.uncertaintyVolume)
    assert uncertainty.shape == slicer.util.arrayFromVolume(volume).shape
    status = ui.statusLabel.text()
    assert status == widget.logic.lastSummary.statusText()
    assert "Right lung" in status and "QC (lung-fields)" in status
    assert ui.applyButton.isEnabled() and not ui.cancelButton.isEnabled()


def test_cancel_drops_the_result(module_widget):
    widget, _ = module_widget
    ui = widget.panel.ui
    ui.applyButton.click()
    ui.cancelButton.click()
    assert widget.panel._run is None and ui.statusLabel.text() == "Cancelled." and ui.applyButton.isEnabled()
    segmentation = widget.logic.getParameterNode().outputSegmentation
    time.sleep(0.5)
    spin(lambda: True)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0


def test_export_writes_the_chosen_file(module_widget, tmp_path, monkeypatch):
    widget, volume = module_widget
    widget.logic.process(volume, slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode"), device="cpu")
    parameterNode = widget.logic.getParameterNode()
    parameterNode.outputSegmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    monkeypatch.setattr(qt.QFileDialog, "getSaveFileName",
                        staticmethod(lambda *args: (str(tmp_path / "chest-lungs"), "NRRD (*.nrrd)")))
    widget.panel.ui.exportButton.click()
    import SimpleITK as sitk

    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "chest-lungs.nrrd")))
    assert set(np.unique(label)) == {0, 1, 2}
    assert "chest-lungs.nrrd" in widget.panel.ui.statusLabel.text()


def fake_batch(lines, pause=0.0):
    script = "import time\n" + "".join(
        f"print({line!r}, flush=True)\ntime.sleep({pause})\n" for line in lines)
    process = BatchProcess([sys.executable, "-c", script])
    process.start()
    return process


def test_batch_section_shows_progress_and_cancels(module_widget, tmp_path, monkeypatch):
    widget, _ = module_widget
    ui, panel = widget.panel.ui, widget.panel
    calls = []

    def processFolder(inputDir, outputDir, **options):
        calls.append((inputDir, outputDir, options))
        return fake_batch([f"lungseg-progress {i}/3 {'error' if i == 2 else 'ok'} /in/{i}.png" for i in (1, 2, 3)])

    monkeypatch.setattr(panel.logic, "processFolder", processFolder)
    ui.batchRunButton.click()  # no folders chosen: refused with a message, nothing started
    assert not calls and panel._batch is None
    ui.batchInputDirectoryButton.directory = str(tmp_path)
    ui.batchOutputDirectoryButton.directory = str(tmp_path / "out")
    ui.batchRunButton.click()
    assert calls == [(str(tmp_path), str(tmp_path / "out"), {"model": "unet", "device": "auto", "overlays": True})]
    spin(lambda: panel._batch is None, timeout=60)
    assert (ui.batchProgressBar.value(), ui.batchProgressBar.maximum()) == (3, 3)
    assert ui.batchStatusLabel.text().startswith("2 of 3 segmented, 1 failed")

    monkeypatch.setattr(panel.logic, "processFolder", lambda *a, **k: fake_batch(
        ["lungseg-progress 1/3 ok /in/1.png", "lungseg-progress 2/3 ok /in/2.png"], pause=30))
    ui.batchRunButton.click()
    spin(lambda: panel._batch is not None and panel._batch.progress()[0] == 1, timeout=60)
    ui.batchCancelButton.click()
    spin(lambda: panel._batch is None, timeout=60)
    assert ui.batchStatusLabel.text().startswith("Cancelled after 1 of 3")
    assert ui.batchRunButton.isEnabled()


def test_panel_screenshot_renders(tmp_path):
    sys.path.insert(0, str(REPO / "LungSegExtension" / "Screenshots"))
    import render_panel

    path = render_panel.render(tmp_path / "panel.png")
    image = qt.QImage(str(path))
    assert image.width() >= 460 and image.height() >= 660
    pixels = np.array([image.pixelColor(x, y).lightness() for x in range(0, 460, 7) for y in range(0, 660, 7)])
    assert pixels.std() > 10  # a rendered panel, not a blank image
