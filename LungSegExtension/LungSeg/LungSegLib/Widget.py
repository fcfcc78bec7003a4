"""The LungSeg panel: binds LungSeg.ui to the parameter node and runs the logic without freezing the GUI.

One radiograph: the volume is read on the main thread, the model runs in a worker thread on numpy arrays, and a
QTimer brings the result back to write the MRML nodes on the main thread. A folder: the core's batch command runs in
a child process, whose progress the same timer reads.
"""
from __future__ import annotations

import threading
import traceback

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.util import VTKObservationMixin

from .InstallLogic import InstallLogic
from .SegmentationLogic import LABELMAP_SUFFIXES, availableModels

POLL_MS = 100
DEFINITION_TITLES = {"lung-fields": _("Lung fields (visible lung, SCR style)"),
                     "full-extent": _("Full extent (lung behind heart and diaphragm)")}


def _value(widget, name):
    """A Qt property's value: PythonQt exposes properties as attributes, PySide6 (in the tests) as getters."""
    value = getattr(widget, name)
    return value() if callable(value) else value


class _ModelRun:
    """`compute` in a worker thread; the main thread reads `result` or `error` once `finished`."""

    def __init__(self, compute, inputVolume, radiograph, outputSegmentation, uncertaintyVolume):
        self.inputVolume, self.radiograph = inputVolume, radiograph
        self.outputSegmentation, self.uncertaintyVolume = outputSegmentation, uncertaintyVolume
        self.result = self.error = self.errorTrace = None
        self._thread = threading.Thread(target=self._run, args=(compute,), daemon=True)
        self._thread.start()

    def _run(self, compute):
        try:
            self.result = compute()
        except Exception as error:  # reported on the main thread
            self.error = error
            self.errorTrace = traceback.format_exc()

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()


