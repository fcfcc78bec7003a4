"""The LungSeg panel: binds LungSeg.ui to the parameter node and runs the logic.

One radiograph runs on the main thread while the panel shows that it is busy: it takes well under a second once the
model is loaded, and in Slicer the main thread holds Python's GIL while it waits for events (PythonQt never
releases it), so a Python worker thread would crawl. A folder runs the core's batch command in a child process,
whose progress a QTimer reads (BatchPanel.py).
"""

from __future__ import annotations

import os
import re

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.util import VTKObservationMixin

from .BatchPanel import BatchPanel
from .InstallLogic import InstallLogic
from .Parameter import corrections
from .SegmentationLogic import availableModels, isModelLoaded, sourceFile

# the export dialog's filters and the suffix each one gives a name typed without one
EXPORT_FILTERS = {"NRRD (*.nrrd)": ".nrrd", "NIfTI (*.nii.gz)": ".nii.gz", "PNG (*.png)": ".png"}


def fileNameFor(nodeName: str) -> str:
    """A node name made a valid file name on every system: a DICOM volume is named "1: Unnamed Series"
    (DICOMLib/DICOMPlugin.py:281-295, Slicer v5.12.3), and Windows refuses \\/:*?"<>|, control characters, and a
    name that ends in a dot or a space."""
    return re.sub(r'[\\/:*?"<>|\x00-\x1f]', "_", nodeName).rstrip(". ") or "radiograph"


def _value(widget, name):
    """A Qt property's value: PythonQt exposes properties as attributes, PySide6 (in the tests) as getters."""
    value = getattr(widget, name)
    return value() if callable(value) else value


