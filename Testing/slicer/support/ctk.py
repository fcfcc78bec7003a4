"""Stand-ins (PySide6) for the CTK widgets in LungSeg.ui, with the properties and signals the module uses."""

from PySide6.QtCore import Property, QDir, Qt, Signal
from PySide6.QtWidgets import QFileDialog, QGroupBox, QPushButton, QWidget


class ctkCollapsibleButton(QGroupBox):
    """A titled section whose contents hide when collapsed."""

    def _text(self):
        return self.title()

    def _setText(self, text):
        self.setTitle(text)

    def _collapsed(self):
        return getattr(self, "_isCollapsed", False)

    def _setCollapsed(self, collapsed):
        self._isCollapsed = collapsed
        self._apply()

    def _apply(self):
        # the .ui sets `collapsed` before adding the contents: apply it again when shown
        for child in self.findChildren(QWidget, options=Qt.FindChildOption.FindDirectChildrenOnly):
            child.setVisible(not self._collapsed())
        self.setMaximumHeight(self.fontMetrics().height() + 4 if self._collapsed() else 16777215)
        self.setTitle(("▸ " if self._collapsed() else "▾ ") + self.title().lstrip("▸▾ "))

    def showEvent(self, event):
        self._apply()
        super().showEvent(event)

    text = Property(str, _text, _setText)
    collapsed = Property(bool, _collapsed, _setCollapsed)


class ctkDirectoryButton(QPushButton):
    """A button showing a folder; clicking it opens a folder dialog.

    Behaviour copied from CTK Libs/Widgets/ctkDirectoryButton.cpp (commontk/CTK 82cae578, which Slicer v5.8.1
    pins; f53820a4 for v5.6.2; dd4caeae for v5.10.0; HEAD):
    - `directory` is `QDir().path()` until set: "." (Qt's current directory), never "";
    - `setDirectory(dir)`: when `QDir(dir) == current` (Qt's QDir comparison, so "" and "." equal the default)
      only `directorySelected` is emitted; otherwise the folder is stored and `directorySelected` and
      `directoryChanged` are emitted, both with the absolute path;
    - what `directory` returns afterwards: the path as given (`QDir(dir).path()`) in CTK before 5f750c88 (Slicer
      5.6/5.8), the absolute path from dd4caeae on (Slicer 5.10+); chosen by slicer.parameterNodeWrapper's
      SLICER_VERSION;
    - the button shows the absolute path (DisplayAbsolutePath is true).
    """

    directoryChanged = Signal(str)
    directorySelected = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._qdir = QDir()
        self.setText(self._qdir.absolutePath())
        self.clicked.connect(self.browse)

    def browse(self):
        folder = QFileDialog.getExistingDirectory(self, "Select a folder", self._qdir.path())
        if not folder:  # cancelled
            return ""
        self.setDirectory(folder)
        return folder

    def _directory(self):
        return self._qdir.path()

    def setDirectory(self, folder):
        newDirectory = QDir(folder)
        if self._qdir == newDirectory:
            self.directorySelected.emit(newDirectory.absolutePath())
            return
        self._qdir = QDir(newDirectory.absolutePath()) if _ctkStoresAbsolutePath() else newDirectory
        self.setText(self._qdir.absolutePath())
        self.directorySelected.emit(newDirectory.absolutePath())
        self.directoryChanged.emit(self._qdir.absolutePath())

    directory = Property(str, _directory, setDirectory, notify=directoryChanged)  # PythonQt: an attribute


def _ctkStoresAbsolutePath():
    """CTK 5f750c88 (in the CTK that Slicer 5.10 pins) stores `newDirectory.absolutePath()`."""
    try:
        from slicer.parameterNodeWrapper import SLICER_VERSION
    except ImportError:
        return False
    return SLICER_VERSION >= (5, 10)
