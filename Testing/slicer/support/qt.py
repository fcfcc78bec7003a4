"""Stand-in for Slicer's `qt` module (PythonQt) on PySide6, for rendering and driving the panel offscreen.

Only the shared subset of the two APIs is usable: methods and `signal.connect`, not PythonQt's property-style
access or string-signature connects. QUiLoader knows the ctk and qMRML widgets of the .ui through Python stand-ins.
"""

from PySide6.QtCore import *  # noqa: F401,F403
from PySide6.QtGui import *  # noqa: F401,F403
from PySide6.QtUiTools import QUiLoader as _QUiLoader
from PySide6.QtWidgets import *  # noqa: F401,F403


class QUiLoader(_QUiLoader):
    def __init__(self, parent=None):
        super().__init__(parent)
        import ctk
        import qMRMLWidgets

        for widgetClass in (
            ctk.ctkCollapsibleButton,
            ctk.ctkDirectoryButton,
            qMRMLWidgets.qMRMLWidget,
            qMRMLWidgets.qMRMLNodeComboBox,
        ):
            self.registerCustomWidget(widgetClass)

    def load(self, *args):
        # the .ui connects mrmlSceneChanged(vtkMRMLScene*), a C++ signature PySide6 cannot match; qMRMLWidget
        # passes the scene on itself, so drop only those warnings
        def handler(mode, context, message):
            if (
                "mrmlSceneChanged(vtkMRMLScene*)" not in message
                and "(sender name:" not in message
                and "(receiver name:" not in message
            ):
                previous(mode, context, message) if previous else print(message)

        previous = qInstallMessageHandler(handler)
        try:
            return super().load(*args)
        finally:
            qInstallMessageHandler(previous)
