import os
import sys

import slicer
from slicer.ScriptedLoadableModule import *  # noqa: F403
from slicer.util import VTKObservationMixin

from LungSegLib.SegmentationLogic import SegmentationLogic

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer before 5.4: the module only says which versions it supports

    def _(text):
        return text

    def translate(context, text):
        return text


SUPPORTED_SLICER = (5, 6)  # 5.6 to 5.12 were checked against Slicer's source (see the extension README)
SUPPORTED_TEXT = "3D Slicer 5.6 or later (tested against 5.6, 5.8, 5.10 and 5.12)"
# pydicom-data's adult chest CR (MIT licence), at the commit and with the SHA-256 that pydicom pins in its
# data/urls.json and data/hashes.json
SAMPLE_CR_URL = "https://github.com/pydicom/pydicom-data/raw/39a2eb31815eec435dc26c322c27aec5cfcbddb6/data/RG1_UNCR.dcm"
SAMPLE_CR_SHA256 = "946f28f48b9fbf360196a9b835c8fce83b0c654bf85a5107663c8a61df02e498"


def slicerVersionProblem():
    """Why this Slicer cannot run LungSeg, or "" when it can."""
    version = (int(getattr(slicer.app, "majorVersion", 0)), int(getattr(slicer.app, "minorVersion", 0)))
    if version < SUPPORTED_SLICER:
        return _(
            "LungSeg needs {supported}; this is Slicer {major}.{minor}. Install a newer Slicer from "
            "download.slicer.org."
        ).format(supported=SUPPORTED_TEXT, major=version[0], minor=version[1])
    if sys.version_info < (3, 9):  # noqa: UP036  (a Slicer older than the Python 3.9 this targets)
        return _("LungSeg needs Python 3.9 or later in Slicer.")
    return ""


def registerSampleData():
    """The demo chest CR in the Sample Data module: two clicks to a radiograph LungSeg can segment."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Chest radiograph",
        sampleName="LungSegChestCR",
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons", "LungSeg.png"),
        uris=SAMPLE_CR_URL,
        fileNames="LungSegChestCR.dcm",
        nodeNames="LungSegChestCR",
        checksums=f"SHA256:{SAMPLE_CR_SHA256}",
        loadFileProperties={"singleFile": True},
        # from Slicer 5.8 the default is the reader that claims the file first: for a .dcm the DICOM module's
        # import, which loads no volume; loadFileType is the name that 5.6 also knows (5.8+: deprecated alias)
        loadFileType="VolumeFile",
    )


class LungSeg(ScriptedLoadableModule):  # noqa: F405
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)  # noqa: F405
        self.parent.title = _("Lung Segmentation (chest X-ray)")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LungSeg developers"]
        self.parent.helpText = _(
            "Segments the right and left lung on a 2D chest radiograph (PNG, JPEG, DICOM CR/DX, RGB or grayscale) "
            "with U-Net models (trained with MONAI, run with ONNX Runtime), exports 0/1/2 labelmaps and segments whole "
            "folders. "
            "Areas are reported in mm² when the image has a real pixel spacing. Needs {supported}. "
            '<a href="https://github.com/lungseg/LungSeg/tree/main/LungSegExtension#readme">Documentation</a>.'
        ).format(supported=SUPPORTED_TEXT)
        self.parent.acknowledgementText = _(
            "Built on 3D Slicer and ONNX Runtime (the models were trained with MONAI and PyTorch, which LungSeg does "
            "not install); the models' training data and licences are in their model cards. "
            "The demo chest CR comes from pydicom-data (MIT licence)."
        )
        if not slicerVersionProblem():
            slicer.app.connect("startupCompleted()", registerSampleData)


class LungSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):  # noqa: F405
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)  # noqa: F405
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)  # noqa: F405
        problem = slicerVersionProblem()
        if problem:  # a message in the panel, not a traceback
            import qt

            label = qt.QLabel(problem)
            label.setWordWrap(True)
            self.layout.addWidget(label)
            return
        from LungSegLib.Widget import Widget

        self.logic = LungSegLogic()
        self.panel = Widget(self.resourcePath("UI/LungSeg.ui"), self.logic)
        self.layout.addWidget(self.panel.uiWidget)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        if self.panel is not None:
            self.panel.cleanup()

    def enter(self):
        if self.panel is not None:
            self.initializeParameterNode()  # the same node as before: the panel keeps its one connection

    def onSceneEndClose(self, caller, event):
        # a folder batch does not use the scene and keeps running; the parameter node outlives the close
        if self.parent.isEntered:
            self.initializeParameterNode()  # rebinds only if the close replaced the parameter node

    def initializeParameterNode(self):
        self.panel.setParameterNode(self.logic.getParameterNode())

    def onReload(self):
        """Developer Reload: also reload LungSegLib, which Slicer's reload of LungSeg.py alone would keep."""
        for name in [n for n in sys.modules if n == "LungSegLib" or n.startswith("LungSegLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)  # noqa: F405


class LungSegLogic(SegmentationLogic):
    """process / exportLabelmap / processFolder: see LungSegLib/SegmentationLogic.py and FileLogic.py."""

    def getParameterNode(self):
        from LungSegLib.Parameter import parameterNodeFor

        return parameterNodeFor(super().getParameterNode())


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
        missing = InstallLogic().missingRequirements()
        if missing:  # a test never changes the user's Python: report a skip, not a pass
            self.skipTest(
                "LungSeg's Python packages are not installed ({}); press Apply once to install them".format(
                    ", ".join(missing)
                )
            )
        from lungseg.samples import sample_pngs

        # the parameter node is what the panel needs first (the real wrapper writes every default)
        parameterNode = LungSegLogic().getParameterNode()
        self.assertIsNone(parameterNode.inputVolume)
        volume = slicer.util.loadVolume(str(sample_pngs()[0]), {"singleFile": True})
        parameterNode.inputVolume = volume
        self.assertIs(parameterNode.inputVolume, volume)
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
        self.assertEqual(slicer.util.arrayFromVolume(uncertainty).shape, slicer.util.arrayFromVolume(volume).shape[:3])

        with tempfile.TemporaryDirectory() as folder:
            for name in ("lungs.nrrd", "lungs.png"):
                path = LungSegLogic().exportLabelmap(segmentation, volume, os.path.join(folder, name))
                self.assertGreater(path.stat().st_size, 0)
        self.delayDisplay("LungSeg test passed")
