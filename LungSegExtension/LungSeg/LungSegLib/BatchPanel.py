"""The LungSeg panel's batch folder section: an input and an output folder, Run and Cancel, and the progress of the
core's batch command in a child process, which a QTimer reads."""

from __future__ import annotations

import qt
import slicer
from slicer.i18n import tr as _

from .Parameter import corrections

POLL_MS = 100


class BatchPanel:
    """The batch widgets of `panel` (the module's Widget); `batch` is the child process under way, or None."""

    def __init__(self, panel):
        self.panel = panel
        self.ui = panel.ui
        self.batch = None
        # a ctkDirectoryButton shows "." until a folder is picked (CTK): only a picked folder counts, signalled by
        # directorySelected; directoryChanged misses a pick equal to "." (ctkDirectoryButton.cpp:143-165, CTK 868d56c7)
        self._folders = {"input": "", "output": ""}
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._pollBatch)
        self.ui.batchInputDirectoryButton.directorySelected.connect(lambda folder: self._pickFolder("input", folder))
        self.ui.batchOutputDirectoryButton.directorySelected.connect(lambda folder: self._pickFolder("output", folder))
        self.ui.batchRunButton.clicked.connect(self.panel.onRunBatch)
        self.ui.batchCancelButton.clicked.connect(self.panel.onCancelBatch)

    def _pickFolder(self, role: str, folder: str):
        self._folders[role] = folder

    def onRunBatch(self):
        if self.panel._busy or self.batch is not None:
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to start the batch segmentation."), waitCursor=True):
                inputDir, outputDir = self._folders["input"], self._folders["output"]
                if not inputDir or not outputDir:
                    raise ValueError(_("Choose an input folder and an output folder."))
                if not self.panel._ensureDependencies():
                    return
                parameterNode = self.panel._parameterNode
                self.batch = self.panel.logic.processFolder(
                    inputDir,
                    outputDir,
                    model=parameterNode.model,
                    device=parameterNode.device,
                    overlays=self.ui.batchOverlaysCheckBox.isChecked(),
                    corrections=corrections(parameterNode),
                )
                self.ui.batchProgressBar.setRange(0, 0)
                self.ui.batchStatusLabel.setText(_("Starting..."))
                self._timer.start()
        finally:
            self.panel._setBusy(False)

    def onCancelBatch(self):
        if self.batch is not None:
            self.batch.cancel()  # returns at once; the timer sees the end
            self.ui.batchStatusLabel.setText(_("Cancelling..."))
            self.ui.batchCancelButton.setEnabled(False)

    def _pollBatch(self):
        batch = self.batch
        if batch is None:
            self._timer.stop()
            return
        done, total, failed, lastInput = batch.progress()
        if total:
            self.ui.batchProgressBar.setRange(0, total)
            self.ui.batchProgressBar.setValue(done)
        if batch.running:
            if not batch.cancelled:
                self.ui.batchStatusLabel.setText(
                    _("{done} of {total} done, {failed} failed").format(done=done, total=total or "?", failed=failed)
                )
            return
        self.batch = None
        self._timer.stop()
        if batch.cancelled:
            text = _("Cancelled after {done} of {total}; run again to continue (finished images are skipped).").format(
                done=done, total=total or "?"
            )
        elif batch.ranToEnd():  # all segmented, or some inputs failed: results.csv says which
            text = _("{ok} of {total} segmented, {failed} failed; see results.csv in {folder}").format(
                ok=done - failed - batch.skipped, total=total, failed=failed, folder=batch.outputDir
            )
            if batch.skipped:
                text += " " + _("({skipped} non-image DICOM objects skipped)").format(skipped=batch.skipped)
            flagged, segmented = batch.flaggedInFolder() or (batch.toCheck, done - failed - batch.skipped)
            text += " " + _(
                "{flagged} of the folder's {segmented} results flagged by QC to check: open review.html there."
            ).format(flagged=flagged, segmented=segmented)
        else:
            # a crash, a usage error or a kill: no counts, which would point to a results.csv not written
            text = _("Failed: {reason}").format(reason=batch.failureReason())
        self.ui.batchStatusLabel.setText(text)
        self.ui.batchProgressBar.setRange(0, max(total, 1))
        self.ui.batchProgressBar.setValue(done)
        self.panel._updateButtons()

    def cleanup(self):
        self.onCancelBatch()
        self._timer.stop()
