"""Proto <-> domain conversions."""

from __future__ import annotations

import datetime as dt
import functools

from google.protobuf import timestamp_pb2

from usage.v1 import customer_pb2, usage_pb2
from usage_service import domain
from usage_service.domain import periods, rules

STATUS_TO_PROTO = {
    domain.SubscriptionStatus.ACTIVE: customer_pb2.SUBSCRIPTION_STATUS_ACTIVE,
    domain.SubscriptionStatus.TRIALING: customer_pb2.SUBSCRIPTION_STATUS_TRIALING,
    domain.SubscriptionStatus.PAST_DUE: customer_pb2.SUBSCRIPTION_STATUS_PAST_DUE,
    domain.SubscriptionStatus.CANCELED: customer_pb2.SUBSCRIPTION_STATUS_CANCELED,
    domain.SubscriptionStatus.UNPAID: customer_pb2.SUBSCRIPTION_STATUS_UNPAID,
    domain.SubscriptionStatus.INCOMPLETE: customer_pb2.SUBSCRIPTION_STATUS_INCOMPLETE,
    domain.SubscriptionStatus.PAUSED: customer_pb2.SUBSCRIPTION_STATUS_PAUSED,
}
STATUS_FROM_PROTO = {v: k for k, v in STATUS_TO_PROTO.items()}

PROVIDER_TO_PROTO = {
    domain.Provider.NONE: customer_pb2.PROVIDER_UNSPECIFIED,
    domain.Provider.STRIPE: customer_pb2.PROVIDER_STRIPE,
    domain.Provider.LEMON_SQUEEZY: customer_pb2.PROVIDER_LEMON_SQUEEZY,
    domain.Provider.POLAR: customer_pb2.PROVIDER_POLAR,
    domain.Provider.DODO_PAYMENTS: customer_pb2.PROVIDER_DODO_PAYMENTS,
    domain.Provider.CREEM: customer_pb2.PROVIDER_CREEM,
}
PROVIDER_FROM_PROTO = {v: k for k, v in PROVIDER_TO_PROTO.items()}

REASON_TO_PROTO = {
    domain.Reason.WITHIN_LIMIT: usage_pb2.ENTITLEMENT_REASON_WITHIN_LIMIT,
    domain.Reason.FEATURE_ENABLED: usage_pb2.ENTITLEMENT_REASON_FEATURE_ENABLED,
    domain.Reason.SOFT_LIMIT_EXCEEDED: usage_pb2.ENTITLEMENT_REASON_SOFT_LIMIT_EXCEEDED,
    domain.Reason.LIMIT_EXCEEDED: usage_pb2.ENTITLEMENT_REASON_LIMIT_EXCEEDED,
    domain.Reason.FEATURE_NOT_IN_PLAN: usage_pb2.ENTITLEMENT_REASON_FEATURE_NOT_IN_PLAN,
    domain.Reason.SUBSCRIPTION_INACTIVE: usage_pb2.ENTITLEMENT_REASON_SUBSCRIPTION_INACTIVE,
    domain.Reason.CUSTOMER_NOT_FOUND: usage_pb2.ENTITLEMENT_REASON_CUSTOMER_NOT_FOUND,
    domain.Reason.BALANCE_EXHAUSTED: usage_pb2.ENTITLEMENT_REASON_BALANCE_EXHAUSTED,
}


INTERVAL_TO_PROTO = {
    periods.Interval.DAY: customer_pb2.BILLING_INTERVAL_DAY,
    periods.Interval.WEEK: customer_pb2.BILLING_INTERVAL_WEEK,
    periods.Interval.MONTH: customer_pb2.BILLING_INTERVAL_MONTH,
    periods.Interval.YEAR: customer_pb2.BILLING_INTERVAL_YEAR,
}
INTERVAL_FROM_PROTO = {v: k for k, v in INTERVAL_TO_PROTO.items()}

SOURCE_TO_PROTO = {
    periods.Source.CONFIRMED: customer_pb2.PERIOD_SOURCE_CONFIRMED,
    periods.Source.PROJECTED: customer_pb2.PERIOD_SOURCE_PROJECTED,
}


def _int64(value: int) -> int:
    """A sum of grants, which may pass what int64 holds: shown as the largest int64 then."""
    return min(value, domain.MAX_TOTAL)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
