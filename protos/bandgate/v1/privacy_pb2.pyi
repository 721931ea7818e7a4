from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceRequest(_message.Message):
    __slots__ = ("device", "totp")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TOTP_FIELD_NUMBER: _ClassVar[int]
    device: str
    totp: str
    def __init__(self, device: _Optional[str] = ..., totp: _Optional[str] = ...) -> None: ...

class SetConsentRequest(_message.Message):
    __slots__ = ("device", "grant", "withdraw", "totp")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    WITHDRAW_FIELD_NUMBER: _ClassVar[int]
    TOTP_FIELD_NUMBER: _ClassVar[int]
    device: str
    grant: _containers.RepeatedScalarFieldContainer[str]
    withdraw: _containers.RepeatedScalarFieldContainer[str]
    totp: str
    def __init__(self, device: _Optional[str] = ..., grant: _Optional[_Iterable[str]] = ..., withdraw: _Optional[_Iterable[str]] = ..., totp: _Optional[str] = ...) -> None: ...

class FamilyConsent(_message.Message):
    __slots__ = ("family", "granted", "time_us", "actor")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    TIME_US_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    family: str
    granted: bool
    time_us: int
    actor: str
    def __init__(self, family: _Optional[str] = ..., granted: _Optional[bool] = ..., time_us: _Optional[int] = ..., actor: _Optional[str] = ...) -> None: ...

class ConsentState(_message.Message):
    __slots__ = ("device", "ownership", "families", "processing", "reason", "guardian", "totp_enrolled")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    OWNERSHIP_FIELD_NUMBER: _ClassVar[int]
    FAMILIES_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GUARDIAN_FIELD_NUMBER: _ClassVar[int]
    TOTP_ENROLLED_FIELD_NUMBER: _ClassVar[int]
    device: str
    ownership: str
    families: _containers.RepeatedCompositeFieldContainer[FamilyConsent]
    processing: bool
    reason: str
    guardian: bool
    totp_enrolled: bool
    def __init__(self, device: _Optional[str] = ..., ownership: _Optional[str] = ..., families: _Optional[_Iterable[_Union[FamilyConsent, _Mapping]]] = ..., processing: _Optional[bool] = ..., reason: _Optional[str] = ..., guardian: _Optional[bool] = ..., totp_enrolled: _Optional[bool] = ...) -> None: ...

class GuardianRequest(_message.Message):
    __slots__ = ("device", "guardian", "withdraw")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    GUARDIAN_FIELD_NUMBER: _ClassVar[int]
    WITHDRAW_FIELD_NUMBER: _ClassVar[int]
    device: str
    guardian: str
    withdraw: bool
    def __init__(self, device: _Optional[str] = ..., guardian: _Optional[str] = ..., withdraw: _Optional[bool] = ...) -> None: ...

class Profile(_message.Message):
    __slots__ = ("birth_year", "country", "height_cm", "weight_kg", "sex")
    BIRTH_YEAR_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_CM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_KG_FIELD_NUMBER: _ClassVar[int]
    SEX_FIELD_NUMBER: _ClassVar[int]
    birth_year: int
    country: str
    height_cm: float
    weight_kg: float
    sex: str
    def __init__(self, birth_year: _Optional[int] = ..., country: _Optional[str] = ..., height_cm: _Optional[float] = ..., weight_kg: _Optional[float] = ..., sex: _Optional[str] = ...) -> None: ...

class SetProfileRequest(_message.Message):
    __slots__ = ("device", "profile", "clear", "totp")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    TOTP_FIELD_NUMBER: _ClassVar[int]
    device: str
    profile: Profile
    clear: _containers.RepeatedScalarFieldContainer[str]
    totp: str
    def __init__(self, device: _Optional[str] = ..., profile: _Optional[_Union[Profile, _Mapping]] = ..., clear: _Optional[_Iterable[str]] = ..., totp: _Optional[str] = ...) -> None: ...

class ProfileState(_message.Message):
    __slots__ = ("device", "version", "profile")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    device: str
    version: int
    profile: Profile
    def __init__(self, device: _Optional[str] = ..., version: _Optional[int] = ..., profile: _Optional[_Union[Profile, _Mapping]] = ...) -> None: ...

class TotpEnrolment(_message.Message):
    __slots__ = ("provisioning_uri",)
    PROVISIONING_URI_FIELD_NUMBER: _ClassVar[int]
    provisioning_uri: str
    def __init__(self, provisioning_uri: _Optional[str] = ...) -> None: ...

class PrivacyExportRequest(_message.Message):
    __slots__ = ("device", "totp", "format")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TOTP_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    device: str
    totp: str
    format: str
    def __init__(self, device: _Optional[str] = ..., totp: _Optional[str] = ..., format: _Optional[str] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ErasureReport(_message.Message):
    __slots__ = ("device", "removed")
    class RemovedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    device: str
    removed: _containers.ScalarMap[str, int]
    def __init__(self, device: _Optional[str] = ..., removed: _Optional[_Mapping[str, int]] = ...) -> None: ...
