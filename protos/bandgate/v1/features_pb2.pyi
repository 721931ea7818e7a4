from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExportRequest(_message.Message):
    __slots__ = ("device", "families")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FAMILIES_FIELD_NUMBER: _ClassVar[int]
    device: str
    families: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device: _Optional[str] = ..., families: _Optional[_Iterable[str]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("families", "device", "from_cursor", "no_follow")
    FAMILIES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FROM_CURSOR_FIELD_NUMBER: _ClassVar[int]
    NO_FOLLOW_FIELD_NUMBER: _ClassVar[int]
    families: _containers.RepeatedScalarFieldContainer[str]
    device: str
    from_cursor: int
    no_follow: bool
    def __init__(self, families: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., from_cursor: _Optional[int] = ..., no_follow: _Optional[bool] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("number", "text", "integer")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    number: float
    text: str
    integer: int
    def __init__(self, number: _Optional[float] = ..., text: _Optional[str] = ..., integer: _Optional[int] = ...) -> None: ...

class FeatureRecord(_message.Message):
    __slots__ = ("cursor", "family", "device", "start_us", "duration_s", "algo", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    START_US_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    ALGO_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    family: str
    device: str
    start_us: int
    duration_s: int
    algo: str
    values: _containers.MessageMap[str, Value]
    def __init__(self, cursor: _Optional[int] = ..., family: _Optional[str] = ..., device: _Optional[str] = ..., start_us: _Optional[int] = ..., duration_s: _Optional[int] = ..., algo: _Optional[str] = ..., values: _Optional[_Mapping[str, Value]] = ...) -> None: ...
