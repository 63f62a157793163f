from google.protobuf import timestamp_pb2 as _timestamp_pb2
from usage.v1 import customer_pb2 as _customer_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EntitlementReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENTITLEMENT_REASON_UNSPECIFIED: _ClassVar[EntitlementReason]
    ENTITLEMENT_REASON_WITHIN_LIMIT: _ClassVar[EntitlementReason]
    ENTITLEMENT_REASON_FEATURE_ENABLED: _ClassVar[EntitlementReason]
    ENTITLEMENT_REASON_SOFT_LIMIT_EXCEEDED: _ClassVar[EntitlementReason]
    ENTITLEMENT_REASON_LIMIT_EXCEEDED: _ClassVar[EntitlementReason]
    ENTITLEMENT_REASON_FEATURE_NOT_IN_PLAN: _ClassVar[EntitlementReason]
    ENTITLEMENT_REASON_SUBSCRIPTION_INACTIVE: _ClassVar[EntitlementReason]
    ENTITLEMENT_REASON_CUSTOMER_NOT_FOUND: _ClassVar[EntitlementReason]
    ENTITLEMENT_REASON_BALANCE_EXHAUSTED: _ClassVar[EntitlementReason]

class UsageChangeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_CHANGE_KIND_UNSPECIFIED: _ClassVar[UsageChangeKind]
    USAGE_CHANGE_KIND_SNAPSHOT: _ClassVar[UsageChangeKind]
    USAGE_CHANGE_KIND_USAGE: _ClassVar[UsageChangeKind]
    USAGE_CHANGE_KIND_ROLLOVER: _ClassVar[UsageChangeKind]
    USAGE_CHANGE_KIND_CUSTOMER: _ClassVar[UsageChangeKind]
    USAGE_CHANGE_KIND_DRAIN: _ClassVar[UsageChangeKind]
    USAGE_CHANGE_KIND_THRESHOLD: _ClassVar[UsageChangeKind]
    USAGE_CHANGE_KIND_CREDIT: _ClassVar[UsageChangeKind]

class SnapshotReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SNAPSHOT_REASON_UNSPECIFIED: _ClassVar[SnapshotReason]
    SNAPSHOT_REASON_INITIAL: _ClassVar[SnapshotReason]
    SNAPSHOT_REASON_RESUME_TOO_OLD: _ClassVar[SnapshotReason]
ENTITLEMENT_REASON_UNSPECIFIED: EntitlementReason
ENTITLEMENT_REASON_WITHIN_LIMIT: EntitlementReason
ENTITLEMENT_REASON_FEATURE_ENABLED: EntitlementReason
ENTITLEMENT_REASON_SOFT_LIMIT_EXCEEDED: EntitlementReason
ENTITLEMENT_REASON_LIMIT_EXCEEDED: EntitlementReason
ENTITLEMENT_REASON_FEATURE_NOT_IN_PLAN: EntitlementReason
ENTITLEMENT_REASON_SUBSCRIPTION_INACTIVE: EntitlementReason
ENTITLEMENT_REASON_CUSTOMER_NOT_FOUND: EntitlementReason
ENTITLEMENT_REASON_BALANCE_EXHAUSTED: EntitlementReason
USAGE_CHANGE_KIND_UNSPECIFIED: UsageChangeKind
USAGE_CHANGE_KIND_SNAPSHOT: UsageChangeKind
USAGE_CHANGE_KIND_USAGE: UsageChangeKind
USAGE_CHANGE_KIND_ROLLOVER: UsageChangeKind
USAGE_CHANGE_KIND_CUSTOMER: UsageChangeKind
USAGE_CHANGE_KIND_DRAIN: UsageChangeKind
USAGE_CHANGE_KIND_THRESHOLD: UsageChangeKind
USAGE_CHANGE_KIND_CREDIT: UsageChangeKind
SNAPSHOT_REASON_UNSPECIFIED: SnapshotReason
SNAPSHOT_REASON_INITIAL: SnapshotReason
SNAPSHOT_REASON_RESUME_TOO_OLD: SnapshotReason

class RecordUsageRequest(_message.Message):
    __slots__ = ("customer_id", "meter", "quantity", "idempotency_key", "event_time", "properties")
    class PropertiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    meter: str
    quantity: int
    idempotency_key: str
    event_time: _timestamp_pb2.Timestamp
    properties: _containers.ScalarMap[str, str]
    def __init__(self, customer_id: _Optional[str] = ..., meter: _Optional[str] = ..., quantity: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., event_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., properties: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RecordUsageResponse(_message.Message):
    __slots__ = ("event_id", "duplicate")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    duplicate: bool
    def __init__(self, event_id: _Optional[str] = ..., duplicate: bool = ...) -> None: ...

class BatchRecordUsageRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RecordUsageRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[RecordUsageRequest, _Mapping]]] = ...) -> None: ...

class BatchRecordUsageResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[RecordUsageResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[RecordUsageResponse, _Mapping]]] = ...) -> None: ...

class CheckEntitlementRequest(_message.Message):
    __slots__ = ("customer_id", "feature", "quantity", "consume", "idempotency_key", "properties")
    class PropertiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    CONSUME_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    feature: str
    quantity: int
    consume: bool
    idempotency_key: str
    properties: _containers.ScalarMap[str, str]
    def __init__(self, customer_id: _Optional[str] = ..., feature: _Optional[str] = ..., quantity: _Optional[int] = ..., consume: bool = ..., idempotency_key: _Optional[str] = ..., properties: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CheckEntitlementResponse(_message.Message):
    __slots__ = ("allowed", "reason", "used", "included", "limit", "remaining", "period_start_time", "period_end_time", "event_id", "duplicate", "period_source", "decision_id", "as_of_time", "totals_version", "rule", "balance", "covered")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_TIME_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_TIME_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    PERIOD_SOURCE_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    AS_OF_TIME_FIELD_NUMBER: _ClassVar[int]
    TOTALS_VERSION_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    COVERED_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    reason: EntitlementReason
    used: int
    included: int
    limit: int
    remaining: int
    period_start_time: _timestamp_pb2.Timestamp
    period_end_time: _timestamp_pb2.Timestamp
    event_id: str
    duplicate: bool
    period_source: _customer_pb2.PeriodSource
    decision_id: str
    as_of_time: _timestamp_pb2.Timestamp
    totals_version: int
    rule: DecisionRule
    balance: int
    covered: int
    def __init__(self, allowed: bool = ..., reason: _Optional[_Union[EntitlementReason, str]] = ..., used: _Optional[int] = ..., included: _Optional[int] = ..., limit: _Optional[int] = ..., remaining: _Optional[int] = ..., period_start_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., period_end_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., event_id: _Optional[str] = ..., duplicate: bool = ..., period_source: _Optional[_Union[_customer_pb2.PeriodSource, str]] = ..., decision_id: _Optional[str] = ..., as_of_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., totals_version: _Optional[int] = ..., rule: _Optional[_Union[DecisionRule, _Mapping]] = ..., balance: _Optional[int] = ..., covered: _Optional[int] = ...) -> None: ...

class DecisionRule(_message.Message):
    __slots__ = ("plan_id", "feature", "included", "limit", "enforcement", "enabled", "billing", "overage", "ceiling")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    ENFORCEMENT_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    BILLING_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_FIELD_NUMBER: _ClassVar[int]
    CEILING_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    feature: str
    included: int
    limit: int
    enforcement: str
    enabled: bool
    billing: str
    overage: bool
    ceiling: int
    def __init__(self, plan_id: _Optional[str] = ..., feature: _Optional[str] = ..., included: _Optional[int] = ..., limit: _Optional[int] = ..., enforcement: _Optional[str] = ..., enabled: bool = ..., billing: _Optional[str] = ..., overage: bool = ..., ceiling: _Optional[int] = ...) -> None: ...

class GetUsageSummaryRequest(_message.Message):
    __slots__ = ("customer_id", "meter")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    meter: str
    def __init__(self, customer_id: _Optional[str] = ..., meter: _Optional[str] = ...) -> None: ...

class MeterUsage(_message.Message):
    __slots__ = ("meter", "used", "included", "limit", "remaining", "overage", "reported", "pending", "failed", "aggregation", "unit", "unbilled", "billing", "granted", "burned", "balance", "next_expire_time", "covered", "billable_overage", "ceiling")
    METER_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    UNBILLED_FIELD_NUMBER: _ClassVar[int]
    BILLING_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    BURNED_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    NEXT_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    COVERED_FIELD_NUMBER: _ClassVar[int]
    BILLABLE_OVERAGE_FIELD_NUMBER: _ClassVar[int]
    CEILING_FIELD_NUMBER: _ClassVar[int]
    meter: str
    used: int
    included: int
    limit: int
    remaining: int
    overage: int
    reported: int
    pending: int
    failed: int
    aggregation: str
    unit: str
    unbilled: int
    billing: str
    granted: int
    burned: int
    balance: int
    next_expire_time: _timestamp_pb2.Timestamp
    covered: int
    billable_overage: int
    ceiling: int
    def __init__(self, meter: _Optional[str] = ..., used: _Optional[int] = ..., included: _Optional[int] = ..., limit: _Optional[int] = ..., remaining: _Optional[int] = ..., overage: _Optional[int] = ..., reported: _Optional[int] = ..., pending: _Optional[int] = ..., failed: _Optional[int] = ..., aggregation: _Optional[str] = ..., unit: _Optional[str] = ..., unbilled: _Optional[int] = ..., billing: _Optional[str] = ..., granted: _Optional[int] = ..., burned: _Optional[int] = ..., balance: _Optional[int] = ..., next_expire_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., covered: _Optional[int] = ..., billable_overage: _Optional[int] = ..., ceiling: _Optional[int] = ...) -> None: ...

class GetUsageSummaryResponse(_message.Message):
    __slots__ = ("customer_id", "plan_id", "period_start_time", "period_end_time", "meters", "subscription_status", "period_source")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_TIME_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_TIME_FIELD_NUMBER: _ClassVar[int]
    METERS_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_STATUS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_SOURCE_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    plan_id: str
    period_start_time: _timestamp_pb2.Timestamp
    period_end_time: _timestamp_pb2.Timestamp
    meters: _containers.RepeatedCompositeFieldContainer[MeterUsage]
    subscription_status: _customer_pb2.SubscriptionStatus
    period_source: _customer_pb2.PeriodSource
    def __init__(self, customer_id: _Optional[str] = ..., plan_id: _Optional[str] = ..., period_start_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., period_end_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., meters: _Optional[_Iterable[_Union[MeterUsage, _Mapping]]] = ..., subscription_status: _Optional[_Union[_customer_pb2.SubscriptionStatus, str]] = ..., period_source: _Optional[_Union[_customer_pb2.PeriodSource, str]] = ...) -> None: ...

class WatchUsageRequest(_message.Message):
    __slots__ = ("customer_id", "meters", "resume_after_version")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    METERS_FIELD_NUMBER: _ClassVar[int]
    RESUME_AFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    meters: _containers.RepeatedScalarFieldContainer[str]
    resume_after_version: int
    def __init__(self, customer_id: _Optional[str] = ..., meters: _Optional[_Iterable[str]] = ..., resume_after_version: _Optional[int] = ...) -> None: ...

class WatchUsageResponse(_message.Message):
    __slots__ = ("version", "kind", "commit_time", "snapshot_reason", "plan_id", "subscription_status", "period_start_time", "period_end_time", "meters", "threshold")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    COMMIT_TIME_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_REASON_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_STATUS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_TIME_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_TIME_FIELD_NUMBER: _ClassVar[int]
    METERS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    version: int
    kind: UsageChangeKind
    commit_time: _timestamp_pb2.Timestamp
    snapshot_reason: SnapshotReason
    plan_id: str
    subscription_status: _customer_pb2.SubscriptionStatus
    period_start_time: _timestamp_pb2.Timestamp
    period_end_time: _timestamp_pb2.Timestamp
    meters: _containers.RepeatedCompositeFieldContainer[MeterUsage]
    threshold: ThresholdCrossing
    def __init__(self, version: _Optional[int] = ..., kind: _Optional[_Union[UsageChangeKind, str]] = ..., commit_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., snapshot_reason: _Optional[_Union[SnapshotReason, str]] = ..., plan_id: _Optional[str] = ..., subscription_status: _Optional[_Union[_customer_pb2.SubscriptionStatus, str]] = ..., period_start_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., period_end_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., meters: _Optional[_Iterable[_Union[MeterUsage, _Mapping]]] = ..., threshold: _Optional[_Union[ThresholdCrossing, _Mapping]] = ...) -> None: ...

class ThresholdCrossing(_message.Message):
    __slots__ = ("alert_id", "feature", "threshold", "amount", "used")
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    alert_id: str
    feature: str
    threshold: str
    amount: int
    used: int
    def __init__(self, alert_id: _Optional[str] = ..., feature: _Optional[str] = ..., threshold: _Optional[str] = ..., amount: _Optional[int] = ..., used: _Optional[int] = ...) -> None: ...

class GetDecisionRequest(_message.Message):
    __slots__ = ("decision_id",)
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    def __init__(self, decision_id: _Optional[str] = ...) -> None: ...

class GetDecisionResponse(_message.Message):
    __slots__ = ("decision_id", "customer_id", "feature", "quantity", "consume", "response")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    CONSUME_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    customer_id: str
    feature: str
    quantity: int
    consume: bool
    response: CheckEntitlementResponse
    def __init__(self, decision_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., feature: _Optional[str] = ..., quantity: _Optional[int] = ..., consume: bool = ..., response: _Optional[_Union[CheckEntitlementResponse, _Mapping]] = ...) -> None: ...