RULE_PROTOS = 1024  # rule messages kept built (one per plan and feature asked about)


def ts(when: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    set_ts(out, when)
    return out


def set_ts(out: timestamp_pb2.Timestamp, when: dt.datetime) -> None:
    """`out.FromDatetime(when)` in integer arithmetic (a check sets three of these; this is
    several times faster). A naive time counts as UTC, as FromDatetime has it."""
    if when.tzinfo is None:
        out.FromDatetime(when)
        return
    delta = when - _EPOCH
    out.seconds = delta.days * 86_400 + delta.seconds
    out.nanos = delta.microseconds * 1000


def customer_to_proto(c: domain.Customer, period: periods.Period) -> customer_pb2.Customer:
    """A customer with the period containing now (`period`) as its current period."""
    return customer_pb2.Customer(
        customer_id=c.customer_id,
        plan_id=c.plan_id,
        subscription_status=STATUS_TO_PROTO[c.subscription_status],
        current_period_start_time=ts(period.start),
        current_period_end_time=ts(period.end),
        provider=PROVIDER_TO_PROTO[c.provider],
        provider_customer_id=c.provider_customer_id,
        subscription_items=dict(c.subscription_items),
        billing_interval=INTERVAL_TO_PROTO[c.cadence.interval],
        billing_interval_count=c.cadence.count,
        billing_cycle_anchor_time=ts(c.cadence.anchor),
        current_period_source=SOURCE_TO_PROTO[period.source],
    )


def decision_to_proto(
    d: domain.Decision,
    period: periods.Period | None,
    event_id: str = "",
    duplicate: bool = False,
    *,
    as_of: dt.datetime,
    rule: rules.Rule,
    version: int = 0,
    decision_id: str = "",
) -> usage_pb2.CheckEntitlementResponse:
    """A check's answer: the decision, taken at `as_of` on the figures at change `version` by
    `rule`. Built field by field (nested messages given to the constructor cost several times
    more): it is on every check's path."""
    out = usage_pb2.CheckEntitlementResponse(
        allowed=d.allowed,
        reason=REASON_TO_PROTO[d.reason],
        used=d.used,
        included=d.included,
        event_id=event_id,
        duplicate=duplicate,
        decision_id=decision_id,
        totals_version=version,
    )
    set_ts(out.as_of_time, as_of)
    out.rule.CopyFrom(_rule_proto(rule))
    if d.limit is not None:
        out.limit = d.limit
    if d.remaining is not None:
        out.remaining = d.remaining
    if d.balance is not None:
        out.balance = _int64(d.balance)
        out.covered = d.covered
    if period is not None:
        set_ts(out.period_start_time, period.start)
        set_ts(out.period_end_time, period.end)
        out.period_source = SOURCE_TO_PROTO[period.source]
    return out


def rule_to_proto(r: rules.Rule) -> usage_pb2.DecisionRule:
    out = usage_pb2.DecisionRule(
        plan_id=r.plan_id,
        feature=r.feature,
        included=r.included,
        enforcement=r.enforcement,
        enabled=r.enabled,
        billing=r.billing,
        overage=r.overage,
    )
    if r.limit is not None:
        out.limit = r.limit
    if r.ceiling is not None:
        out.ceiling = r.ceiling
    return out


# Only ever copied from, never changed: a rule's message is built once.
_rule_proto = functools.lru_cache(maxsize=RULE_PROTOS)(rule_to_proto)


def meter_to_proto(m: domain.MeterSummary) -> usage_pb2.MeterUsage:
    out = usage_pb2.MeterUsage(
        meter=m.meter,
        used=m.used,
        included=m.included,
        overage=m.overage,
        reported=m.reported,
        pending=m.pending,
        failed=m.failed,
        unbilled=m.unbilled,
        aggregation=m.aggregation.value,
        unit=m.unit,
        billing=m.billing,
        granted=_int64(m.granted),
        burned=_int64(m.burned),
        balance=_int64(m.balance),
        covered=m.covered,
        billable_overage=m.billable_overage,
    )
    if m.limit is not None:
        out.limit = m.limit
    if m.remaining is not None:
        out.remaining = m.remaining
    if m.ceiling is not None:
        out.ceiling = m.ceiling
    if m.next_expiry is not None:
        out.next_expire_time.CopyFrom(ts(m.next_expiry))
    return out