class Widget(VTKObservationMixin):
    def __init__(self, uiPath: str, logic, installLogic: InstallLogic | None = None):
        VTKObservationMixin.__init__(self)
        self.logic = logic
        self.installLogic = installLogic or InstallLogic()
        self.uiWidget = slicer.util.loadUI(uiPath)
        self.ui = slicer.util.childWidgetVariables(self.uiWidget)
        self.uiWidget.setMRMLScene(slicer.mrmlScene)
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run: _ModelRun | None = None
        self._batch = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)
        self._cards = {card["name"]: card for card in availableModels()}
        self._fillModels()

        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.applyButton.clicked.connect(self.onApply)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.exportButton.clicked.connect(self.onExport)
        self.ui.batchRunButton.clicked.connect(self.onRunBatch)
        self.ui.batchCancelButton.clicked.connect(self.onCancelBatch)
        self._updateButtons()

    def _fillModels(self):
        """Models grouped by lung definition; a disabled header per group, the card's text as tooltip."""
        combo = self.ui.modelComboBox
        combo.clear()
        present = {c.get("definition", "") for c in self._cards.values()}
        for definition in [d for d in DEFINITION_TITLES if d in present] + sorted(present - set(DEFINITION_TITLES)):
            combo.addItem(DEFINITION_TITLES.get(definition, definition or _("Other")))
            combo.setItemData(_value(combo, "count") - 1, 0, qt.Qt.UserRole - 1)  # no item flags: a header
            for name, card in sorted(self._cards.items()):
                if card.get("definition", "") == definition:
                    combo.addItem("    " + name, name)
                    combo.setItemData(_value(combo, "count") - 1, card.get("definition_text", ""), qt.Qt.ToolTipRole)

    # --- parameter node -------------------------------------------------------------------------------------

    def setParameterNode(self, parameterNode):
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = parameterNode
        if parameterNode is not None:
            if parameterNode.inputVolume is None:  # save the user a click
                volumes = [v for v in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                           if not v.IsA("vtkMRMLLabelMapVolumeNode")]
                parameterNode.inputVolume = volumes[0] if volumes else None
            if parameterNode.model not in self._cards and self._cards:
                parameterNode.model = sorted(self._cards)[0]
            # widgets with the "SlicerParameterName" property in LungSeg.ui follow the node and update it
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None):
        parameterNode = self._parameterNode
        if parameterNode is not None:
            combo = self.ui.modelComboBox
            index = combo.findData(parameterNode.model)
            if index >= 0 and index != _value(combo, "currentIndex"):
                combo.setCurrentIndex(index)
            self.ui.modelDefinitionLabel.setText(self._cards.get(parameterNode.model, {}).get("definition_text", ""))
        self._updateButtons()

    def onModelChanged(self, *_):
        combo = self.ui.modelComboBox
        name = combo.itemData(_value(combo, "currentIndex"))
        if name and self._parameterNode is not None and self._parameterNode.model != name:
            self._parameterNode.model = name

    def _updateButtons(self):
        busy = self._run is not None or self._batch is not None
        canApply = self._parameterNode is not None and self._parameterNode.inputVolume is not None
        self.ui.applyButton.setEnabled(canApply and not busy)
        self.ui.applyButton.setToolTip(_("Segment the lungs of the input volume") if canApply
                                       else _("Select an input volume"))
        self.ui.cancelButton.setEnabled(self._run is not None)
        self.ui.batchRunButton.setEnabled(not busy)
        self.ui.batchCancelButton.setEnabled(self._batch is not None)

    # --- one radiograph -------------------------------------------------------------------------------------

    def onApply(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to segment the radiograph."), waitCursor=True):
            if self._run is not None or not self.installLogic.ensureDependencies():
                return
            parameterNode = self._parameterNode
            inputVolume = parameterNode.inputVolume
            radiograph = self.logic.readInput(inputVolume)
            if parameterNode.outputSegmentation is None:
                parameterNode.outputSegmentation = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()} lungs"))
            if parameterNode.uncertainty and parameterNode.uncertaintyVolume is None:
                parameterNode.uncertaintyVolume = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLScalarVolumeNode",
                    slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()} uncertainty"))
            uncertaintyVolume = parameterNode.uncertaintyVolume if parameterNode.uncertainty else None
            model, device, uncertainty = parameterNode.model, parameterNode.device, parameterNode.uncertainty
            self._run = _ModelRun(lambda: self.logic.compute(radiograph, model, device, uncertainty),
                                  inputVolume, radiograph, parameterNode.outputSegmentation, uncertaintyVolume)
            self.ui.progressBar.setRange(0, 0)  # busy
            self.ui.statusLabel.setText(_("Segmenting {name} with {model}...").format(
                name=inputVolume.GetName(), model=model))
            self._updateButtons()
            self._timer.start()

    def onCancel(self):
        if self._run is not None:
            self._run = None  # the thread ends within a model run; its result is dropped
            self.ui.progressBar.setRange(0, 1)
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.setText(_("Cancelled."))
            self._updateButtons()

    def _finishRun(self):
        run, self._run = self._run, None
        self.ui.progressBar.setRange(0, 1)
        self.ui.progressBar.setValue(1)
        self._updateButtons()
        with slicer.util.tryWithErrorDisplay(_("Failed to segment the radiograph.")):
            if run.error is not None:
                self.ui.statusLabel.setText(_("Failed: {error}").format(error=run.error))
                raise RuntimeError(f"{run.error}\n\n{run.errorTrace}")
            summary = self.logic.writeOutputs(run.inputVolume, run.radiograph, run.result, run.outputSegmentation,
                                              run.uncertaintyVolume)
            self.ui.statusLabel.setText(summary.statusText())

    # --- labelmap export ------------------------------------------------------------------------------------

    def onExport(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to export the labelmap.")):
            parameterNode = self._parameterNode
            segmentation, reference = parameterNode.outputSegmentation, parameterNode.inputVolume
            if segmentation is None or reference is None:
                raise ValueError(_("Select the input volume and its lung segmentation first."))
            path = qt.QFileDialog.getSaveFileName(
                self.uiWidget, _("Export labelmap"), f"{reference.GetName()}-lungs.nrrd",
                "NRRD (*.nrrd);;NIfTI (*.nii.gz);;PNG (*.png)")
            if isinstance(path, tuple):  # PySide6 also returns the chosen filter
                path = path[0]
            if not path:
                return
            if not path.lower().endswith(LABELMAP_SUFFIXES):
                path += ".nrrd"
            written = self.logic.exportLabelmap(segmentation, reference, path)
            self.ui.statusLabel.setText(_("Labelmap (0 background, 1 right, 2 left) written to {path}").format(
                path=written))

    # --- batch folder ---------------------------------------------------------------------------------------

    def onRunBatch(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to start the batch segmentation."), waitCursor=True):
            if self._batch is not None or not self.installLogic.ensureDependencies():
                return
            inputDir = _value(self.ui.batchInputDirectoryButton, "directory")
            outputDir = _value(self.ui.batchOutputDirectoryButton, "directory")
            if not inputDir or not outputDir:
                raise ValueError(_("Choose an input folder and an output folder."))
            parameterNode = self._parameterNode
            self._batch = self.logic.processFolder(inputDir, outputDir, model=parameterNode.model,
                                                   device=parameterNode.device,
                                                   overlays=self.ui.batchOverlaysCheckBox.isChecked())
            self.ui.batchProgressBar.setRange(0, 0)
            self.ui.batchStatusLabel.setText(_("Starting..."))
            self._updateButtons()
            self._timer.start()

    def onCancelBatch(self):
        if self._batch is not None:
            self._batch.cancel()  # returns at once; the timer sees the end
            self.ui.batchStatusLabel.setText(_("Cancelling..."))
            self.ui.batchCancelButton.setEnabled(False)

    def _pollBatch(self):
        batch = self._batch
        done, total, failed, lastInput = batch.progress()
        if total:
            self.ui.batchProgressBar.setRange(0, total)
            self.ui.batchProgressBar.setValue(done)
        if batch.running:
            if not batch.cancelled:
                self.ui.batchStatusLabel.setText(_("{done} of {total} done, {failed} failed").format(
                    done=done, total=total or "?", failed=failed))
            return
        self._batch = None
        if batch.cancelled:
            text = _("Cancelled after {done} of {total}; run again to continue (finished images are skipped).").format(
                done=done, total=total or "?")
        elif batch.returnCode in (0, 1):
            text = _("{ok} of {total} segmented, {failed} failed; see results.csv in {folder}").format(
                ok=done - failed, total=total, failed=failed, folder=batch.outputDir)
        else:
            text = _("Failed: {reason}").format(reason=batch.log[-1] if batch.log else batch.returnCode)
        self.ui.batchStatusLabel.setText(text)
        self.ui.batchProgressBar.setRange(0, max(total, 1))
        self.ui.batchProgressBar.setValue(done)
        self._updateButtons()

    # --- timer and lifetime ---------------------------------------------------------------------------------

    def _poll(self):
        if self._run is not None and self._run.finished:
            self._finishRun()
        if self._batch is not None:
            self._pollBatch()
        if self._run is None and self._batch is None:
            self._timer.stop()

    def cancelAll(self):
        self.onCancel()
        self.onCancelBatch()

    def cleanup(self):
        self.cancelAll()
        self._timer.stop()
        self.setParameterNode(None)
        self.removeObservers()
