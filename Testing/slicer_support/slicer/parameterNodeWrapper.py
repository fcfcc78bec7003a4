"""Stand-in for slicer.parameterNodeWrapper (pure Python in the application, absent from slicer-core).

Typed properties stored in a vtkMRMLScriptedModuleNode (node references for MRML node types, strings otherwise),
`Choice` validation, observers, and connectGui/disconnectGui for the widget kinds the LungSeg panel binds through
the "SlicerParameterName" dynamic property: qMRMLNodeComboBox, QCheckBox and QComboBox with a Choice.
"""
import dataclasses
import typing

import slicer


@dataclasses.dataclass
class Choice:
    choices: list


def _nodeTypes(datatype):
    """Class names of an MRML node type or a Union of them; None for other types."""
    options = typing.get_args(datatype) if typing.get_origin(datatype) is typing.Union else (datatype,)
    if all(isinstance(t, type) and issubclass(t, slicer.vtkMRMLNode) for t in options):
        return [t.__name__ for t in options]
    return None


def _isNodeType(datatype):
    return _nodeTypes(datatype) is not None


def _split(hint):
    if typing.get_origin(hint) is typing.Annotated:
        return typing.get_args(hint)[0], hint.__metadata__
    return hint, ()


def _property(name, datatype, annotations, default):
    choice = next((a for a in annotations if isinstance(a, Choice)), None)

    def get(self):
        node = self.parameterNode
        if _isNodeType(datatype):
            return node.GetNodeReference(name)
        raw = node.GetParameter(name)
        if not raw:
            return default
        return raw == "true" if datatype is bool else datatype(raw)

    def set(self, value):
        node = self.parameterNode
        if _isNodeType(datatype):
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            return
        if choice is not None and value not in choice.choices:
            raise ValueError(f"{name}: {value!r} is not one of {choice.choices}")
        node.SetParameter(name, ("true" if value else "false") if datatype is bool else str(value))

    return property(get, set)


def _connector(widget, datatype, annotations):
    """(read, write, signal) for a bound widget."""
    if hasattr(widget, "currentNodeChanged"):
        widget.nodeTypes = _nodeTypes(datatype)  # as Slicer's connector does
        return widget.currentNode, widget.setCurrentNode, widget.currentNodeChanged
    if widget.metaObject().className() == "QCheckBox":
        return widget.isChecked, widget.setChecked, widget.toggled
    choice = next((a for a in annotations if isinstance(a, Choice)), None)
    if widget.metaObject().className() == "QComboBox" and choice is not None:
        widget.clear()
        for value in choice.choices:
            widget.addItem(str(value))
        return (lambda: choice.choices[widget.currentIndex()],
                lambda value: widget.setCurrentIndex(choice.choices.index(value)), widget.currentIndexChanged)
    raise RuntimeError(f"no GUI connector for {widget.metaObject().className()} and {datatype}")


def parameterNodeWrapper(cls):
    fields = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        datatype, annotations = _split(hint)
        fields[name] = (datatype, annotations)
        setattr(cls, name, _property(name, datatype, annotations, cls.__dict__.get(name, datatype() if not
                                                                                   _isNodeType(datatype) else None)))

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode

    def AddObserver(self, event, callback, priority=0.0):
        return self.parameterNode.AddObserver(event, callback, priority)

    def RemoveObserver(self, tag):
        self.parameterNode.RemoveObserver(tag)

    def connectGui(self, gui):
        bound = {}
        for widget in vars(gui).values():
            name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
            if name in fields:
                bound[name] = _connector(widget, *fields[name])
        updating = []

        def toGui(*_):
            updating.append(True)
            try:
                for name, (_, write, _) in bound.items():
                    write(getattr(self, name))
            finally:
                updating.pop()

        slots = []
        for name, (read, _, signal) in bound.items():
            def fromGui(*_, name=name, read=read):
                if not updating:
                    setattr(self, name, read())
            signal.connect(fromGui)
            slots.append((signal, fromGui))
        toGui()
        return slots, self.parameterNode.AddObserver("ModifiedEvent", toGui)

    def disconnectGui(self, tag):
        slots, observer = tag
        for signal, slot in slots:
            signal.disconnect(slot)
        self.parameterNode.RemoveObserver(observer)

    for member in (__init__, AddObserver, RemoveObserver, connectGui, disconnectGui):
        setattr(cls, member.__name__, member)
    return cls
