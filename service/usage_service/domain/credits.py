"""Prepaid credits: grants, the order usage burns them in, balances, and the plan's recurring
grants. Pure functions, no I/O.

A grant can be burned by an event timed `at`, recorded at `now`, when it is effective at `at`,
not voided, and not expired at `at` nor at `now`: a remainder is forfeited at expiry and never
burned afterwards, even by an event timed before it. Burn order: lower priority number first,
then the earliest expiry (none last), then the oldest (effective time, then creation, then id).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
from collections.abc import Iterable, Sequence

from usage_service.domain.periods import Period
from usage_service.domain.plans import Aggregation, MeteredFeature, RecurringGrant

_FOREVER = dt.datetime.max.replace(tzinfo=dt.UTC)


class GrantSource(enum.StrEnum):
    PLAN = "plan"
    ROLLOVER = "rollover"
    TOP_UP = "top_up"


class GrantState(enum.StrEnum):
    ACTIVE = "active"
    PENDING = "pending"
    SPENT = "spent"
    EXPIRED = "expired"
    VOIDED = "voided"


@dataclasses.dataclass(frozen=True)
class Grant:
    customer_id: str
    grant_id: str  # '' for a plan grant not stored yet
    feature: str
    amount: int
    priority: int
    effective_at: dt.datetime
    expires_at: dt.datetime | None
    source: GrantSource
    idempotency_key: str
    created_at: dt.datetime
    burned: int = 0
    voided_at: dt.datetime | None = None
    spent_at: dt.datetime | None = None  # when burns took its last unit

    def burnable(self, at: dt.datetime, now: dt.datetime) -> bool:
        """Whether an event timed `at`, recorded at `now`, may burn this grant."""
        if self.voided_at is not None or self.effective_at > at:
            return False
        return self.expires_at is None or self.expires_at > max(at, now)

    def left(self, at: dt.datetime, now: dt.datetime) -> int:
        return self.amount - self.burned if self.burnable(at, now) else 0

    def state(self, now: dt.datetime) -> GrantState:
        if self.voided_at is not None:
            return GrantState.VOIDED
        if self.expires_at is not None and self.expires_at <= now:
            return GrantState.EXPIRED
        if self.burned >= self.amount:
            return GrantState.SPENT
        if self.effective_at > now:
            return GrantState.PENDING
        return GrantState.ACTIVE

    def forfeited(self, now: dt.datetime) -> int:
        """Units removed by expiry or void (none before either)."""
        if self.state(now) in (GrantState.VOIDED, GrantState.EXPIRED):
            return self.amount - self.burned
        return 0


@dataclasses.dataclass(frozen=True)
class Credit:
    """A customer's grants of one feature as usage timed now sees them: units granted and
    burned over the grants it may burn, and the earliest expiry of one with units left."""

    granted: int = 0
    burned: int = 0
    next_expiry: dt.datetime | None = None

    @property
    def balance(self) -> int:
        return self.granted - self.burned

    def to_json(self) -> list[object]:
        expiry = self.next_expiry.isoformat() if self.next_expiry else None
        return [self.granted, self.burned, expiry]

    @classmethod
    def from_json(cls, value: object) -> Credit:
        if not isinstance(value, list) or len(value) != 3:
            return cls()
        granted, burned, expiry = value
        when = dt.datetime.fromisoformat(expiry) if isinstance(expiry, str) else None
        return cls(int(granted), int(burned), when)


def credit_of(
    customer_id: str,
    feature: MeteredFeature,
    grants: Sequence[Grant],
    period: Period,
    now: dt.datetime,
) -> Credit:
    """The feature's credit at `now` from its stored grants, counting the plan's grants of
    `period` (the one containing now) whether made yet or not: the grants usage may burn now,
    and those of them spent within `period`."""
    mine = [g for g in grants if g.feature == feature.meter]
    if feature.grant is not None:
        mine += period_grants(customer_id, feature.meter, feature.grant, period, mine, now)
    live = [
        g
        for g in mine
        if g.burnable(now, now)
        and (g.burned < g.amount or (g.spent_at is not None and g.spent_at >= period.start))
    ]
    return Credit(
        granted=sum(g.amount for g in live),
        burned=sum(g.burned for g in live),
        next_expiry=next_expiry(live, now),
    )


def burn_key(g: Grant) -> tuple[int, dt.datetime, dt.datetime, dt.datetime, str]:
    return (g.priority, g.expires_at or _FOREVER, g.effective_at, g.created_at, g.grant_id)


def in_burn_order(grants: Iterable[Grant]) -> list[Grant]:
    return sorted(grants, key=burn_key)


def balance(grants: Iterable[Grant], now: dt.datetime, at: dt.datetime | None = None) -> int:
    """Units that usage timed `at` (default now), recorded at `now`, could burn."""
    return sum(g.left(now if at is None else at, now) for g in grants)


def next_expiry(grants: Iterable[Grant], now: dt.datetime) -> dt.datetime | None:
    """The earliest expiry of a grant with units left now."""
    ends = [g.expires_at for g in grants if g.expires_at is not None and g.left(now, now) > 0]
    return min(ends) if ends else None


def units(aggregation: Aggregation, quantity: int) -> int:
    """The grant units one event uses: its quantity for a sum meter, 1 for a count meter."""
    return quantity if aggregation is Aggregation.SUM else 1


@dataclasses.dataclass(frozen=True)
class Burn:
    """What one event burned: `covered` units of its quantity paid for (for a count meter, the
    whole quantity or nothing), and from which grants (grant_id, units)."""

    covered: int
    taken: tuple[tuple[str, int], ...] = ()


def burn(
    grants: Sequence[Grant],
    aggregation: Aggregation,
    events: Sequence[tuple[int, dt.datetime]],
    now: dt.datetime,
) -> tuple[list[Burn], list[Grant]]:
    """Burns (quantity, event_time) events, in order, from stored grants: each event takes
    what it can from the grants it may burn, in burn order (a count meter's event is covered
    whole or not at all). Returns each event's burn and the grants after."""
    by_id = {g.grant_id: g for g in grants}
    order = [g.grant_id for g in in_burn_order(grants)]
    out = []
    for quantity, at in events:
        need = units(aggregation, quantity)
        if aggregation is not Aggregation.SUM:
            available = sum(by_id[i].left(at, now) for i in order)
            if available < need:
                out.append(Burn(0))
                continue
        taken = []
        for grant_id in order:
            if need == 0:
                break
            g = by_id[grant_id]
            take = min(g.left(at, now), need)
            if take > 0:
                spent = now if g.burned + take == g.amount else None
                by_id[grant_id] = dataclasses.replace(g, burned=g.burned + take, spent_at=spent)
                taken.append((grant_id, take))
                need -= take
        used = sum(t for _, t in taken)
        if aggregation is Aggregation.SUM:
            out.append(Burn(used, tuple(taken)))
        else:
            out.append(Burn(quantity if used else 0, tuple(taken)))
    return out, [by_id[g.grant_id] for g in grants]


