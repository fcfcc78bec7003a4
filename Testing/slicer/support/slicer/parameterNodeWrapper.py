"""Stand-in for Slicer's `slicer.parameterNodeWrapper` package (pure Python in the application, absent from
slicer-core), as strict as the real one for everything the LungSeg panel uses.

Behaviour copied (never the code) from Slicer's Base/Python/slicer/parameterNodeWrapper/ at v5.6.2, v5.8.1,
v5.10.0 and v5.12.0:
- wrapper.py: `_initMethod` writes every parameter that is not yet in the node with its default, through its
  serializer, when the wrapper is constructed; typed properties read and write through the serializers;
  `connectParametersToGui`, `connectGui`, `disconnectGui` and `_updateGUIFromParameterNode` with the
  version differences selected by `SLICER_VERSION` (below).
- serializers.py: ValidatedSerializer, Number/String/Path/Bool/Node/None/UnionSerializer: the storage layout in
  the vtkMRMLScriptedModuleNode (a node reference plus an "" parameter marker under the same name; Union members
  under "name.index"), the defaults, and `UnionSerializer._findBestSerializer`'s TypeError
  "Unable to write value 'None' of type '<class 'NoneType'>'" for a Union without None.
- validators.py: NotNone, IsNone, IsInstance (lets None pass), Choice, WithinRange, Minimum, Maximum, Exclude.
- default.py: Default.
- util.py: splitAnnotations, isNodeOrUnionOfNodes, getNodeTypes (None dropped from a Union).
- guiConnectors.py: qMRMLNodeComboBoxToNodeConnector (sets `nodeTypes`), QCheckBoxToBoolConnector (stateChanged)
  and QComboBoxToStringableConnector (needs Choice, else RuntimeError); `type(widget)` must match exactly, as in
  Slicer. The widgets are the PySide6 stand-ins, so the connectors call methods (setChecked, setCurrentIndex,
  setCurrentNode) where PythonQt assigns properties.

Version switch: `SLICER_VERSION` (default (5, 8), or env LUNGSEG_TEST_SLICER_VERSION="5.10"; tests may
monkeypatch it):
- 5.6, 5.8 (v5.6.2/v5.8.1 wrapper.py `_connectGui` has no `return`): `connectGui` returns None, so a caller's
  `disconnectGui(None)` does nothing, and the ModifiedEvent observer added by `connectParametersToGui` is never
  removed (those releases do not keep its tag).
- 5.10 (v5.10.0): `connectGui` returns the tag; `disconnectGui(tag)` drops the connectors, but the ModifiedEvent
  observer still stays (v5.10.0 does not keep its tag either).
- 5.12 and later (v5.12.0, `_guiVtkObserverTags`): `disconnectGui(tag)` also removes that observer.
- before 5.10, an `A | B` annotation has no serializer (v5.10.0 `_processClass` converts types.UnionType).

`guiUpdates` counts the `_updateGUIFromParameterNode` calls that rewrite at least one connected widget, so a test
can see observers pile up.
"""

import abc
import logging
import os
import pathlib
import types
import typing
import weakref

import slicer
import vtk


def _versionFromEnvironment():
    text = os.environ.get("LUNGSEG_TEST_SLICER_VERSION", "").strip()
    if not text:
        return (5, 8)
    major, minor = (text.split(".") + ["0"])[:2]
    return (int(major), int(minor))


SLICER_VERSION = _versionFromEnvironment()
guiUpdates = 0

SlicerParameterNamePropertyName = "SlicerParameterName"

__all__ = [
    "parameterNodeWrapper",
    "isParameterNodeWrapper",
    "SlicerParameterNamePropertyName",
    "Default",
    "Validator",
    "NotNone",
    "IsNone",
    "IsInstance",
    "Choice",
    "WithinRange",
    "Minimum",
    "Maximum",
    "Exclude",
    "getNodeTypes",
    "isNodeOrUnionOfNodes",
    "createGuiConnector",
    "GuiConnector",
]


# ------------------------------------------------------------------------------------------------ default.py
class Default:
    """Annotation for a parameter's default (a value, or a generator called each time)."""

    def __init__(self, value=None, *, generator=None):
        self._value = value
        self._generator = generator

    @property
    def value(self):
        return self._generator() if self._generator else self._value

    def __repr__(self):
        return f"Default(value={self._value}, generator={self._generator})"


