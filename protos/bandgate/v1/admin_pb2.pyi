from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("kind", "name", "csr_pem", "certificate_pem", "issue_token", "days")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    ISSUE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DAYS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    csr_pem: bytes
    certificate_pem: bytes
    issue_token: bool
    days: int
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., csr_pem: _Optional[bytes] = ..., certificate_pem: _Optional[bytes] = ..., issue_token: _Optional[bool] = ..., days: _Optional[int] = ...) -> None: ...

class Credential(_message.Message):
    __slots__ = ("principal", "certificate_pem", "ca_pem", "token", "credential_id", "serial", "not_after_us")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_US_FIELD_NUMBER: _ClassVar[int]
    principal: Principal
    certificate_pem: bytes
    ca_pem: bytes
    token: str
    credential_id: str
    serial: str
    not_after_us: int
    def __init__(self, principal: _Optional[_Union[Principal, _Mapping]] = ..., certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ..., token: _Optional[str] = ..., credential_id: _Optional[str] = ..., serial: _Optional[str] = ..., not_after_us: _Optional[int] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("kind", "name", "credential_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    credential_id: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., credential_id: _Optional[str] = ...) -> None: ...

class TransferRequest(_message.Message):
    __slots__ = ("device",)
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    device: str
    def __init__(self, device: _Optional[str] = ...) -> None: ...

class TransferResponse(_message.Message):
    __slots__ = ("device", "ownership", "previous")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    OWNERSHIP_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    device: str
    ownership: str
    previous: str
    def __init__(self, device: _Optional[str] = ..., ownership: _Optional[str] = ..., previous: _Optional[str] = ...) -> None: ...

class BindRequest(_message.Message):
    __slots__ = ("relay", "device")
    RELAY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    relay: str
    device: str
    def __init__(self, relay: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class GrantRequest(_message.Message):
    __slots__ = ("consumer", "family", "operation", "devices")
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    consumer: str
    family: str
    operation: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, consumer: _Optional[str] = ..., family: _Optional[str] = ..., operation: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("kind",)
    KIND_FIELD_NUMBER: _ClassVar[int]
    kind: str
    def __init__(self, kind: _Optional[str] = ...) -> None: ...

class CredentialInfo(_message.Message):
    __slots__ = ("id", "serial", "not_after_us", "state")
    ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_US_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    id: str
    serial: str
    not_after_us: int
    state: str
    def __init__(self, id: _Optional[str] = ..., serial: _Optional[str] = ..., not_after_us: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class GrantInfo(_message.Message):
    __slots__ = ("family", "operation", "devices")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    family: str
    operation: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, family: _Optional[str] = ..., operation: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ...) -> None: ...

class Principal(_message.Message):
    __slots__ = ("kind", "name", "state", "created_us", "last_seen_us", "credentials", "bound", "grants")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_US_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_US_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    BOUND_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    state: str
    created_us: int
    last_seen_us: int
    credentials: _containers.RepeatedCompositeFieldContainer[CredentialInfo]
    bound: _containers.RepeatedScalarFieldContainer[str]
    grants: _containers.RepeatedCompositeFieldContainer[GrantInfo]
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[str] = ..., created_us: _Optional[int] = ..., last_seen_us: _Optional[int] = ..., credentials: _Optional[_Iterable[_Union[CredentialInfo, _Mapping]]] = ..., bound: _Optional[_Iterable[str]] = ..., grants: _Optional[_Iterable[_Union[GrantInfo, _Mapping]]] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("principals",)
    PRINCIPALS_FIELD_NUMBER: _ClassVar[int]
    principals: _containers.RepeatedCompositeFieldContainer[Principal]
    def __init__(self, principals: _Optional[_Iterable[_Union[Principal, _Mapping]]] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("csr_pem", "days")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    DAYS_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    days: int
    def __init__(self, csr_pem: _Optional[bytes] = ..., days: _Optional[int] = ...) -> None: ...

class WhoAmIRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