def plan_key(feature: str, source: GrantSource, period: Period) -> str:
    """The key of a plan (or rollover) grant of one period: one per customer, feature and
    period, whichever replica creates it."""
    return f"{source.value}:{feature}:{period.start.isoformat()}"


def payload_hash(
    feature: str,
    amount: int,
    priority: int,
    effective_at: dt.datetime | None,
    expires_at: dt.datetime | None,
) -> bytes:
    """A fingerprint of a CreateGrant request: a retry with the same key must match it. A
    defaulted effective time is left out, so a retry that leaves it out still matches."""
    stamp = effective_at.astimezone(dt.UTC).isoformat() if effective_at else ""
    end = expires_at.astimezone(dt.UTC).isoformat() if expires_at else ""
    text = "\x1f".join([feature, str(amount), str(priority), stamp, end])
    return hashlib.sha256(text.encode()).digest()


def period_grants(
    customer_id: str,
    feature: str,
    spec: RecurringGrant,
    period: Period,
    stored: Sequence[Grant],
    now: dt.datetime,
) -> list[Grant]:
    """The plan's grants for `period` that `stored` lacks (with grant_id ''): its recurring
    amount, and once the period has begun (so the previous one's grants are final), the
    unused part of the previous period's plan and rollover grants, up to the rollover cap.
    Stored grants are the customer's grants of `feature` that expire at or after the start of
    the previous period, or never."""
    keys = {g.idempotency_key for g in stored}

    def made(source: GrantSource) -> bool:
        """Whether the period has its grant from `source` (one whose span starts in it, as
        webhooks may have moved it there), or its key is taken."""
        inside = (g for g in stored if g.source is source and period.contains(g.effective_at))
        return any(inside) or plan_key(feature, source, period) in keys

    out = []
    if not made(GrantSource.PLAN):
        out.append(
            _plan_grant(customer_id, feature, spec, period, spec.amount, GrantSource.PLAN, now)
        )
    if spec.rollover_cap and now >= period.start and not made(GrantSource.ROLLOVER):
        unused = sum(
            g.amount - g.burned
            for g in stored
            if g.source is not GrantSource.TOP_UP
            and g.expires_at == period.start  # the previous period's, as its end is this start
            and g.effective_at < period.start
            and (g.voided_at is None or g.voided_at >= g.expires_at)
        )
        amount = min(unused, spec.rollover_cap)
        if amount > 0:
            source = GrantSource.ROLLOVER
            out.append(_plan_grant(customer_id, feature, spec, period, amount, source, now))
    return out


def _plan_grant(
    customer_id: str,
    feature: str,
    spec: RecurringGrant,
    period: Period,
    amount: int,
    source: GrantSource,
    now: dt.datetime,
) -> Grant:
    return Grant(
        customer_id=customer_id,
        grant_id="",
        feature=feature,
        amount=amount,
        priority=spec.priority,
        effective_at=period.start,
        expires_at=period.end,
        source=source,
        idempotency_key=plan_key(feature, source, period),
        created_at=now,
    )


@dataclasses.dataclass(frozen=True)
class Covering:
    """How one recorded event of a prepaid feature is billed: `covered` units of its quantity
    paid by grants, and the state it is stored in ('covered': nothing to report; 'unbilled':
    never reported; else its state as recorded)."""

    covered: int
    state: str

    def counts(self, recorded_state: str, quantity: int) -> tuple[int, int, int, int]:
        """What the covering changes in its period's totals, from the event as it was recorded
        in `recorded_state`: (covered events, covered units, unbilled events, unbilled units)."""
        unbilled_count = unbilled_sum = 0
        if recorded_state == "unbilled":  # out of unbilled what it counted there
            unbilled_count, unbilled_sum = -1, -quantity
        if self.state == "unbilled":
            unbilled_count += 1
            unbilled_sum += quantity - self.covered
        return int(self.state == "covered"), self.covered, unbilled_count, unbilled_sum


def covering(
    feature: MeteredFeature,
    aggregation: Aggregation,
    quantity: int,
    burned: Burn,
    recorded_state: str,
) -> Covering:
    need = units(aggregation, quantity)
    if need == 0:  # nothing to pay for: reported as recorded
        return Covering(0, recorded_state)
    if sum(taken for _, taken in burned.taken) == need:
        return Covering(quantity, "covered")
    if not feature.overage:
        return Covering(burned.covered, "unbilled")
    return Covering(burned.covered, recorded_state)
