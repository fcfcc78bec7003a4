"""Stand-in for Slicer's slicer/ScriptedLoadableModule.py (pure Python in the application, absent from slicer-core):
the four base classes with the members LungSeg uses, behaving as in `Slicer --testing`.

Behaviour copied from Slicer v5.8.1 Base/Python/slicer/ScriptedLoadableModule.py (the same in v5.6.2-v5.12.0) and,
for the widget's representation, Base/QTGUI/qSlicerScriptedLoadableModuleWidget.cxx (setPythonSource, reload):
- a widget registers itself as `slicer.modules.<Name>Widget`, and its parent is what
  `slicer.modules.<name>.widgetRepresentation()` returns; it connects `moduleAboutToBeUnloaded(QString)`;
- `onReload()` prints Slicer's separator and calls slicer-core's real `slicer.util.reloadScriptedModule`, which
  re-executes the module file, calls the old widget's `cleanup()`, empties the panel and calls the
  representation's `reload()`: a new `<Name>Widget(parent)` from the reloaded module, then its `setup()`. Each
  reload is recorded in `reloadedModules`. (Slicer 5.12's reloadScriptedModule, which slicer-core ships, makes a
  new module object in sys.modules; 5.6-5.10 re-executed it in place with imp.load_module.)
- `ScriptedLoadableModuleTest` is a `unittest.TestCase`, so `skipTest` is unittest's.
Not emulated: the developer section's buttons (the tests call onReload directly), and the widget setting itself up
when constructed without a parent (Slicer calls setup() then; the tests call it themselves).
"""

import logging
import os
import sys
import types
import unittest

import slicer

__all__ = [
    "ScriptedLoadableModule",
    "ScriptedLoadableModuleWidget",
    "ScriptedLoadableModuleLogic",
    "ScriptedLoadableModuleTest",
]


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""

    def getDefaultModuleDocumentationLink(self, docPage=None):
        return ""


reloadedModules = []  # module names, one per onReload()

_representationClass = None


def _widgetRepresentation(moduleName, sourceFile):
    """A QWidget standing in for qSlicerScriptedLoadableModuleWidget: `reload()` re-instantiates the module's
    widget class from sys.modules and calls its setup()."""
    global _representationClass
    if _representationClass is None:
        import qt

        class qSlicerScriptedLoadableModuleWidget(qt.QWidget):
            def reload(self):
                if not os.path.exists(self.pythonSource):
                    return
                module = sys.modules[self.moduleName]
                widget = getattr(module, self.moduleName + "Widget")(self)
                widget.setup()

        _representationClass = qSlicerScriptedLoadableModuleWidget
    representation = _representationClass()
    representation.setLayout(__import__("qt").QVBoxLayout())
    representation.isEntered = False
    representation.moduleName = moduleName
    representation.pythonSource = sourceFile
    return representation


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__.removesuffix("Widget")
        sourceFile = getattr(sys.modules.get(self.__class__.__module__), "__file__", "") or ""
        if parent is None:  # the application passes a qSlicerScriptedLoadableModuleWidget
            parent = _widgetRepresentation(self.moduleName, sourceFile)
        self.parent = parent
        self.layout = parent.layout()
        # qSlicerScriptedLoadableModuleWidget::setPythonSource: slicer.modules.<Name>Widget, and the module's
        # widgetRepresentation()
        setattr(slicer.modules, self.moduleName + "Widget", self)
        moduleEntry = getattr(slicer.modules, self.moduleName.lower(), None)
        if moduleEntry is None:
            moduleEntry = types.SimpleNamespace(path=sourceFile)
            setattr(slicer.modules, self.moduleName.lower(), moduleEntry)
        moduleEntry.widgetRepresentation = lambda: parent
        if hasattr(slicer.app, "moduleManager"):
            slicer.app.moduleManager().connect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)

    def _onModuleAboutToBeUnloaded(self, moduleName):
        if moduleName == self.moduleName:
            self.cleanup()
            slicer.app.moduleManager().disconnect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)

    def onReload(self):
        """Reload the module (Slicer's developer "Reload" button)."""
        print("\n" * 2)
        print("-" * 30)
        print("Reloading module: " + self.moduleName)
        print("-" * 30)
        print("\n" * 2)
        reloadedModules.append(self.moduleName)
        slicer.util.reloadScriptedModule(self.moduleName)

    def resourcePath(self, filename):
        moduleDir = os.path.dirname(slicer.util.modulePath(self.moduleName))
        return os.path.join(moduleDir, "Resources", filename)

    def setup(self):
        pass

    def cleanup(self):
        pass

    def enter(self):
        pass

    def exit(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__.removesuffix("Logic")
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node:
            return node
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        return slicer.mrmlScene.AddNode(node)


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, requestedDelay=None, msec=None):
        logging.info(message)
