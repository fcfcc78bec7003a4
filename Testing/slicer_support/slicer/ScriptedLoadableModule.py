"""Stand-in for Slicer's slicer/ScriptedLoadableModule.py (pure Python in the application, absent from slicer-core):
the four base classes with the members LungSeg uses, behaving as in `Slicer --testing`."""
import logging
import os
import unittest

import slicer

__all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
           "ScriptedLoadableModuleTest"]


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


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        import qt

        self.moduleName = self.__class__.__name__.removesuffix("Widget")
        if parent is None:  # the application passes a qSlicerScriptedLoadableModuleWidget
            parent = qt.QWidget()
            parent.setLayout(qt.QVBoxLayout())
            parent.isEntered = False
        self.parent = parent
        self.layout = parent.layout()

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
