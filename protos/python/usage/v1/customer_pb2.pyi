from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubscriptionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUBSCRIPTION_STATUS_UNSPECIFIED: _ClassVar[SubscriptionStatus]
    SUBSCRIPTION_STATUS_ACTIVE: _ClassVar[SubscriptionStatus]
    SUBSCRIPTION_STATUS_TRIALING: _ClassVar[SubscriptionStatus]
    SUBSCRIPTION_STATUS_PAST_DUE: _ClassVar[SubscriptionStatus]
    SUBSCRIPTION_STATUS_CANCELED: _ClassVar[SubscriptionStatus]
    SUBSCRIPTION_STATUS_UNPAID: _ClassVar[SubscriptionStatus]
    SUBSCRIPTION_STATUS_INCOMPLETE: _ClassVar[SubscriptionStatus]
    SUBSCRIPTION_STATUS_PAUSED: _ClassVar[SubscriptionStatus]

class Provider(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROVIDER_UNSPECIFIED: _ClassVar[Provider]
    PROVIDER_STRIPE: _ClassVar[Provider]
    PROVIDER_LEMON_SQUEEZY: _ClassVar[Provider]
    PROVIDER_POLAR: _ClassVar[Provider]
    PROVIDER_DODO_PAYMENTS: _ClassVar[Provider]
    PROVIDER_CREEM: _ClassVar[Provider]

class BillingInterval(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BILLING_INTERVAL_UNSPECIFIED: _ClassVar[BillingInterval]
    BILLING_INTERVAL_DAY: _ClassVar[BillingInterval]
    BILLING_INTERVAL_WEEK: _ClassVar[BillingInterval]
    BILLING_INTERVAL_MONTH: _ClassVar[BillingInterval]
    BILLING_INTERVAL_YEAR: _ClassVar[BillingInterval]

class PeriodSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PERIOD_SOURCE_UNSPECIFIED: _ClassVar[PeriodSource]
    PERIOD_SOURCE_CONFIRMED: _ClassVar[PeriodSource]
    PERIOD_SOURCE_PROJECTED: _ClassVar[PeriodSource]
SUBSCRIPTION_STATUS_UNSPECIFIED: SubscriptionStatus
SUBSCRIPTION_STATUS_ACTIVE: SubscriptionStatus
SUBSCRIPTION_STATUS_TRIALING: SubscriptionStatus
SUBSCRIPTION_STATUS_PAST_DUE: SubscriptionStatus
SUBSCRIPTION_STATUS_CANCELED: SubscriptionStatus
SUBSCRIPTION_STATUS_UNPAID: SubscriptionStatus
SUBSCRIPTION_STATUS_INCOMPLETE: SubscriptionStatus
SUBSCRIPTION_STATUS_PAUSED: SubscriptionStatus
PROVIDER_UNSPECIFIED: Provider
PROVIDER_STRIPE: Provider
PROVIDER_LEMON_SQUEEZY: Provider
PROVIDER_POLAR: Provider
PROVIDER_DODO_PAYMENTS: Provider
PROVIDER_CREEM: Provider
BILLING_INTERVAL_UNSPECIFIED: BillingInterval
BILLING_INTERVAL_DAY: BillingInterval
BILLING_INTERVAL_WEEK: BillingInterval
BILLING_INTERVAL_MONTH: BillingInterval
BILLING_INTERVAL_YEAR: BillingInterval
PERIOD_SOURCE_UNSPECIFIED: PeriodSource
PERIOD_SOURCE_CONFIRMED: PeriodSource
PERIOD_SOURCE_PROJECTED: PeriodSource

class Customer(_message.Message):
    __slots__ = ("customer_id", "plan_id", "subscription_status", "current_period_start_time", "current_period_end_time", "provider", "provider_customer_id", "subscription_items", "billing_interval", "billing_interval_count", "billing_cycle_anchor_time", "current_period_source")
    class SubscriptionItemsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_STATUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_PERIOD_START_TIME_FIELD_NUMBER: _ClassVar[int]
    CURRENT_PERIOD_END_TIME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_ITEMS_FIELD_NUMBER: _ClassVar[int]
    BILLING_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    BILLING_INTERVAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    BILLING_CYCLE_ANCHOR_TIME_FIELD_NUMBER: _ClassVar[int]
    CURRENT_PERIOD_SOURCE_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    plan_id: str
    subscription_status: SubscriptionStatus
    current_period_start_time: _timestamp_pb2.Timestamp
    current_period_end_time: _timestamp_pb2.Timestamp
    provider: Provider
    provider_customer_id: str
    subscription_items: _containers.ScalarMap[str, str]
    billing_interval: BillingInterval
    billing_interval_count: int
    billing_cycle_anchor_time: _timestamp_pb2.Timestamp
    current_period_source: PeriodSource
    def __init__(self, customer_id: _Optional[str] = ..., plan_id: _Optional[str] = ..., subscription_status: _Optional[_Union[SubscriptionStatus, str]] = ..., current_period_start_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., current_period_end_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., provider: _Optional[_Union[Provider, str]] = ..., provider_customer_id: _Optional[str] = ..., subscription_items: _Optional[_Mapping[str, str]] = ..., billing_interval: _Optional[_Union[BillingInterval, str]] = ..., billing_interval_count: _Optional[int] = ..., billing_cycle_anchor_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., current_period_source: _Optional[_Union[PeriodSource, str]] = ...) -> None: ...

class UpsertCustomerRequest(_message.Message):
    __slots__ = ("customer",)
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    customer: Customer
    def __init__(self, customer: _Optional[_Union[Customer, _Mapping]] = ...) -> None: ...

class UpsertCustomerResponse(_message.Message):
    __slots__ = ("customer",)
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    customer: Customer
    def __init__(self, customer: _Optional[_Union[Customer, _Mapping]] = ...) -> None: ...

class GetCustomerRequest(_message.Message):
    __slots__ = ("customer_id",)
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    def __init__(self, customer_id: _Optional[str] = ...) -> None: ...

class GetCustomerResponse(_message.Message):
    __slots__ = ("customer",)
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    customer: Customer
    def __init__(self, customer: _Optional[_Union[Customer, _Mapping]] = ...) -> None: ...
