import os

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *  # noqa: F403
from slicer.util import VTKObservationMixin

from LungSegLib.Parameter import LungSegParameterNode
from LungSegLib.SegmentationLogic import SegmentationLogic


class LungSeg(ScriptedLoadableModule):  # noqa: F405
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)  # noqa: F405
        self.parent.title = _("Lung Segmentation (chest X-ray)")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LungSeg developers"]
        self.parent.helpText = _(
            "Segments the right and left lung on a 2D chest radiograph (PNG, JPEG, DICOM CR/DX, RGB or grayscale) "
            "with U-Net models trained with MONAI, exports 0/1/2 labelmaps and segments whole folders. "
            "Areas are reported in mm² when the image has a real pixel spacing. "
            '<a href="https://github.com/lungseg/LungSeg/tree/main/LungSegExtension#readme">Documentation</a>.')
        self.parent.acknowledgementText = _(
            "Built on 3D Slicer, MONAI and PyTorch; the models' training data and licences are in their model cards.")


class LungSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):  # noqa: F405
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)  # noqa: F405
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)  # noqa: F405
        from LungSegLib.Widget import Widget

        self.logic = LungSegLogic()
        self.panel = Widget(self.resourcePath("UI/LungSeg.ui"), self.logic)
        self.layout.addWidget(self.panel.uiWidget)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        self.panel.cleanup()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.panel.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.panel.cancelAll()
        self.panel.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.panel.setParameterNode(self.logic.getParameterNode())


class LungSegLogic(SegmentationLogic):
    """process / exportLabelmap / processFolder: see LungSegLib/SegmentationLogic.py."""

    def getParameterNode(self):
        return LungSegParameterNode(super().getParameterNode())


class LungSegTest(ScriptedLoadableModuleTest):  # noqa: F405
    """Segments a shipped sample radiograph as a user would; `Slicer --testing` and CTest run it."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LungSeg1()

    def test_LungSeg1(self):
        import tempfile

        import numpy as np
        from LungSegLib.InstallLogic import InstallLogic, corePythonPath

        corePythonPath()
        if InstallLogic().missingRequirements():  # a test never changes the user's Python
            self.delayDisplay("LungSeg self-test skipped: press Apply once to install PyTorch and MONAI first.")
            return
        from lungseg.samples import sample_pngs

        volume = slicer.util.loadVolume(str(sample_pngs()[0]), {"singleFile": True})
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        uncertainty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        summary = LungSegLogic().process(volume, segmentation, device="cpu", uncertaintyVolume=uncertainty)
        self.delayDisplay(summary.statusText())

        names = [segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)]
        self.assertEqual(names, ["Right lung", "Left lung"])
        columns = []
        for name in names:
            segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)[0]
            self.assertGreater(mask.mean(), 0.03, f"{name} is (nearly) empty")
            columns.append(np.nonzero(mask)[1].mean())
        self.assertLess(columns[0], columns[1], "the right lung must be on the image's left (PA view)")
        self.assertEqual(slicer.util.arrayFromVolume(uncertainty).shape,
                         slicer.util.arrayFromVolume(volume).shape[:3])

        with tempfile.TemporaryDirectory() as folder:
            for name in ("lungs.nrrd", "lungs.png"):
                path = LungSegLogic().exportLabelmap(segmentation, volume, os.path.join(folder, name))
                self.assertGreater(path.stat().st_size, 0)
        self.delayDisplay("LungSeg test passed")