def _extractDefault(annotations):
    defaults = [a for a in annotations if isinstance(a, Default)]
    if len(defaults) > 1:
        raise Exception("Multiple defaults found")
    return (defaults[0] if defaults else None), [a for a in annotations if not isinstance(a, Default)]


# --------------------------------------------------------------------------------------------- validators.py
class Validator(abc.ABC):
    @abc.abstractmethod
    def validate(self, value) -> None:
        raise NotImplementedError


class NotNone(Validator):
    def validate(self, value):
        if value is None:
            raise ValueError("Value must not be None")


class IsNone(Validator):
    def validate(self, value):
        if value is not None:
            raise ValueError("Value must be None")


class IsInstance(Validator):
    """None passes, as in Slicer: a plain node type accepts None."""

    def __init__(self, classtype):
        self.classtype = classtype

    def validate(self, value):
        if value is not None and not isinstance(value, self.classtype):
            raise TypeError(f"Value must be of type '{self.classtype}', is type '{type(value)}' value '{value}'")


class Choice(Validator):
    def __init__(self, choices):
        self.choices = choices

    def __repr__(self):
        return f"Choice({self.choices})"

    def validate(self, value):
        if value not in self.choices:
            raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")


class WithinRange(Validator):
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


class Minimum(Validator):
    def __init__(self, minimum):
        self.minimum = minimum

    def validate(self, value):
        if value < self.minimum:
            raise ValueError(f"Value must be greater than {self.minimum}, is {value}")


class Maximum(Validator):
    def __init__(self, maximum):
        self.maximum = maximum

    def validate(self, value):
        if value > self.maximum:
            raise ValueError(f"Value must be greater than {self.maximum}, is {value}")


class Exclude(Validator):
    def __init__(self, excludedValues):
        self.excludedValues = excludedValues

    def validate(self, value):
        if value in self.excludedValues:
            raise ValueError(
                f"Value is {value}, but must not be an excluded value: excluded values {self.excludedValues}"
            )


def _isValidator(x):
    return isinstance(x, Validator) or (isinstance(x, type) and issubclass(x, Validator))


# --------------------------------------------------------------------------------------------------- util.py
def splitAnnotations(possiblyAnnotatedType):
    """(type, annotations) for a possibly Annotated type."""
    if typing.get_origin(possiblyAnnotatedType) is typing.Annotated:
        return typing.get_args(possiblyAnnotatedType)[0], tuple(possiblyAnnotatedType.__metadata__)
    return possiblyAnnotatedType, ()


def unannotatedType(possiblyAnnotatedType):
    return splitAnnotations(possiblyAnnotatedType)[0]


def _isNodeClass(type_):
    return isinstance(type_, type) and issubclass(type_, slicer.vtkMRMLNode)


def isNodeOrUnionOfNodes(datatype) -> bool:
    """A node type, or a Union of node types and None."""
    underlying = unannotatedType(datatype)
    if _isNodeClass(underlying):
        return True
    if typing.get_origin(underlying) is typing.Union:
        return all(
            isinstance(t, type) and (t is type(None) or issubclass(t, slicer.vtkMRMLNode))
            for t in (unannotatedType(a) for a in typing.get_args(underlying))
        )
    return False


def getNodeTypes(datatype):
    """The node class names of a node type or Union (None dropped), as the node selector's `nodeTypes`."""
    underlying = unannotatedType(datatype)
    if _isNodeClass(underlying):
        return (underlying().GetClassName(),)
    if typing.get_origin(underlying) is typing.Union:
        return tuple(
            t().GetClassName() for t in (unannotatedType(a) for a in typing.get_args(underlying)) if _isNodeClass(t)
        )
    raise TypeError(f"Cannot handle type {datatype}")


# ---------------------------------------------------------------------------------------------- serializers.py
class Serializer(abc.ABC):
    @staticmethod
    def canSerialize(type_) -> bool:
        return False

    def default(self):
        raise NotImplementedError

    def isIn(self, parameterNode, name):
        return parameterNode.HasParameter(name)

    def remove(self, parameterNode, name):
        parameterNode.UnsetParameter(name)

    def supportsCaching(self):
        return True


