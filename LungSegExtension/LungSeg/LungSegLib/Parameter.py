"""The module's parameter node: the panel's choices, saved with the scene."""
from typing import Annotated, Union

import slicer
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper

DEVICES = ["auto", "cpu", "cuda"]


@parameterNodeWrapper
class LungSegParameterNode:
    # both types by name: the GUI connector sets the selector's node types from this, without child types
    inputVolume: Union[slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLVectorVolumeNode]
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    model: str = "unet"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    uncertainty: bool = False
    uncertaintyVolume: slicer.vtkMRMLScalarVolumeNode
