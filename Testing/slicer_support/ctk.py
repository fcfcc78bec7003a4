"""Stand-ins (PySide6) for the CTK widgets in LungSeg.ui, with the properties and signals the module uses."""
from PySide6.QtCore import Property, Qt, Signal
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
    """A button showing a folder; clicking it opens a folder dialog."""

    directoryChanged = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._directory = ""
        self.setText("Select a folder...")
        self.clicked.connect(self._browse)

    def _browse(self):
        folder = QFileDialog.getExistingDirectory(self, "Select a folder", self._directory)
        if folder:
            self._setDirectory(folder)

    def _getDirectory(self):
        return self._directory

    def _setDirectory(self, folder):
        if folder != self._directory:
            self._directory = folder
            self.setText(folder or "Select a folder...")
            self.directoryChanged.emit(folder)

    directory = Property(str, _getDirectory, _setDirectory)