class ValidatedSerializer(Serializer):
    """Runs its validators, then writes through the wrapped serializer; nested ones flatten (inner first)."""

    def __init__(self, serializer, validators):
        if isinstance(serializer, ValidatedSerializer):
            self.serializer = serializer.serializer
            self.validators = serializer.validators + list(validators or [])
        else:
            self.serializer = serializer
            self.validators = list(validators or [])

    def default(self):
        return self.serializer.default()

    def isIn(self, parameterNode, name):
        return self.serializer.isIn(parameterNode, name)

    def validate(self, value):
        for validator in self.validators:
            validator.validate(value)

    def write(self, parameterNode, name, value):
        self.validate(value)
        self.serializer.write(parameterNode, name, value)

    def read(self, parameterNode, name):
        return self.serializer.read(parameterNode, name)

    def remove(self, parameterNode, name):
        self.serializer.remove(parameterNode, name)

    def supportsCaching(self):
        return self.serializer.supportsCaching()


class NumberSerializer(Serializer):
    @staticmethod
    def canSerialize(type_):
        return type_ in (int, float)

    @staticmethod
    def create(type_):
        return ValidatedSerializer(
            NumberSerializer(type_), [NotNone(), IsInstance((int, float) if type_ == float else int)]
        )

    def __init__(self, type_):
        self.type = type_

    def default(self):
        return 0

    def write(self, parameterNode, name, value):
        parameterNode.SetParameter(name, str(value))

    def read(self, parameterNode, name):
        return self.type(parameterNode.GetParameter(name))


class StringSerializer(Serializer):
    @staticmethod
    def canSerialize(type_):
        return type_ == str

    @staticmethod
    def create(type_):
        return ValidatedSerializer(StringSerializer(), [NotNone(), IsInstance(type_)])

    def default(self):
        return ""

    def write(self, parameterNode, name, value):
        parameterNode.SetParameter(name, str(value))

    def read(self, parameterNode, name):
        return parameterNode.GetParameter(name)


_PATH_TYPES = (
    pathlib.Path,
    pathlib.PosixPath,
    pathlib.WindowsPath,
    pathlib.PurePath,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
)


class PathSerializer(Serializer):
    @staticmethod
    def canSerialize(type_):
        return type_ in _PATH_TYPES

    @staticmethod
    def create(type_):
        return ValidatedSerializer(PathSerializer(type_), [NotNone(), IsInstance(type_)])

    def __init__(self, type_):
        self.type = type_

    def default(self):
        return self.type()

    def write(self, parameterNode, name, value):
        parameterNode.SetParameter(name, str(value))

    def read(self, parameterNode, name):
        return self.type(parameterNode.GetParameter(name))


class BoolSerializer(Serializer):
    @staticmethod
    def canSerialize(type_):
        return type_ == bool

    @staticmethod
    def create(type_):
        return ValidatedSerializer(BoolSerializer(), [NotNone(), IsInstance(type_)])

    def default(self):
        return False

    def write(self, parameterNode, name, value):
        parameterNode.SetParameter(name, "True" if value else "False")

    def read(self, parameterNode, name):
        return parameterNode.GetParameter(name) == "True"


class NodeSerializer(Serializer):
    """A node reference, plus an empty parameter of the same name so that a None value is "in" the node."""

    @staticmethod
    def canSerialize(type_):
        return _isNodeClass(type_)

    @staticmethod
    def create(type_):
        return ValidatedSerializer(NodeSerializer(), [IsInstance(type_)])

    def default(self):
        return None

    def write(self, parameterNode, name, value):
        parameterNode.SetParameter(name, "")
        parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)

    def read(self, parameterNode, name):
        return parameterNode.GetNodeReference(name)

    def remove(self, parameterNode, name):
        parameterNode.UnsetParameter(name)
        parameterNode.RemoveNodeReferenceIDs(name)


