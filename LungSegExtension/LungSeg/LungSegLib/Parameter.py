"""The module's parameter node: the panel's choices, saved with the scene."""

from typing import Annotated, Optional, Union

import slicer
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper

DEVICES = ["auto", "cpu", "cuda"]


@parameterNodeWrapper
class LungSegParameterNode:
    # both types by name: the GUI connector sets the selector's node types from this, without child types. The
    # None is required: the wrapper writes every default (None here) when it is made, and a Union without None
    # refuses it (parameterNodeWrapper/util.py isNodeOrUnionOfNodes, serializers.py UnionSerializer, 5.6-5.12)
    inputVolume: Optional[Union[slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLVectorVolumeNode]]
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    model: str = "unet"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    uncertainty: bool = False
    uncertaintyVolume: slicer.vtkMRMLScalarVolumeNode
    # what the orientation classifier may correct (`lungseg segment --corrections`)
    correctTurns: bool = True
    correctInversion: bool = True
    correctMirroring: bool = True


def corrections(parameterNode: LungSegParameterNode) -> str:
    """The chosen corrections as `lungseg segment --corrections` takes them."""
    chosen = (
        ("turns", parameterNode.correctTurns),
        ("inversion", parameterNode.correctInversion),
        ("mirroring", parameterNode.correctMirroring),
    )
    return ",".join(name for name, on in chosen if on) or "none"


# One wrapper per parameter node for the session. On Slicer 5.6-5.10 a wrapper that was connected to the GUI keeps
# an observer on its node that refers back to it even after disconnectGui, so a second wrapper connected to the same
# node adds a second GUI update per change, and a dropped wrapper becomes a cycle through the node that the garbage
# collector may break inside one of the node's own event callbacks (seen crashing with VTK 9.6). So wrappers are
# reused, and a panel that goes away retires its wrapper, which stays referenced here.
_liveWrappers: dict = {}
_retiredWrappers: list = []


def parameterNodeFor(node) -> LungSegParameterNode:
    wrapper = _liveWrappers.get(node)
    if wrapper is None:
        wrapper = _liveWrappers[node] = LungSegParameterNode(node)
    return wrapper


def retire(wrapper) -> None:
    """The panel that was connected to `wrapper` is gone: the next panel gets a fresh wrapper for that node."""
    if _liveWrappers.get(wrapper.parameterNode) is wrapper:
        del _liveWrappers[wrapper.parameterNode]
    _retiredWrappers.append(wrapper)
