from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GrantSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRANT_SOURCE_UNSPECIFIED: _ClassVar[GrantSource]
    GRANT_SOURCE_PLAN: _ClassVar[GrantSource]
    GRANT_SOURCE_ROLLOVER: _ClassVar[GrantSource]
    GRANT_SOURCE_TOP_UP: _ClassVar[GrantSource]

class GrantState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRANT_STATE_UNSPECIFIED: _ClassVar[GrantState]
    GRANT_STATE_ACTIVE: _ClassVar[GrantState]
    GRANT_STATE_PENDING: _ClassVar[GrantState]
    GRANT_STATE_SPENT: _ClassVar[GrantState]
    GRANT_STATE_EXPIRED: _ClassVar[GrantState]
    GRANT_STATE_VOIDED: _ClassVar[GrantState]
GRANT_SOURCE_UNSPECIFIED: GrantSource
GRANT_SOURCE_PLAN: GrantSource
GRANT_SOURCE_ROLLOVER: GrantSource
GRANT_SOURCE_TOP_UP: GrantSource
GRANT_STATE_UNSPECIFIED: GrantState
GRANT_STATE_ACTIVE: GrantState
GRANT_STATE_PENDING: GrantState
GRANT_STATE_SPENT: GrantState
GRANT_STATE_EXPIRED: GrantState
GRANT_STATE_VOIDED: GrantState

class Grant(_message.Message):
    __slots__ = ("grant_id", "customer_id", "feature", "amount", "priority", "effective_time", "expire_time", "source", "burned", "remaining", "forfeited", "void_time", "state", "idempotency_key", "create_time")
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BURNED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    FORFEITED_FIELD_NUMBER: _ClassVar[int]
    VOID_TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    grant_id: str
    customer_id: str
    feature: str
    amount: int
    priority: int
    effective_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    source: GrantSource
    burned: int
    remaining: int
    forfeited: int
    void_time: _timestamp_pb2.Timestamp
    state: GrantState
    idempotency_key: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, grant_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., feature: _Optional[str] = ..., amount: _Optional[int] = ..., priority: _Optional[int] = ..., effective_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[_Union[GrantSource, str]] = ..., burned: _Optional[int] = ..., remaining: _Optional[int] = ..., forfeited: _Optional[int] = ..., void_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[GrantState, str]] = ..., idempotency_key: _Optional[str] = ..., create_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateGrantRequest(_message.Message):
    __slots__ = ("customer_id", "feature", "amount", "priority", "effective_time", "expire_time", "idempotency_key")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    feature: str
    amount: int
    priority: int
    effective_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    idempotency_key: str
    def __init__(self, customer_id: _Optional[str] = ..., feature: _Optional[str] = ..., amount: _Optional[int] = ..., priority: _Optional[int] = ..., effective_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class CreateGrantResponse(_message.Message):
    __slots__ = ("grant", "duplicate")
    GRANT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    grant: Grant
    duplicate: bool
    def __init__(self, grant: _Optional[_Union[Grant, _Mapping]] = ..., duplicate: bool = ...) -> None: ...

class VoidGrantRequest(_message.Message):
    __slots__ = ("customer_id", "grant_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    grant_id: str
    def __init__(self, customer_id: _Optional[str] = ..., grant_id: _Optional[str] = ...) -> None: ...

class VoidGrantResponse(_message.Message):
    __slots__ = ("grant", "voided")
    GRANT_FIELD_NUMBER: _ClassVar[int]
    VOIDED_FIELD_NUMBER: _ClassVar[int]
    grant: Grant
    voided: int
    def __init__(self, grant: _Optional[_Union[Grant, _Mapping]] = ..., voided: _Optional[int] = ...) -> None: ...

class ListGrantsRequest(_message.Message):
    __slots__ = ("customer_id", "feature", "include_inactive")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_INACTIVE_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    feature: str
    include_inactive: bool
    def __init__(self, customer_id: _Optional[str] = ..., feature: _Optional[str] = ..., include_inactive: bool = ...) -> None: ...

class ListGrantsResponse(_message.Message):
    __slots__ = ("grants",)
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    grants: _containers.RepeatedCompositeFieldContainer[Grant]
    def __init__(self, grants: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ...) -> None: ...
