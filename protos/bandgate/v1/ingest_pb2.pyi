from bandgate.v1 import batch_pb2 as _batch_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FrameError(_message.Message):
    __slots__ = ("index", "seq", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    seq: int
    reason: str
    def __init__(self, index: _Optional[int] = ..., seq: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("device_id", "boot_id", "first_seq", "last_seq", "acked_seq", "has_acked_seq", "code", "reason", "expected_seq", "retry_after_ms", "frame_errors")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    HAS_ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SEQ_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    FRAME_ERRORS_FIELD_NUMBER: _ClassVar[int]
    device_id: int
    boot_id: int
    first_seq: int
    last_seq: int
    acked_seq: int
    has_acked_seq: bool
    code: int
    reason: str
    expected_seq: int
    retry_after_ms: int
    frame_errors: _containers.RepeatedCompositeFieldContainer[FrameError]
    def __init__(self, device_id: _Optional[int] = ..., boot_id: _Optional[int] = ..., first_seq: _Optional[int] = ..., last_seq: _Optional[int] = ..., acked_seq: _Optional[int] = ..., has_acked_seq: _Optional[bool] = ..., code: _Optional[int] = ..., reason: _Optional[str] = ..., expected_seq: _Optional[int] = ..., retry_after_ms: _Optional[int] = ..., frame_errors: _Optional[_Iterable[_Union[FrameError, _Mapping]]] = ...) -> None: ...