class NoneSerializer(Serializer):
    """Only None, stored as a bool marker; used by UnionSerializer for Optional."""

    @staticmethod
    def canSerialize(type_):
        return type_ is type(None)

    @staticmethod
    def create(type_):
        return ValidatedSerializer(NoneSerializer(), [IsNone()])

    def default(self):
        return dict()  # sic: Slicer's NoneSerializer.default

    def write(self, parameterNode, name, value):
        BoolSerializer().write(parameterNode, name, True)

    def read(self, parameterNode, name):
        return None


class UnionSerializer(Serializer):
    """Union members stored under "name.index"; the first member whose type and validators accept a value."""

    @staticmethod
    def canSerialize(type_):
        return typing.get_origin(type_) is typing.Union

    @staticmethod
    def create(type_):
        args = typing.get_args(type_)
        return UnionSerializer([_createSerializerFromAnnotatedType(arg) for arg in args])

    def __init__(self, serializers):
        self._serializers = [ValidatedSerializer(s, []) for s in serializers]

    def default(self):
        # Optional[X] (exactly two members, the second None) defaults to None; else the first member's default
        if len(self._serializers) == 2 and type(self._serializers[1].serializer) is NoneSerializer:
            return None
        return self._serializers[0].default()

    @staticmethod
    def _paramName(name, index):
        return f"{name}.{index}"

    def isIn(self, parameterNode, name):
        return any(s.isIn(parameterNode, self._paramName(name, i)) for i, s in enumerate(self._serializers))

    def _findBestSerializer(self, value):
        raised = None
        for index, serializer in enumerate(self._serializers):
            if serializer.serializer.canSerialize(type(value)):
                try:
                    serializer.validate(value)
                    return index, serializer
                except Exception as e:
                    raised = e
        if raised is not None:
            raise raised
        raise TypeError(f"Unable to write value '{value}' of type '{type(value)}'")

    def write(self, parameterNode, name, value):
        with slicer.util.NodeModify(parameterNode):
            index, serializer = self._findBestSerializer(value)
            wasIn = self.isIn(parameterNode, name)
            oldValue = self.read(parameterNode, name) if wasIn else None
            try:
                self.remove(parameterNode, name)
                serializer.write(parameterNode, self._paramName(name, index), value)
            except Exception:
                if wasIn:
                    self.write(parameterNode, name, oldValue)
                else:
                    self.remove(parameterNode, name)
                raise

    def read(self, parameterNode, name):
        for index, serializer in enumerate(self._serializers):
            if serializer.isIn(parameterNode, self._paramName(name, index)):
                return serializer.read(parameterNode, self._paramName(name, index))
        raise KeyError(f"Unable to find value for name: {name}")

    def remove(self, parameterNode, name):
        with slicer.util.NodeModify(parameterNode):
            for index, serializer in enumerate(self._serializers):
                serializer.remove(parameterNode, self._paramName(name, index))

    def supportsCaching(self):
        return all(s.supportsCaching() for s in self._serializers)


# Slicer's registration order: the first that can serialize a type wins
_registeredSerializers = [
    NumberSerializer,
    StringSerializer,
    PathSerializer,
    BoolSerializer,
    NodeSerializer,
    NoneSerializer,
    UnionSerializer,
]


def _createSerializer(type_, annotations):
    validators = [a for a in annotations if _isValidator(a)]
    annotations = [a for a in annotations if not _isValidator(a)]
    for factory in _registeredSerializers:
        if factory.canSerialize(type_):
            return ValidatedSerializer(factory.create(type_), validators), annotations
    raise Exception(
        f"Unable to create serializer for type: {str(type_)} (the stand-in emulates only the "
        "serializers LungSeg can use: int, float, str, pathlib, bool, MRML nodes, None and Union)"
    )


def _createSerializerFromAnnotatedType(annotatedType):
    type_, annotations = splitAnnotations(annotatedType)
    serializer, annotations = _createSerializer(type_, annotations)
    if annotations:
        logging.warning(f"Unused annotations: {annotations}")
    return serializer


