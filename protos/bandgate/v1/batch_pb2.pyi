from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class BatchFlag(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_FLAG_NONE: _ClassVar[BatchFlag]
    BATCH_FLAG_DATA_DROPPED_BEFORE: _ClassVar[BatchFlag]
BATCH_FLAG_NONE: BatchFlag
BATCH_FLAG_DATA_DROPPED_BEFORE: BatchFlag

class Batch(_message.Message):
    __slots__ = ("device_id", "boot_id", "first_seq", "last_seq", "flags", "dict_id", "payload", "format_version", "frame_count")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    DICT_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    device_id: int
    boot_id: int
    first_seq: int
    last_seq: int
    flags: int
    dict_id: int
    payload: bytes
    format_version: int
    frame_count: int
    def __init__(self, device_id: _Optional[int] = ..., boot_id: _Optional[int] = ..., first_seq: _Optional[int] = ..., last_seq: _Optional[int] = ..., flags: _Optional[int] = ..., dict_id: _Optional[int] = ..., payload: _Optional[bytes] = ..., format_version: _Optional[int] = ..., frame_count: _Optional[int] = ...) -> None: ...