# size: one parameter node shared by the model choice, the single radiograph and the labelmap export (the batch
# folder section is BatchPanel.py)
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
        self._busy = False  # a segmentation or an installation is under way: a second click is ignored
        self._exportFolder = ""
        self._cards = {card["name"]: card for card in availableModels()}
        self._fillModels()

        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.applyButton.clicked.connect(self.onApply)
        self.ui.exportButton.clicked.connect(self.onExport)
        self.batchPanel = BatchPanel(self)  # the batch folder section
        self._updateButtons()

    @property
    def _batch(self):
        """The batch child process under way, or None."""
        return self.batchPanel.batch

    def onRunBatch(self):
        self.batchPanel.onRunBatch()

    def onCancelBatch(self):
        self.batchPanel.onCancelBatch()

    def _fillModels(self):
        """Models grouped by lung definition; a disabled header per group, the card's text as tooltip."""
        from lungseg.definitions import DEFINITIONS

        combo = self.ui.modelComboBox
        combo.clear()
        present = {c.get("definition", "") for c in self._cards.values()}
        for definition in [d for d in DEFINITIONS if d in present] + sorted(present - set(DEFINITIONS)):
            known = DEFINITIONS.get(definition)
            combo.addItem(_(known.title) if known else definition or _("Other"))
            combo.setItemData(_value(combo, "count") - 1, 0, qt.Qt.UserRole - 1)  # no item flags: a header
            for name, card in sorted(self._cards.items()):
                if card.get("definition", "") == definition:
                    combo.addItem("    " + name, name)
                    combo.setItemData(_value(combo, "count") - 1, card.get("definition_text", ""), qt.Qt.ToolTipRole)

    # --- parameter node -------------------------------------------------------------------------------------

    def _boundWidgets(self) -> dict:
        """Parameter name -> widget, for the widgets that the .ui binds with the "SlicerParameterName" property."""
        bound = {}
        for widget in vars(self.ui).values():
            name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
            if name:
                bound[name] = widget
        return bound

    def setParameterNode(self, parameterNode):
        """Bind the panel to a parameter node, once per node: Slicer 5.6 and 5.8 cannot undo a connection fully
        (`connectGui` returns no tag there, and `disconnectGui` leaves the node's observer), so rebinding on every
        `enter()` would pile connections up. `connectParametersToGui` returns its tag in every version."""
        if (
            parameterNode is not None
            and self._parameterNode is not None
            and parameterNode.parameterNode is self._parameterNode.parameterNode
        ):
            return
        if self._parameterNode is not None:
            from .Parameter import retire

            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            retire(self._parameterNode)
        self._parameterNode, self._parameterNodeGuiTag = parameterNode, None
        if parameterNode is not None:
            if parameterNode.inputVolume is None:  # save the user a click
                volumes = [
                    v
                    for v in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                    if not v.IsA("vtkMRMLLabelMapVolumeNode")
                ]
                parameterNode.inputVolume = volumes[0] if volumes else None
            if parameterNode.model not in self._cards and self._cards:
                parameterNode.model = sorted(self._cards)[0]
            self._parameterNodeGuiTag = parameterNode.connectParametersToGui(self._boundWidgets())
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
        busy = self._busy or self._batch is not None
        canApply = self._parameterNode is not None and self._parameterNode.inputVolume is not None
        self.ui.applyButton.setEnabled(canApply and not busy)
        self.ui.applyButton.setToolTip(
            _("Segment the lungs of the input volume") if canApply else _("Select an input volume")
        )
        self.ui.batchRunButton.setEnabled(not busy)
        self.ui.batchCancelButton.setEnabled(self._batch is not None)

    def _setBusy(self, busy: bool, message: str = ""):
        """Show the busy state and paint it before the main thread blocks."""
        self._busy = busy
        self.ui.progressBar.setRange(0, 0 if busy else 1)
        self.ui.progressBar.setValue(0 if busy else 1)
        if message:
            self.ui.statusLabel.setText(message)
        self._updateButtons()
        slicer.app.processEvents()

    def _ensureDependencies(self) -> bool:
        # the install runs pip through slicer.util, which processes events: the buttons stay disabled meanwhile
        self._setBusy(True, _("Checking the Python packages LungSeg needs..."))
        return self.installLogic.ensureDependencies()

    # --- one radiograph -------------------------------------------------------------------------------------

    def onApply(self):
        if self._busy:
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to segment the radiograph."), waitCursor=True):
                try:
                    if self._ensureDependencies():
                        self._segment()
                    else:
                        self.ui.statusLabel.setText(_("Not segmented: LungSeg's Python packages are not installed."))
                except Exception as error:
                    self.ui.statusLabel.setText(_("Failed: {error}").format(error=error))
                    raise
        finally:
            self._setBusy(False)

    def _segment(self):
        parameterNode = self._parameterNode
        inputVolume, model, device = parameterNode.inputVolume, parameterNode.model, parameterNode.device
        radiograph = self.logic.readInput(inputVolume)
        if parameterNode.outputSegmentation is None:
            parameterNode.outputSegmentation = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()} lungs")
            )
        if parameterNode.uncertainty and parameterNode.uncertaintyVolume is None:
            parameterNode.uncertaintyVolume = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()} uncertainty")
            )
        uncertaintyVolume = parameterNode.uncertaintyVolume if parameterNode.uncertainty else None
        if isModelLoaded(model, device):
            message = _("Segmenting {name} with {model}...").format(name=inputVolume.GetName(), model=model)
        else:
            message = _("Loading the model {model} (first use), then segmenting {name}...").format(
                name=inputVolume.GetName(), model=model
            )
        self._setBusy(True, message)
        result = self.logic.compute(
            radiograph, model, device, uncertaintyVolume is not None, corrections(parameterNode)
        )
        summary = self.logic.writeOutputs(
            inputVolume, radiograph, result, parameterNode.outputSegmentation, uncertaintyVolume
        )
        self.ui.statusLabel.setText(summary.statusText())

    # --- labelmap export ------------------------------------------------------------------------------------

    def onExport(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to export the labelmap.")):
            parameterNode = self._parameterNode
            segmentation, reference = parameterNode.outputSegmentation, parameterNode.inputVolume
            if segmentation is None or reference is None:
                raise ValueError(_("Select the input volume and its lung segmentation first."))
            path = self._askLabelmapPath(reference)
            if not path:
                return
            written = self.logic.exportLabelmap(segmentation, reference, path)
            self._exportFolder = str(written.parent)
            self.ui.statusLabel.setText(
                _("Labelmap (0 background, 1 right, 2 left) written to {path}").format(path=written)
            )

    def _askLabelmapPath(self, reference) -> str:
        """A save dialog that opens in the last export folder (else the radiograph's folder, else Slicer's default
        scene folder) and gives a name typed without a suffix the one of the chosen filter."""
        source = sourceFile(reference)
        folder = (
            self._exportFolder
            or (os.path.dirname(source) if source and reference.GetStorageNode() else "")
            or getattr(slicer.app, "defaultScenePath", "")
            or qt.QDir.homePath()
        )
        dialog = qt.QFileDialog(self.uiWidget, _("Export labelmap"))
        dialog.setAcceptMode(qt.QFileDialog.AcceptSave)
        dialog.setNameFilters(list(EXPORT_FILTERS))
        dialog.setDirectory(folder)
        dialog.setDefaultSuffix(EXPORT_FILTERS[next(iter(EXPORT_FILTERS))].lstrip("."))
        dialog.filterSelected.connect(lambda chosen: dialog.setDefaultSuffix(EXPORT_FILTERS[chosen].lstrip(".")))
        dialog.selectFile(f"{fileNameFor(reference.GetName())}-lungs")
        if not dialog.exec_():
            return ""
        path = dialog.selectedFiles()[0]
        if not path.lower().endswith(tuple(EXPORT_FILTERS.values())):
            path += EXPORT_FILTERS.get(dialog.selectedNameFilter(), ".nrrd")
        return path

    # --- lifetime -------------------------------------------------------------------------------------------

    def cleanup(self):
        self.batchPanel.cleanup()
        self.setParameterNode(None)
        self.removeObservers()