# -------------------------------------------------------------------------------------------- guiConnectors.py
class GuiConnector(abc.ABC):
    """Adapts a widget to a datatype: read, write, and a change callback (None disconnects)."""

    def __init__(self):
        self._callback = None

    def onChanged(self, callback):
        self._callback = callback
        if callback is None:
            self._disconnect()
        else:
            self._connect()

    def changed(self, *_):
        if self._callback:
            self._callback()

    def _signal(self):
        raise NotImplementedError

    def _connect(self):
        self._signal().connect(self.changed)

    def _disconnect(self):
        self._signal().disconnect(self.changed)

    def widget(self):
        return self._widget


def _qt():
    import qt

    return qt


class QCheckBoxToBoolConnector(GuiConnector):
    @staticmethod
    def canRepresent(widget, datatype):
        # v5.6.2: QCheckBox only; v5.8.1+: also ctkCheckBox (which has no stand-in)
        return unannotatedType(datatype) == bool and type(widget) is _qt().QCheckBox

    def __init__(self, widget, datatype):
        super().__init__()
        self._widget = widget

    def _signal(self):
        return self._widget.stateChanged

    def read(self):
        return self._widget.isChecked()

    def write(self, value):
        self._widget.setChecked(value)


class QComboBoxToStringableConnector(GuiConnector):
    @staticmethod
    def canRepresent(widget, datatype):
        return type(widget) is _qt().QComboBox and unannotatedType(datatype) in (int, float, str, bool)

    def __init__(self, widget, datatype):
        super().__init__()
        choice = next((a for a in splitAnnotations(datatype)[1] if isinstance(a, Choice)), None)
        if choice is None:
            raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
        self._widget = widget
        self._choices = choice.choices
        widget.clear()
        for value in self._choices:
            widget.addItem(str(value))

    def _signal(self):
        return self._widget.currentIndexChanged

    def read(self):
        return self._choices[self._widget.currentIndex()]

    def write(self, value):
        for index, choice in enumerate(self._choices):
            if choice == value:
                self._widget.setCurrentIndex(index)
                return
        raise ValueError(f"Unable to find value {value} in choices {self._choices}")


class qMRMLNodeComboBoxToNodeConnector(GuiConnector):
    @staticmethod
    def canRepresent(widget, datatype):
        import qMRMLWidgets  # the stand-in for slicer.qMRMLNodeComboBox

        return type(widget) is qMRMLWidgets.qMRMLNodeComboBox and isNodeOrUnionOfNodes(datatype)

    def __init__(self, widget, datatype):
        super().__init__()
        self._widget = widget
        widget.nodeTypes = getNodeTypes(datatype)

    def _signal(self):
        return self._widget.currentNodeChanged

    def read(self):
        return self._widget.currentNode()

    def write(self, value):
        self._widget.setCurrentNode(value)


_registeredGuiConnectors = [QCheckBoxToBoolConnector, QComboBoxToStringableConnector, qMRMLNodeComboBoxToNodeConnector]


def createGuiConnector(widget, datatype):
    for connectorType in _registeredGuiConnectors:
        if connectorType.canRepresent(widget, datatype):
            return connectorType(widget, datatype)
    raise RuntimeError(
        f"Unable to create GUI connector from datatype '{datatype}' to widget type '{type(widget)}'. "
        "(The stand-in has the connectors for qMRMLNodeComboBox, QCheckBox and QComboBox only.)"
    )


# ------------------------------------------------------------------------------------------------- wrapper.py
class _ParameterInfo:
    def __init__(self, basename, serializer, default, unalteredType):
        self.basename = basename
        self.serializer = serializer
        self.default = default
        self.unalteredType = unalteredType


class _Parameter:
    def __init__(self, info, prefix=None):
        self.name = f"{prefix or ''}{info.basename}"
        self.serializer = info.serializer
        self.default = info.default

    def isIn(self, parameterNode):
        return self.serializer.isIn(parameterNode, self.name)

    def write(self, parameterNode, value):
        self.serializer.write(parameterNode, self.name, value)

    def read(self, parameterNode):
        if not self.serializer.isIn(parameterNode, self.name):
            self.serializer.write(parameterNode, self.name, self.default.value)
        return self.serializer.read(parameterNode, self.name)

    def supportsCaching(self):
        return self.serializer.supportsCaching()


