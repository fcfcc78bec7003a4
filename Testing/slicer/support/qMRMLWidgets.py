"""Stand-ins (PySide6) for the qMRML widgets in LungSeg.ui: a scene-aware container and a node selector that
lists the scene's nodes of its `nodeTypes`, as the application's qMRMLNodeComboBox does."""

from PySide6.QtCore import Property, Signal
from PySide6.QtWidgets import QComboBox, QWidget


class qMRMLWidget(QWidget):
    mrmlSceneChanged = Signal(object)

    def setMRMLScene(self, scene):
        # the .ui connects mrmlSceneChanged to each selector's setMRMLScene; PySide6 cannot resolve those C++
        # signatures, so pass the scene on directly
        for child in self.findChildren(qMRMLNodeComboBox):
            child.setMRMLScene(scene)
        self.mrmlSceneChanged.emit(scene)


class qMRMLNodeComboBox(QComboBox):
    currentNodeChanged = Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene, self._nodes, self._current = None, [], None
        self._nodeTypes, self._noneEnabled, self._showChildNodeTypes, self._noneDisplay = [], False, True, "None"
        self.currentIndexChanged.connect(self._onIndexChanged)

    def _types(self):
        return list(self._nodeTypes)

    def _setTypes(self, types):
        self._nodeTypes = list(types)
        if self._scene is not None:
            self._refresh()

    nodeTypes = Property("QStringList", _types, _setTypes)
    noneEnabled = Property(bool, lambda self: self._noneEnabled, lambda self, v: setattr(self, "_noneEnabled", v))
    showChildNodeTypes = Property(
        bool, lambda self: self._showChildNodeTypes, lambda self, v: setattr(self, "_showChildNodeTypes", v)
    )
    noneDisplay = Property(str, lambda self: self._noneDisplay, lambda self, v: setattr(self, "_noneDisplay", v))

    def setMRMLScene(self, scene):
        self._scene = scene
        for event in ("NodeAddedEvent", "NodeRemovedEvent"):
            scene.AddObserver(event, lambda *_: self._refresh())
        self._refresh()

    def _listedNodes(self):
        nodes = []
        for nodeType in self._nodeTypes:
            collection = self._scene.GetNodesByClass(nodeType)
            for i in range(collection.GetNumberOfItems()):
                node = collection.GetItemAsObject(i)
                exact = node.GetClassName() in self._nodeTypes
                if node not in nodes and not node.GetHideFromEditors() and (self._showChildNodeTypes or exact):
                    nodes.append(node)
        return nodes

    def _rebuild(self):
        self._nodes = self._listedNodes()
        self.blockSignals(True)
        self.clear()
        if self._noneEnabled:
            self.addItem(self._noneDisplay)
        for node in self._nodes:
            self.addItem(node.GetName())
        self.blockSignals(False)

    def _refresh(self):
        self._rebuild()
        current = self._current if self._current in self._nodes else None
        if current is None and not self._noneEnabled and self._nodes:
            current = self._nodes[0]
        self.setCurrentNode(current)

    def _offset(self):
        return 1 if self._noneEnabled else 0

    def _onIndexChanged(self, index):
        position = index - self._offset()
        node = self._nodes[position] if 0 <= position < len(self._nodes) else None
        if node is not self._current:
            self._current = node
            self.currentNodeChanged.emit(node)

    def currentNode(self):
        return self._current

    def currentNodeID(self):
        return self._current.GetID() if self._current else ""

    def setCurrentNode(self, node):
        if node is not None and node not in self._nodes and self._scene is not None:
            self._rebuild()
        index = self._nodes.index(node) + self._offset() if node in self._nodes else (0 if self._noneEnabled else -1)
        self.blockSignals(True)
        self.setCurrentIndex(index)
        self.blockSignals(False)
        self._onIndexChanged(index)
