"""Records <-> usage.v1 messages. The only module that touches generated message classes."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping, Sequence
from typing import TypeVar

from google.protobuf import timestamp_pb2
from usage.v1 import credit_pb2, customer_pb2, usage_pb2

from usage_client import _types as types

E = TypeVar("E", bound=enum.Enum)


def _enum(cls: type[E], value: int) -> E:
    try:
        return cls(value)
    except ValueError:  # a value added to the contract after this client was built
        return cls["UNSPECIFIED"]


def _timestamp(value: dt.datetime, field: str) -> timestamp_pb2.Timestamp:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{field}: naive datetime {value.isoformat()}; pass an aware one, "
            "e.g. datetime.now(timezone.utc)"
        )
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _datetime(stamp: timestamp_pb2.Timestamp) -> dt.datetime:
    return stamp.ToDatetime(tzinfo=dt.UTC)


def _optional_datetime(stamp: timestamp_pb2.Timestamp, present: bool) -> dt.datetime | None:
    return _datetime(stamp) if present else None


def record_request(
    customer_id: str,
    meter: str,
    quantity: int,
    idempotency_key: str,
    event_time: dt.datetime | None,
    properties: Mapping[str, str] | None,
    field: str = "event_time",
) -> usage_pb2.RecordUsageRequest:
    request = usage_pb2.RecordUsageRequest(
        customer_id=customer_id,
        meter=meter,
        quantity=quantity,
        idempotency_key=idempotency_key,
        properties=dict(properties or {}),
    )
    if event_time is not None:
        request.event_time.CopyFrom(_timestamp(event_time, field))
    return request


def batch_request(events: Sequence[types.UsageEvent]) -> usage_pb2.BatchRecordUsageRequest:
    return usage_pb2.BatchRecordUsageRequest(
        requests=[
            record_request(
                e.customer_id,
                e.meter,
                e.quantity,
                e.idempotency_key,
                e.event_time,
                e.properties,
                field=f"events[{i}].event_time",
            )
            for i, e in enumerate(events)
        ]
    )


def record_result(response: usage_pb2.RecordUsageResponse) -> types.RecordResult:
    return types.RecordResult(event_id=response.event_id, duplicate=response.duplicate)


def batch_results(response: usage_pb2.BatchRecordUsageResponse) -> list[types.RecordResult]:
    return [record_result(r) for r in response.responses]


def check_request(
    customer_id: str,
    feature: str,
    quantity: int,
    consume: bool,
    idempotency_key: str | None,
    properties: Mapping[str, str] | None,
) -> usage_pb2.CheckEntitlementRequest:
    return usage_pb2.CheckEntitlementRequest(
        customer_id=customer_id,
        feature=feature,
        quantity=quantity,
        consume=consume,
        idempotency_key=idempotency_key or "",
        properties=dict(properties or {}),
    )


def entitlement(response: usage_pb2.CheckEntitlementResponse) -> types.Entitlement:
    return types.Entitlement(
        allowed=response.allowed,
        reason=_enum(types.EntitlementReason, response.reason),
        used=response.used,
        included=response.included,
        limit=response.limit if response.HasField("limit") else None,
        remaining=response.remaining if response.HasField("remaining") else None,
        period_start_time=(
            _datetime(response.period_start_time)
            if response.HasField("period_start_time")
            else None
        ),
        period_end_time=(
            _datetime(response.period_end_time) if response.HasField("period_end_time") else None
        ),
        event_id=response.event_id or None,
        duplicate=response.duplicate,
        period_source=_enum(types.PeriodSource, response.period_source),
        decision_id=response.decision_id or None,
        as_of_time=_datetime(response.as_of_time) if response.HasField("as_of_time") else None,
        totals_version=response.totals_version,
        rule=decision_rule(response.rule) if response.HasField("rule") else None,
        balance=response.balance if response.HasField("balance") else None,
        covered=response.covered,
    )


def decision_rule(message: usage_pb2.DecisionRule) -> types.DecisionRule:
    return types.DecisionRule(
        plan_id=message.plan_id,
        feature=message.feature,
        included=message.included,
        limit=message.limit if message.HasField("limit") else None,
        enforcement=message.enforcement,
        enabled=message.enabled,
        billing=message.billing,
        overage=message.overage,
        ceiling=message.ceiling if message.HasField("ceiling") else None,
    )


def decision_request(decision_id: str) -> usage_pb2.GetDecisionRequest:
    return usage_pb2.GetDecisionRequest(decision_id=decision_id)


def decision(response: usage_pb2.GetDecisionResponse) -> types.Decision:
    return types.Decision(
        decision_id=response.decision_id,
        customer_id=response.customer_id,
        feature=response.feature,
        quantity=response.quantity,
        consume=response.consume,
        response=entitlement(response.response),
    )


def summary_request(customer_id: str, meter: str | None) -> usage_pb2.GetUsageSummaryRequest:
    return usage_pb2.GetUsageSummaryRequest(customer_id=customer_id, meter=meter or "")


def meter_usage(message: usage_pb2.MeterUsage) -> types.MeterUsage:
    return types.MeterUsage(
        meter=message.meter,
        used=message.used,
        included=message.included,
        limit=message.limit if message.HasField("limit") else None,
        remaining=message.remaining if message.HasField("remaining") else None,
        overage=message.overage,
        reported=message.reported,
        pending=message.pending,
        failed=message.failed,
        aggregation=message.aggregation,
        unit=message.unit,
        unbilled=message.unbilled,
        billing=message.billing,
        granted=message.granted,
        burned=message.burned,
        balance=message.balance,
        next_expire_time=_optional_datetime(
            message.next_expire_time, message.HasField("next_expire_time")
        ),
        covered=message.covered,
        billable_overage=message.billable_overage,
        ceiling=message.ceiling if message.HasField("ceiling") else None,
    )


def summary(response: usage_pb2.GetUsageSummaryResponse) -> types.UsageSummary:
    return types.UsageSummary(
        customer_id=response.customer_id,
        plan_id=response.plan_id,
        subscription_status=_enum(types.SubscriptionStatus, response.subscription_status),
        period_start_time=(
            _datetime(response.period_start_time)
            if response.HasField("period_start_time")
            else None
        ),
        period_end_time=(
            _datetime(response.period_end_time) if response.HasField("period_end_time") else None
        ),
        meters=tuple(meter_usage(m) for m in response.meters),
        period_source=_enum(types.PeriodSource, response.period_source),
    )


def watch_request(
    customer_id: str, meters: Sequence[str], resume_after_version: int | None
) -> usage_pb2.WatchUsageRequest:
    request = usage_pb2.WatchUsageRequest(customer_id=customer_id, meters=list(meters))
    if resume_after_version is not None:
        request.resume_after_version = resume_after_version
    return request


def usage_change(message: usage_pb2.WatchUsageResponse) -> types.UsageChange:
    threshold = None
    if message.HasField("threshold"):
        crossing = message.threshold
        threshold = types.ThresholdCrossing(
            alert_id=crossing.alert_id,
            feature=crossing.feature,
            threshold=crossing.threshold,
            amount=crossing.amount,
            used=crossing.used,
        )
    return types.UsageChange(
        version=message.version,
        kind=_enum(types.UsageChangeKind, message.kind),
        commit_time=_optional_datetime(message.commit_time, message.HasField("commit_time")),
        snapshot_reason=_enum(types.SnapshotReason, message.snapshot_reason),
        plan_id=message.plan_id,
        subscription_status=_enum(types.SubscriptionStatus, message.subscription_status),
        period_start_time=_optional_datetime(
            message.period_start_time, message.HasField("period_start_time")
        ),
        period_end_time=_optional_datetime(
            message.period_end_time, message.HasField("period_end_time")
        ),
        meters=tuple(meter_usage(m) for m in message.meters),
        threshold=threshold,
    )


def customer_message(customer: types.Customer) -> customer_pb2.Customer:
    message = customer_pb2.Customer(
        customer_id=customer.customer_id,
        plan_id=customer.plan_id,
        subscription_status=f"SUBSCRIPTION_STATUS_{customer.subscription_status.name}",
        current_period_start_time=_timestamp(
            customer.current_period_start_time, "customer.current_period_start_time"
        ),
        current_period_end_time=_timestamp(
            customer.current_period_end_time, "customer.current_period_end_time"
        ),
        provider=f"PROVIDER_{customer.provider.name}",
        provider_customer_id=customer.provider_customer_id,
        subscription_items=dict(customer.subscription_items),
        billing_interval=f"BILLING_INTERVAL_{customer.billing_interval.name}",
        billing_interval_count=customer.billing_interval_count,
    )
    if customer.billing_cycle_anchor_time is not None:
        message.billing_cycle_anchor_time.CopyFrom(
            _timestamp(customer.billing_cycle_anchor_time, "customer.billing_cycle_anchor_time")
        )
    return message


def customer(message: customer_pb2.Customer) -> types.Customer:
    return types.Customer(
        customer_id=message.customer_id,
        plan_id=message.plan_id,
        subscription_status=_enum(types.SubscriptionStatus, message.subscription_status),
        current_period_start_time=_datetime(message.current_period_start_time),
        current_period_end_time=_datetime(message.current_period_end_time),
        provider=_enum(types.Provider, message.provider),
        provider_customer_id=message.provider_customer_id,
        subscription_items=dict(message.subscription_items),
        billing_interval=_enum(types.BillingInterval, message.billing_interval),
        billing_interval_count=message.billing_interval_count,
        billing_cycle_anchor_time=(
            _datetime(message.billing_cycle_anchor_time)
            if message.HasField("billing_cycle_anchor_time")
            else None
        ),
        current_period_source=_enum(types.PeriodSource, message.current_period_source),
    )


def upsert_request(value: types.Customer) -> customer_pb2.UpsertCustomerRequest:
    return customer_pb2.UpsertCustomerRequest(customer=customer_message(value))


def get_customer_request(customer_id: str) -> customer_pb2.GetCustomerRequest:
    return customer_pb2.GetCustomerRequest(customer_id=customer_id)


def create_grant_request(
    customer_id: str,
    feature: str,
    amount: int,
    idempotency_key: str,
    priority: int,
    effective_time: dt.datetime | None,
    expire_time: dt.datetime | None,
) -> credit_pb2.CreateGrantRequest:
    request = credit_pb2.CreateGrantRequest(
        customer_id=customer_id,
        feature=feature,
        amount=amount,
        priority=priority,
        idempotency_key=idempotency_key,
    )
    if effective_time is not None:
        request.effective_time.CopyFrom(_timestamp(effective_time, "effective_time"))
    if expire_time is not None:
        request.expire_time.CopyFrom(_timestamp(expire_time, "expire_time"))
    return request


def grant(message: credit_pb2.Grant) -> types.Grant:
    return types.Grant(
        grant_id=message.grant_id,
        customer_id=message.customer_id,
        feature=message.feature,
        amount=message.amount,
        priority=message.priority,
        effective_time=_datetime(message.effective_time),
        expire_time=_optional_datetime(message.expire_time, message.HasField("expire_time")),
        source=_enum(types.GrantSource, message.source),
        burned=message.burned,
        remaining=message.remaining,
        forfeited=message.forfeited,
        void_time=_optional_datetime(message.void_time, message.HasField("void_time")),
        state=_enum(types.GrantState, message.state),
        idempotency_key=message.idempotency_key,
        create_time=_datetime(message.create_time),
    )


def create_grant_result(response: credit_pb2.CreateGrantResponse) -> types.CreateGrantResult:
    return types.CreateGrantResult(grant=grant(response.grant), duplicate=response.duplicate)


def void_grant_request(customer_id: str, grant_id: str) -> credit_pb2.VoidGrantRequest:
    return credit_pb2.VoidGrantRequest(customer_id=customer_id, grant_id=grant_id)


def void_grant_result(response: credit_pb2.VoidGrantResponse) -> types.VoidGrantResult:
    return types.VoidGrantResult(grant=grant(response.grant), voided=response.voided)


def list_grants_request(
    customer_id: str, feature: str | None, include_inactive: bool
) -> credit_pb2.ListGrantsRequest:
    return credit_pb2.ListGrantsRequest(
        customer_id=customer_id, feature=feature or "", include_inactive=include_inactive
    )


def grants(response: credit_pb2.ListGrantsResponse) -> list[types.Grant]:
    return [grant(g) for g in response.grants]