class _ParameterWrapper:
    def __init__(self, parameter, parameterNode):
        self.parameter = parameter
        self.parameterNode = parameterNode

    def read(self):
        return self.parameter.read(self.parameterNode)

    def write(self, value):
        self.parameter.write(self.parameterNode, value)


class _CachedParameterWrapper(_ParameterWrapper):
    """Caches the value; a ModifiedEvent observer (through a weak reference) re-reads it, as in Slicer."""

    def __init__(self, parameter, parameterNode):
        super().__init__(parameter, parameterNode)
        self._value = parameter.read(parameterNode)
        selfRef = weakref.ref(self)
        self._observerTag = parameterNode.AddObserver(
            vtk.vtkCommand.ModifiedEvent, lambda caller, event: selfRef()._onModified()
        )
        self._currentlyWriting = False

    def __del__(self):
        self.parameterNode.RemoveObserver(self._observerTag)

    def _onModified(self):
        if not self._currentlyWriting:
            self._value = self.parameter.read(self.parameterNode)

    def write(self, value):
        self._currentlyWriting = True
        try:
            with slicer.util.NodeModify(self.parameterNode):
                super().write(value)
                self._value = self.parameter.read(self.parameterNode)
        finally:
            self._currentlyWriting = False

    def read(self):
        return self._value


def _initMethod(self, parameterNode, prefix=None):
    self.parameterNode = parameterNode
    self._parameterGUIs = dict()
    self._nextParameterGUIsTag = 0
    self._guiVtkObserverTags = dict()  # used from 5.12 on
    self._updatingGUIFromParameterNode = False
    for info in self.allParameters.values():
        parameter = _Parameter(info, prefix)
        if not parameter.isIn(self.parameterNode):
            parameter.write(self.parameterNode, parameter.default.value)
        wrapperClass = _CachedParameterWrapper if parameter.supportsCaching() else _ParameterWrapper
        setattr(self, f"_{info.basename}_impl", wrapperClass(parameter, parameterNode))


def _checkParamName(instanceOrClass, name):
    if name not in instanceOrClass.allParameters:
        raise ValueError(
            f"Cannot find a param with the given name: {name}"
            + "\n  Found parameters ["
            + "".join(f"\n    {n}," for n in instanceOrClass.allParameters)
            + "\n  ]"
        )


def _getValue(self, name):
    _checkParamName(self, name)
    return getattr(self, f"_{name}_impl").read()


def _setValue(self, name, value):
    _checkParamName(self, name)
    return getattr(self, f"_{name}_impl").write(value)


def _makeGuiToParamCallback(self, name, connector):
    def callback():
        with slicer.util.NodeModify(self):
            if not self._updatingGUIFromParameterNode:
                self.setValue(name, connector.read())

    return callback


def _updateGUIFromParameterNode(self):
    global guiUpdates
    if self._updatingGUIFromParameterNode:
        return
    try:
        self._updatingGUIFromParameterNode = True
        if any(self._parameterGUIs.values()):
            guiUpdates += 1
        with slicer.util.NodeModify(self):
            for mapping in self._parameterGUIs.values():
                for name, connector in mapping.items():
                    connector.write(self.getValue(name))
    finally:
        self._updatingGUIFromParameterNode = False


def _connectParametersToGui(self, mapping):
    for name in mapping:
        _checkParamName(self, name)
    connectors = {
        name: value if isinstance(value, GuiConnector) else createGuiConnector(value, self.dataType(name))
        for name, value in mapping.items()
    }
    tag = self._nextParameterGUIsTag
    self._nextParameterGUIsTag += 1
    self._parameterGUIs[tag] = connectors
    for name, connector in connectors.items():
        connector.write(self.getValue(name))
        connector.onChanged(_makeGuiToParamCallback(self, name, connector))
    observerTag = self.AddObserver(
        vtk.vtkCommand.ModifiedEvent, lambda caller, event: _updateGUIFromParameterNode(self)
    )
    if SLICER_VERSION >= (5, 12):
        self._guiVtkObserverTags[tag] = observerTag
    return tag


def _isWidget(obj):
    return getattr(obj, "isWidgetType", lambda: False)()


