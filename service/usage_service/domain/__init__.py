"""Customers, periods, aggregation and entitlement decisions: pure functions, no I/O."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence

from usage_service.domain import credits, periods
from usage_service.domain.plans import Aggregation, Enforcement, MeteredFeature, Plans

MAX_TOTAL = 2**63 - 1  # the largest int64: no total may pass it


class SubscriptionStatus(enum.StrEnum):
    ACTIVE = "active"
    TRIALING = "trialing"
    PAST_DUE = "past_due"
    CANCELED = "canceled"
    UNPAID = "unpaid"
    INCOMPLETE = "incomplete"
    PAUSED = "paused"


ALLOWED_STATUSES = frozenset({SubscriptionStatus.ACTIVE, SubscriptionStatus.TRIALING})


class Provider(enum.StrEnum):
    NONE = ""  # metered and checked, never reported
    STRIPE = "stripe"
    LEMON_SQUEEZY = "lemon_squeezy"
    POLAR = "polar"
    DODO_PAYMENTS = "dodo_payments"
    CREEM = "creem"


class Reason(enum.StrEnum):
    WITHIN_LIMIT = "within_limit"
    FEATURE_ENABLED = "feature_enabled"
    SOFT_LIMIT_EXCEEDED = "soft_limit_exceeded"
    LIMIT_EXCEEDED = "limit_exceeded"
    FEATURE_NOT_IN_PLAN = "feature_not_in_plan"
    SUBSCRIPTION_INACTIVE = "subscription_inactive"
    CUSTOMER_NOT_FOUND = "customer_not_found"
    BALANCE_EXHAUSTED = "balance_exhausted"


@dataclasses.dataclass(frozen=True)
class Customer:
    """A customer as its webhooks told it. `period_start`/`period_end`: its last confirmed
    period; `cadence`: how periods follow it."""

    customer_id: str
    plan_id: str
    subscription_status: SubscriptionStatus
    period_start: dt.datetime
    period_end: dt.datetime
    cadence: periods.Cadence
    provider: Provider = Provider.NONE
    provider_customer_id: str = ""
    subscription_items: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def last_confirmed(self) -> periods.Stored:
        return periods.Stored(self.period_start, self.period_end, self.cadence)

    def period_after_confirmed(self, when: dt.datetime) -> periods.Period | None:
        """The period containing `when`, or None when `when` is before the last confirmed
        period (then the customer's earlier periods are needed)."""
        if when < self.period_start:
            return None
        if when < self.period_end:
            return periods.Period(self.period_start, self.period_end)
        return periods.period_at([self.last_confirmed], when)


@dataclasses.dataclass(frozen=True)
class UsageEvent:
    """One usage event as accepted from a caller, before it is stored."""

    event_id: str
    customer_id: str
    meter: str
    quantity: int
    idempotency_key: str
    event_time: dt.datetime
    properties: Mapping[str, str]
    payload_hash: bytes


@dataclasses.dataclass(frozen=True)
class Totals:
    """A customer's running totals for one meter in one period: every aggregation at once."""

    event_count: int = 0
    quantity_sum: int = 0
    quantity_max: int = 0
    last_quantity: int = 0
    last_event_time: dt.datetime | None = None
    last_seq: int = 0  # acceptance order of the `last` event: breaks ties of event_time
    reported_count: int = 0
    reported_sum: int = 0
    failed_count: int = 0
    failed_sum: int = 0
    unbilled_count: int = 0  # counted while the customer had no provider: never reported
    unbilled_sum: int = 0
    covered_count: int = 0  # events grants paid for whole: never reported
    covered_sum: int = 0  # units of quantity grants paid for

    def used(self, aggregation: Aggregation) -> int:
        if aggregation is Aggregation.SUM:
            return self.quantity_sum
        if aggregation is Aggregation.COUNT:
            return self.event_count
        if aggregation is Aggregation.MAX:
            return self.quantity_max
        return self.last_quantity

    def used_after(self, aggregation: Aggregation, quantity: int) -> int:
        """What `used` becomes once one more event of `quantity` (timed now) is added."""
        if aggregation is Aggregation.SUM:
            return self.quantity_sum + quantity
        if aggregation is Aggregation.COUNT:
            return self.event_count + 1
        if aggregation is Aggregation.MAX:
            return max(self.quantity_max, quantity)
        return quantity

    def plus(self, quantity: int, event_time: dt.datetime, unbilled: bool) -> Totals:
        """The totals once one more event is counted, accepted after every event they hold."""
        later = self.last_event_time is None or event_time >= self.last_event_time
        return dataclasses.replace(
            self,
            event_count=self.event_count + 1,
            quantity_sum=self.quantity_sum + quantity,
            quantity_max=max(self.quantity_max, quantity),
            last_quantity=quantity if later else self.last_quantity,
            last_event_time=event_time if later else self.last_event_time,
            unbilled_count=self.unbilled_count + unbilled,
            unbilled_sum=self.unbilled_sum + (quantity if unbilled else 0),
        )

    def billed_as(self, counts: tuple[int, int, int, int]) -> Totals:
        """The totals once an event's covering (`credits.Covering.counts`) is applied."""
        covered_count, covered_sum, unbilled_count, unbilled_sum = counts
        return dataclasses.replace(
            self,
            covered_count=self.covered_count + covered_count,
            covered_sum=self.covered_sum + covered_sum,
            unbilled_count=self.unbilled_count + unbilled_count,
            unbilled_sum=self.unbilled_sum + unbilled_sum,
        )

    def progress(self, aggregation: Aggregation) -> tuple[int, int, int, int]:
        """(reported, pending, failed, unbilled): summed quantities for sum meters, events
        otherwise. What grants paid for (covered) is in none of them."""
        if aggregation is Aggregation.SUM:
            recorded, reported, failed = self.quantity_sum, self.reported_sum, self.failed_sum
            unbilled, covered = self.unbilled_sum, self.covered_sum
        else:
            recorded, reported, failed = self.event_count, self.reported_count, self.failed_count
            unbilled, covered = self.unbilled_count, self.covered_count
        pending = max(recorded - covered - reported - failed - unbilled, 0)
        return reported, pending, failed, unbilled

    def covered(self, aggregation: Aggregation) -> int:
        return self.covered_sum if aggregation is Aggregation.SUM else self.covered_count


@dataclasses.dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: Reason
    used: int = 0
    included: int = 0
    limit: int | None = None
    remaining: int | None = None
    balance: int | None = None  # prepaid features: grant units left (after a consume)
    covered: int = 0  # units of this consume grants pay for


@dataclasses.dataclass(frozen=True)
class MeterSummary:
    meter: str
    aggregation: Aggregation
    unit: str
    used: int
    included: int
    limit: int | None
    remaining: int | None
    overage: int
    reported: int
    pending: int
    failed: int
    unbilled: int
    billing: str = "arrears"
    ceiling: int | None = None
    granted: int = 0
    burned: int = 0
    balance: int = 0
    next_expiry: dt.datetime | None = None
    covered: int = 0
    billable_overage: int = 0


Credit = credits.Credit


def payload_hash(
    meter: str, quantity: int, event_time: dt.datetime | None, properties: Mapping[str, str]
) -> bytes:
    """A fingerprint of what the caller sent. A caller-supplied time is part of it; a defaulted
    one is not, so a retry that leaves the time out still matches.

    Stored fingerprints are compared with new ones for ever, so the bytes hashed never change:
    they are `json.dumps([meter, quantity, stamp, sorted(properties.items())])` with compact
    separators, built here without a general encoder pass (the stamp needs no escaping)."""
    stamp = event_time.astimezone(dt.UTC).isoformat() if event_time else ""
    props = json.dumps(sorted(properties.items()), separators=_COMPACT) if properties else "[]"
    text = f'[{_json_text(meter)},{quantity},"{stamp}",{props}]'
    return hashlib.sha256(text.encode()).digest()


_COMPACT = (",", ":")


@functools.lru_cache(maxsize=1024)
def _json_text(value: str) -> str:
    return json.dumps(value)


def gate(customer: Customer | None, plans: Plans, feature: str) -> Decision | None:
    """The denial that needs no usage figures, or None when the feature's limits decide."""
    if customer is None:
        return Decision(False, Reason.CUSTOMER_NOT_FOUND)
    if customer.subscription_status not in ALLOWED_STATUSES:
        return Decision(False, Reason.SUBSCRIPTION_INACTIVE)
    plan = plans.plans.get(customer.plan_id)
    if plan is None or (feature not in plan.metered and feature not in plan.enabled):
        return Decision(False, Reason.FEATURE_NOT_IN_PLAN)
    if feature in plan.enabled:
        return Decision(True, Reason.FEATURE_ENABLED)
    return None


def decide(
    feature: MeteredFeature,
    aggregation: Aggregation,
    totals: Totals,
    quantity: int,
    balance: int | None = None,
) -> Decision:
    """Whether `quantity` more may be used. quantity 0 asks whether any is left. For a prepaid
    feature `balance` is the grant units usage timed now may burn: the limits of the period
    decide first, then a plan without overage denies what the grants cannot cover."""
    decision = _by_limits(feature, aggregation, totals, quantity)
    if not feature.prepaid:
        return decision
    left = balance or 0
    need = credits.units(aggregation, quantity) if quantity else 1
    covered = min(need, left) if quantity else 0
    if aggregation is not Aggregation.SUM and covered < need:
        covered = 0
    if decision.allowed and covered < need and not feature.overage:
        decision = dataclasses.replace(decision, allowed=False, reason=Reason.BALANCE_EXHAUSTED)
    # what the grants pay for, should it be consumed: nothing when it is denied
    return dataclasses.replace(decision, balance=left, covered=covered if decision.allowed else 0)


def _by_limits(
    feature: MeteredFeature, aggregation: Aggregation, totals: Totals, quantity: int
) -> Decision:
    used = totals.used(aggregation)
    limit = feature.limit
    if limit is None:
        return Decision(True, Reason.WITHIN_LIMIT, used, feature.included, None, None)
    after = totals.used_after(aggregation, quantity) if quantity else used
    over = after > limit if quantity else used >= limit
    remaining = max(limit - used, 0)
    if not over:
        return Decision(True, Reason.WITHIN_LIMIT, used, feature.included, limit, remaining)
    if feature.enforcement is Enforcement.SOFT:
        ceiling = feature.ceiling
        if ceiling is None or (after <= ceiling if quantity else used < ceiling):
            return Decision(
                True, Reason.SOFT_LIMIT_EXCEEDED, used, feature.included, limit, remaining
            )
    return Decision(False, Reason.LIMIT_EXCEEDED, used, feature.included, limit, remaining)


def after_consume(
    decision: Decision, aggregation: Aggregation, totals: Totals, quantity: int
) -> Decision:
    """The decision as reported once `quantity` has been consumed."""
    used = totals.used_after(aggregation, quantity)
    remaining = None if decision.limit is None else max(decision.limit - used, 0)
    balance = None if decision.balance is None else decision.balance - decision.covered
    return dataclasses.replace(decision, used=used, remaining=remaining, balance=balance)


def summarise(
    plans: Plans,
    customer: Customer,
    totals: Mapping[str, Totals],
    only_meter: str = "",
    credit: Mapping[str, Credit] | None = None,
) -> list[MeterSummary]:
    """Per meter: the plan's metered features, then any other meter with usage in the period.
    `credit`: the grants of the prepaid features, as usage timed now sees them."""
    plan = plans.plans.get(customer.plan_id)
    features = dict(plan.metered) if plan else {}
    names = list(features) + sorted(m for m in totals if m not in features)
    out = []
    for name in names:
        meter = plans.meters.get(name)
        if meter is None or (only_meter and name != only_meter):
            continue
        feature = features.get(name)
        included = feature.included if feature else 0
        limit = feature.limit if feature else None
        row = totals.get(name, Totals())
        used = row.used(meter.aggregation)
        reported, pending, failed, unbilled = row.progress(meter.aggregation)
        prepaid = feature is not None and feature.prepaid
        overage = prepaid and feature is not None and feature.overage
        grants = (credit or {}).get(name, Credit()) if prepaid else Credit()
        covered = row.covered(meter.aggregation)
        recorded = row.quantity_sum if meter.aggregation is Aggregation.SUM else row.event_count
        out.append(
            MeterSummary(
                meter=name,
                aggregation=meter.aggregation,
                unit=meter.unit,
                used=used,
                included=included,
                limit=limit,
                remaining=None if limit is None else max(limit - used, 0),
                overage=max(used - included, 0),
                reported=reported,
                pending=pending,
                failed=failed,
                unbilled=unbilled,
                billing=feature.billing.value if feature else "arrears",
                ceiling=feature.ceiling if feature else None,
                granted=grants.granted,
                burned=grants.burned,
                balance=grants.balance,
                next_expiry=grants.next_expiry,
                covered=covered,
                billable_overage=max(recorded - covered, 0) if overage else 0,
            )
        )
    return out


def fold(events: Sequence[tuple[UsageEvent, int]]) -> Totals:
    """Totals of (event, acceptance order) pairs, all of one customer, meter and period: the
    last value is that of the latest (event_time, acceptance order), as in every other path."""
    last, last_seq = events[0]
    total = peak = last.quantity
    for e, seq in events[1:]:
        q = e.quantity
        total += q
        if q > peak:
            peak = q
        if (e.event_time, seq) > (last.event_time, last_seq):
            last, last_seq = e, seq
    return Totals(
        event_count=len(events),
        quantity_sum=total,
        quantity_max=peak,
        last_quantity=last.quantity,
        last_event_time=last.event_time,
        last_seq=last_seq,
    )


def first_overflow(events: Sequence[UsageEvent], start: Mapping[tuple[str, str], int]) -> int:
    """The index of the first event that takes its customer's and meter's total (from `start`,
    default 0) past int64, or -1."""
    running = dict(start)
    for i, e in enumerate(events):
        key = (e.customer_id, e.meter)
        running[key] = running.get(key, 0) + e.quantity
        if running[key] > MAX_TOTAL:
            return i
    return -1


def replayed(feature: MeteredFeature | None, aggregation: Aggregation, totals: Totals) -> Decision:
    """The answer to a consume whose key was consumed before: allowed, with today's figures,
    whatever happened to the customer since (a plan without the feature: no limit shown)."""
    used = totals.used(aggregation)
    limit = feature.limit if feature else None
    included = feature.included if feature else 0
    over = limit is not None and used > limit
    reason = Reason.SOFT_LIMIT_EXCEEDED if over else Reason.WITHIN_LIMIT
    remaining = None if limit is None else max(limit - used, 0)
    return Decision(True, reason, used, included, limit, remaining)