def _connectGui(self, gui):
    byName = {}
    if _isWidget(gui):
        for widget in gui.findChildren(_qt().QWidget):
            if widget.property(SlicerParameterNamePropertyName):
                byName[widget.property(SlicerParameterNamePropertyName)] = widget
    else:
        for widget in gui.__dict__.values():  # every value must have .property(), as in Slicer
            if widget.property(SlicerParameterNamePropertyName):
                byName[widget.property(SlicerParameterNamePropertyName)] = widget
    tag = _connectParametersToGui(self, byName)
    return tag if SLICER_VERSION >= (5, 10) else None


def _disconnectGui(self, guiTag):
    if guiTag in self._parameterGUIs:
        for connector in self._parameterGUIs[guiTag].values():
            connector.onChanged(None)
        del self._parameterGUIs[guiTag]
    if guiTag in self._guiVtkObserverTags:
        self.RemoveObserver(self._guiVtkObserverTags.pop(guiTag))


def _makeProperty(name):
    return property(
        lambda self: getattr(self, f"_{name}_impl").read(),
        lambda self, value: getattr(self, f"_{name}_impl").write(value),
    )


def _processClass(classtype):
    allParameters = {}
    for name, nametype in typing.get_type_hints(classtype, include_extras=True).items():
        membertype, annotations = splitAnnotations(nametype)
        if isinstance(membertype, types.UnionType):
            if SLICER_VERSION < (5, 10):
                raise Exception(
                    f"Unable to create serializer for {classtype} member {name}: "
                    f"{membertype} (types.UnionType is converted only from Slicer 5.10)"
                )
            membertype = typing.Union[tuple(typing.get_args(membertype))]
        try:
            serializer, annotations = _createSerializer(membertype, annotations)
        except Exception as e:
            raise Exception(f"Unable to create serializer for {classtype} member {name}") from e
        if hasattr(classtype, name):
            default = Default(getattr(classtype, name))
        else:
            default, annotations = _extractDefault(annotations)
            default = default if default is not None else Default(serializer.default())
        if annotations:
            logging.warning(f"Unused annotations: {annotations}")
        allParameters[name] = _ParameterInfo(name, serializer, default, nametype)
        setattr(classtype, name, _makeProperty(name))

    def checkedSetAttr(attr, value):
        if hasattr(classtype, attr):
            raise ValueError(f"Cannot use reserved name '{attr}' in a parameterNodeWrapper")
        setattr(classtype, attr, value)

    def dataType(membername):
        _checkParamName(classtype, membername)
        return classtype.allParameters[membername].unalteredType

    checkedSetAttr("allParameters", allParameters)
    checkedSetAttr("_is_parameter_node_wrapper", True)
    classtype.__init__ = _initMethod
    checkedSetAttr(
        "default", lambda self, name: (_checkParamName(self, name), getattr(self, f"_{name}_impl").parameter.default)[1]
    )
    checkedSetAttr(
        "isCached",
        lambda self, name: (
            _checkParamName(self, name),
            isinstance(getattr(self, f"_{name}_impl"), _CachedParameterWrapper),
        )[1],
    )
    checkedSetAttr("dataType", staticmethod(dataType))
    checkedSetAttr("getValue", _getValue)
    checkedSetAttr("setValue", _setValue)
    checkedSetAttr("connectGui", _connectGui)
    checkedSetAttr("connectParametersToGui", _connectParametersToGui)
    checkedSetAttr("disconnectGui", _disconnectGui)
    checkedSetAttr("StartModify", lambda self: self.parameterNode.StartModify())
    checkedSetAttr("EndModify", lambda self, wasModified: self.parameterNode.EndModify(wasModified))
    checkedSetAttr(
        "AddObserver",
        lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback, priority),
    )
    checkedSetAttr("RemoveObserver", lambda self, tag: self.parameterNode.RemoveObserver(tag))
    checkedSetAttr("Modified", lambda self: self.parameterNode.Modified())
    return classtype


def isParameterNodeWrapper(classOrObj):
    return getattr(classOrObj, "_is_parameter_node_wrapper", False)


def parameterNodeWrapper(classtype=None):
    """Class decorator: typed properties stored in a vtkMRMLScriptedModuleNode, with GUI binding."""
    if classtype is None:
        return _processClass
    return _processClass(classtype)
