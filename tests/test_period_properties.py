"""A stateful property test of the billing-period model against the live service.

Hypothesis drives three customers through RecordUsage, BatchRecordUsage, CheckEntitlement (with
and without consume), retries of earlier idempotency keys, UpsertCustomer webhooks that move
periods forward, backward and over earlier ones, change the cadence (day, week, month, year;
given, inferred or kept), the plan (basic, metered) and the status (ACTIVE, PAST_DUE, CANCELED),
and bursts of such calls made concurrently. Event times spread over the last 90 days, land
exactly on period boundaries and one microsecond before them, and repeat earlier events' times.

A model written here, independently of the service's code, keeps every acknowledged event and
every customer's confirmed periods with the cadence that follows each. After every step:
- the stored events are exactly the acknowledged ones, each once;
- `history.verify` finds no difference between totals and events;
- no event is counted in two totals rows, and for a customer with a plan each event is counted
  in exactly one: the row of the period that contains its time, as the model places it;
- GetUsageSummary and GetCustomer name the period that contains now, as the model places it,
  and the summary's figures are the sum, count, max and last of the model's events in the
  period it names.
Each call's answer is checked too: duplicates and key reuse, entitlement decisions and the `used`
they report (an allowed consume of the basic plan's hard-limited tokens never reports more than
the limit, and concurrent consumes never take the period's tokens past it), and the current
period and cadence an upsert answers with.

Hypothesis and function-scoped async fixtures do not mix: one event loop, one database (the
`dsn` fixture), one server and one pool serve the whole test, and each example starts from
emptied tables.
"""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeAlias, TypeVar

import asyncpg
import grpc
from google.protobuf import timestamp_pb2
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from usage.v1 import customer_pb2, customer_pb2_grpc, usage_pb2, usage_pb2_grpc
from usage_service.api.server import Running, start_server
from usage_service.domain import plans as plans_mod
from usage_service.storage import connections, history, store

T = TypeVar("T")

SETTINGS = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,  # CI runs the same cases every time
    suppress_health_check=[HealthCheck.too_slow],
)

R = usage_pb2
C = customer_pb2
TICK = dt.timedelta(microseconds=1)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
HISTORY_DAYS = 90  # event times go back this far
CUSTOMERS = ("cus_a", "cus_b", "cus_c")
METERS = ("tokens", "calls", "storage", "seats")
AGGREGATION = {"tokens": "sum", "calls": "count", "storage": "max", "seats": "last"}
TOKEN_LIMIT = 1000  # plan basic, tokens: hard


@dataclasses.dataclass(frozen=True)
class Feature:
    limit: int | None
    hard: bool


# tests/plans.toml as the model sees it: plan -> metered features; "sso" is basic's boolean one.
PLANS: dict[str, dict[str, Feature]] = {
    "basic": {
        "tokens": Feature(TOKEN_LIMIT, hard=True),
        "calls": Feature(20, hard=False),
        "seats": Feature(5, hard=True),
        "storage": Feature(None, hard=True),
    },
    "metered": {"tokens": Feature(None, hard=True)},
}
ENABLED = {"basic": {"sso"}, "metered": set()}
Status: TypeAlias = C.SubscriptionStatus
ACTIVE: Status = C.SUBSCRIPTION_STATUS_ACTIVE
STATUSES = (ACTIVE, C.SUBSCRIPTION_STATUS_PAST_DUE, C.SUBSCRIPTION_STATUS_CANCELED)
INTERVALS = {
    "day": C.BILLING_INTERVAL_DAY,
    "week": C.BILLING_INTERVAL_WEEK,
    "month": C.BILLING_INTERVAL_MONTH,
    "year": C.BILLING_INTERVAL_YEAR,
}
INTERVAL_NAMES = {v: k for k, v in INTERVALS.items()}


# --- the model: cadences, confirmed periods, events ------------------------------------------


def _month_days(year: int, month: int) -> int:
    return calendar.monthrange(year, month)[1]


def _month_end(when: dt.datetime) -> bool:
    return when.day == _month_days(when.year, when.month)


def _shift_months(when: dt.datetime, months: int) -> dt.datetime:
    year, month0 = divmod(when.year * 12 + when.month - 1 + months, 12)
    return when.replace(
        year=year, month=month0 + 1, day=min(when.day, _month_days(year, month0 + 1))
    )


@dataclasses.dataclass(frozen=True)
class Grid:
    """A cadence: boundaries at the anchor moved by whole periods, the anchor's day of month
    kept (clamped in shorter months)."""

    interval: str
    count: int
    anchor: dt.datetime

    def boundary(self, k: int) -> dt.datetime:
        if self.interval == "day":
            return self.anchor + dt.timedelta(days=k * self.count)
        if self.interval == "week":
            return self.anchor + dt.timedelta(weeks=k * self.count)
        return _shift_months(self.anchor, k * self.count * (12 if self.interval == "year" else 1))

    def around(self, when: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
        """The grid period [start, end) that contains `when`."""
        if self.interval in ("day", "week"):
            k = (when - self.anchor) // (self.boundary(1) - self.anchor)
        else:
            months = (when.year - self.anchor.year) * 12 + when.month - self.anchor.month
            k = months // (self.count * (12 if self.interval == "year" else 1))
        while self.boundary(k) > when:
            k -= 1
        while self.boundary(k + 1) <= when:
            k += 1
        return self.boundary(k), self.boundary(k + 1)

    def same_grid(self, other: Grid, near: dt.datetime) -> bool:
        """Whether both cadences cut time the same way around `near` (a year either side)."""
        if (self.interval, self.count) != (other.interval, other.count):
            return False
        probes = [
            near + dt.timedelta(days=d, hours=h) for d in range(-370, 371, 11) for h in (0, 7)
        ]
        return all(self.around(t) == other.around(t) for t in probes)


@dataclasses.dataclass(frozen=True)
class Confirmed:
    start: dt.datetime
    end: dt.datetime
    grid: Grid  # the cadence that follows it


@dataclasses.dataclass(frozen=True)
class Period:
    start: dt.datetime
    end: dt.datetime
    confirmed: bool

    @property
    def bounds(self) -> tuple[dt.datetime, dt.datetime]:
        return self.start, self.end

    @property
    def source(self) -> int:
        return C.PERIOD_SOURCE_CONFIRMED if self.confirmed else C.PERIOD_SOURCE_PROJECTED


def period_at(confirmed: Sequence[Confirmed], when: dt.datetime) -> Period:
    """The period containing `when`, by the rules: inside a confirmed period, that period;
    after one, its cadence's periods (the first starting at its end, the last cut at the next
    confirmed start); before the first, the first one's cadence, cut at its start."""
    earlier = [p for p in confirmed if p.start <= when]
    if not earlier:
        first = confirmed[0]
        start, end = first.grid.around(when)
        return Period(start, min(end, first.start), confirmed=False)
    p = earlier[-1]
    if when < p.end:
        return Period(p.start, p.end, confirmed=True)
    start, end = p.grid.around(when)
    later = [q.start for q in confirmed if q.start > when]
    return Period(max(start, p.end), min([end, *later]), confirmed=False)


def rewrite(confirmed: Sequence[Confirmed], new: Confirmed) -> list[Confirmed]:
    """A webhook's period replaces every confirmed period from its start on, cutting the one
    that holds its start."""
    out = [p for p in confirmed if p.start < new.start]
    if out and out[-1].end > new.start:
        out[-1] = dataclasses.replace(out[-1], end=new.start)
    return [*out, new]


@dataclasses.dataclass
class Account:
    plan: str | None = None  # None: unknown, or known only by its usage (a placeholder)
    status: Status = ACTIVE
    confirmed: list[Confirmed] = dataclasses.field(default_factory=list)

    def period(self, when: dt.datetime) -> Period:
        return period_at(self.confirmed, when)


@dataclasses.dataclass(frozen=True)
class Event:
    event_id: str
    customer_id: str
    key: str
    meter: str
    quantity: int
    when: dt.datetime
    order: tuple[int, int]  # (call, place in the call): the order the service accepted it


def used(events: Iterable[Event], meter: str) -> int:
    """The meter's aggregation over `events` (all of one customer and period)."""
    mine = [e for e in events if e.meter == meter]
    if not mine:
        return 0
    how = AGGREGATION[meter]
    if how == "sum":
        return sum(e.quantity for e in mine)
    if how == "count":
        return len(mine)
    if how == "max":
        return max(e.quantity for e in mine)
    return max(mine, key=lambda e: (e.when, e.order)).quantity


def unbilled(events: Iterable[Event], meter: str) -> int:
    """No provider: everything recorded is unbilled, summed for sum meters, else counted."""
    mine = [e for e in events if e.meter == meter]
    return sum(e.quantity for e in mine) if AGGREGATION[meter] == "sum" else len(mine)


# --- what hypothesis draws ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class When:
    """An event time: `ago` hours back (plus a nudge), a period boundary (exactly, or one
    microsecond before), an earlier event's time (ties for `last`), up to 4 minutes ahead, or
    left out (the service's now)."""

    kind: str  # ago | boundary | again | soon | default
    amount: int
    nudge: int


whens = st.one_of(
    st.builds(
        When,
        st.just("ago"),
        st.builds(
            lambda d, h: d * 24 + h, st.integers(0, HISTORY_DAYS), st.sampled_from([0, 1, 23])
        ),
        st.integers(0, 3),
    ),
    st.builds(When, st.just("boundary"), st.integers(0, 10_000), st.integers(0, 1)),
    st.builds(When, st.just("again"), st.integers(0, 10_000), st.just(0)),
    st.builds(When, st.just("soon"), st.integers(0, 4), st.just(0)),
    st.builds(When, st.just("default"), st.just(0), st.just(0)),
)
NUDGES = (dt.timedelta(0), -TICK, dt.timedelta(minutes=30), dt.timedelta(minutes=59, seconds=59))


@dataclasses.dataclass(frozen=True)
class Upsert:
    plan: str
    status: Status
    interval: str
    count: int
    anchor_hours: int  # the cadence's anchor, hours from the example's start
    month_end: bool  # move the anchor to its month's last day (clamped in shorter months)
    kind: str  # grid | free | resend | follow | again: see PeriodMachine._upsert_request
    at_hours: int
    length_hours: int
    pick: int
    send_interval: bool
    send_anchor: bool


@st.composite
def upserts(draw: st.DrawFn) -> Upsert:
    interval = draw(st.sampled_from(["month", "month", "week", "day", "year"]))
    counts = {"month": [1, 1, 3], "week": [1, 1, 2], "day": [1, 1, 2], "year": [1]}[interval]
    return Upsert(
        plan=draw(st.sampled_from(["basic", "metered"])),
        status=draw(st.sampled_from([ACTIVE, ACTIVE, ACTIVE, *STATUSES[1:]])),
        interval=interval,
        count=draw(st.sampled_from(counts)),
        anchor_hours=draw(st.integers(-24 * 150, 24 * 30)),
        month_end=draw(st.booleans()),
        kind=draw(st.sampled_from(["grid", "grid", "free", "resend", "follow", "again"])),
        at_hours=draw(st.integers(-24 * (HISTORY_DAYS + 10), 24 * 20)),
        length_hours=draw(st.integers(1, 24 * 45)),
        pick=draw(st.integers(0, 10_000)),
        send_interval=draw(st.booleans()),
        send_anchor=draw(st.booleans()),
    )


customers = st.sampled_from(CUSTOMERS)
meters = st.sampled_from(METERS)
burst_ops = st.one_of(
    # seats ("last") stays out of bursts: ties between concurrent calls have no known order
    st.tuples(
        st.just("record"),
        customers,
        st.sampled_from(["tokens", "calls", "storage"]),
        st.integers(0, 300),
        whens,
    ),
    st.tuples(st.just("twice"), customers, st.just("tokens"), st.integers(0, 300), whens),
    st.tuples(st.just("consume"), customers, st.integers(1, 600)),
    # several consumes of one customer at once, to race for the last units
    st.tuples(
        st.just("consumes"), customers, st.lists(st.integers(1, 600), min_size=2, max_size=5)
    ),
    st.tuples(st.just("retry"), st.integers(0, 10_000)),
    st.tuples(st.just("conflict"), st.integers(0, 10_000)),
    # a big batch: two of them at once make the group commit run two flushes side by side
    st.tuples(st.just("bulk"), customers, st.integers(50, 300), st.integers(1, 200)),
    st.tuples(st.just("upsert"), customers, upserts()),
)


# --- the live service --------------------------------------------------------------------------

TABLES = (
    "reports, usage_events, usage_keys, usage_totals, usage_lifetime, billing_periods, customers"
)
EVENTS = """
SELECT event_id::text AS event_id, customer_id, idempotency_key, meter, quantity, event_time
FROM usage_events"""
# Every event with the totals rows of its customer and meter whose period contains its time.
EVENT_ROWS = """
SELECT e.event_id::text AS event_id, e.customer_id, e.meter, e.event_time,
    coalesce(array_agg(t.period_start ORDER BY t.period_start)
        FILTER (WHERE t.period_start IS NOT NULL), '{}') AS starts,
    coalesce(array_agg(t.period_end ORDER BY t.period_start)
        FILTER (WHERE t.period_start IS NOT NULL), '{}') AS ends
FROM usage_events e
LEFT JOIN usage_totals t ON t.customer_id = e.customer_id AND t.meter = e.meter
    AND t.period_start <= e.event_time AND e.event_time < t.period_end
GROUP BY e.event_id, e.customer_id, e.meter, e.event_time"""
OVERLAPPING_ROWS = """
SELECT a.customer_id, a.meter, a.period_start, a.period_end, b.period_start AS other_start,
    b.period_end AS other_end
FROM usage_totals a JOIN usage_totals b ON a.customer_id = b.customer_id AND a.meter = b.meter
    AND a.period_start < b.period_start AND b.period_start < a.period_end"""
EVENT_TIMES = """
SELECT event_id::text AS id, event_time FROM usage_events WHERE event_id = ANY($1::uuid[])"""


@dataclasses.dataclass
class Live:
    loop: asyncio.AbstractEventLoop
    store: store.Store
    running: Running
    channel: grpc.aio.Channel
    usage: usage_pb2_grpc.UsageServiceStub
    customers: customer_pb2_grpc.CustomerServiceStub
    db: asyncpg.Pool

    @classmethod
    async def start(cls, dsn: str, plans: plans_mod.Plans) -> Live:
        st_ = store.Store(await connections.create_pool(dsn, size=8))
        running = await start_server(st_, plans, "127.0.0.1:0")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        db = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        assert db is not None
        return cls(
            asyncio.get_running_loop(),
            st_,
            running,
            channel,
            usage_pb2_grpc.UsageServiceStub(channel),
            customer_pb2_grpc.CustomerServiceStub(channel),
            db,
        )

    async def stop(self) -> None:
        await self.channel.close(None)
        await self.running.stop(1)
        await self.store.close()
        await self.db.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def call(self, method: Callable[[Any], Awaitable[T]], request: Any) -> T:
        """One RPC, made inside the loop (grpc.aio creates the call with the running loop)."""

        async def go() -> T:
            return await method(request)

        return self.run(go())

    def gather(self, calls: Sequence[tuple[Callable[[Any], Awaitable[Any]], Any]]) -> list[Any]:
        """Several RPCs at once; each answer, or the error it failed with."""

        async def go() -> list[Any]:
            return list(await asyncio.gather(*(m(req) for m, req in calls), return_exceptions=True))

        return self.run(go())


def _ts(when: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(when)
    return out


def _time(ts: timestamp_pb2.Timestamp) -> dt.datetime:
    when: dt.datetime = ts.ToDatetime(tzinfo=dt.UTC)
    return when


def _one_line(message: Any) -> str:
    return " ".join(str(message).split())


@dataclasses.dataclass(frozen=True)
class Sent:
    """An upsert as sent, with the confirmed period it should add."""

    request: C.UpsertCustomerRequest
    confirmed: Confirmed


class PeriodMachine(RuleBasedStateMachine):
    def __init__(self, live: Live) -> None:
        super().__init__()
        self.live = live
        live.run(live.db.execute(f"TRUNCATE {TABLES}"))
        # Every period boundary is this instant plus whole hours: none falls inside an example.
        self.now0 = dt.datetime.now(dt.UTC)
        self.accounts = {c: Account() for c in CUSTOMERS}
        self.events: dict[tuple[str, str], Event] = {}  # (customer, key) -> acknowledged event
        self.recorded: list[tuple[R.RecordUsageRequest, str]] = []  # (request, event id)
        self.consumed: list[tuple[R.CheckEntitlementRequest, str]] = []
        self.calls = 0
        self.keys = 0
        self.last_sent: dict[str, Sent] = {}  # each customer's last acknowledged upsert
        self.times: set[tuple[str, dt.datetime]] = set()  # (customer, event time) seen
        self.edges: set[dt.datetime] | None = None  # _boundaries(), until an upsert
        self.log: list[str] = []  # the calls made, printed with a failure

    # --- the model's view ---

    def _key(self, prefix: str) -> str:
        self.keys += 1
        return f"{prefix}{self.keys}"

    def _boundaries(self) -> list[dt.datetime]:
        """Every customer's period boundaries of the last 90 days (and a bit), sorted."""
        low = self.now0 - dt.timedelta(days=HISTORY_DAYS + 1)
        out: set[dt.datetime] = set()
        for account in self.accounts.values():
            if not account.confirmed:
                continue
            for p in account.confirmed:
                out.update(t for t in (p.start, p.end) if low <= t <= self.now0)
            when = low
            while when <= self.now0:
                period = account.period(when)
                if period.start >= low:
                    out.add(period.start)
                when = period.end
        return sorted(out)

    def _event_time(self, when: When) -> dt.datetime | None:
        if when.kind == "default":
            return None
        if when.kind == "soon":
            return self.now0 + dt.timedelta(minutes=when.amount)
        if when.kind == "again" and self.events:
            times = sorted({e.when for e in self.events.values()})
            return times[when.amount % len(times)]
        if when.kind == "boundary":
            edges = self._boundaries()
            if edges:
                return edges[when.amount % len(edges)] - (TICK if when.nudge else dt.timedelta(0))
        return min(self.now0 - when.amount * HOUR + NUDGES[when.nudge], self.now0)

    def _events_in(self, customer_id: str, bounds: tuple[dt.datetime, dt.datetime]) -> list[Event]:
        return [
            e
            for e in self.events.values()
            if e.customer_id == customer_id and bounds[0] <= e.when < bounds[1]
        ]

    def _now_period(self, customer_id: str) -> Period:
        return self.accounts[customer_id].period(dt.datetime.now(dt.UTC))

    def _tokens_now(self, customer_id: str) -> int:
        return used(self._events_in(customer_id, self._now_period(customer_id).bounds), "tokens")

    def _classify(self, customer_id: str, when: dt.datetime) -> None:
        """Labels for --hypothesis-show-statistics: which cases the examples reach."""
        account = self.accounts[customer_id]
        if account.plan is None:
            event("event of a customer known only by its usage")
        elif when < account.confirmed[-1].start:
            event("event before the last confirmed period")
        if (customer_id, when) in self.times:
            event("event at the time of an earlier one")
        self.times.add((customer_id, when))
        if self.edges is None:
            self.edges = set(self._boundaries())
        edges = self.edges
        if when in edges:
            event("event exactly at a boundary")
        if when + TICK in edges:
            event("event one microsecond before a boundary")

    def _expect_decision(
        self, customer_id: str, feature: str, quantity: int
    ) -> tuple[bool, int, int | None, Period | None]:
        """(allowed, reason, the `used` shown or None, the period containing now)."""
        account = self.accounts[customer_id]
        if account.plan is None:
            return False, R.ENTITLEMENT_REASON_CUSTOMER_NOT_FOUND, None, None
        period = self._now_period(customer_id)
        if account.status != ACTIVE:
            return False, R.ENTITLEMENT_REASON_SUBSCRIPTION_INACTIVE, None, period
        if feature in ENABLED[account.plan]:
            return True, R.ENTITLEMENT_REASON_FEATURE_ENABLED, None, period
        spec = PLANS[account.plan].get(feature)
        if spec is None:
            return False, R.ENTITLEMENT_REASON_FEATURE_NOT_IN_PLAN, None, period
        events = self._events_in(customer_id, period.bounds)
        now_used = used(events, feature)
        if spec.limit is None:
            return True, R.ENTITLEMENT_REASON_WITHIN_LIMIT, now_used, period
        if quantity:
            after = {
                "sum": now_used + quantity,
                "count": now_used + 1,
                "max": max(now_used, quantity),
                "last": quantity,
            }[AGGREGATION[feature]]
            over = after > spec.limit
        else:
            over = now_used >= spec.limit
        if not over:
            return True, R.ENTITLEMENT_REASON_WITHIN_LIMIT, now_used, period
        if not spec.hard:
            return True, R.ENTITLEMENT_REASON_SOFT_LIMIT_EXCEEDED, now_used, period
        return False, R.ENTITLEMENT_REASON_LIMIT_EXCEEDED, now_used, period

    @staticmethod
    def _check_period(answer: Any, period: Period | None, what: str) -> None:
        """`answer`'s period fields (a check's, or a summary's) against the model's."""
        if period is None:
            assert not answer.HasField("period_start_time"), f"{what}: a period without one"
            return
        got = (_time(answer.period_start_time), _time(answer.period_end_time))
        assert got == period.bounds, f"{what}: period {got}, the model says {period.bounds}"
        assert answer.period_source == period.source, f"{what}: period source"

    # --- the model's updates ---

    def _acknowledge(self, event_: Event, request: Any) -> None:
        self._classify(event_.customer_id, event_.when)
        self.events[(event_.customer_id, event_.key)] = event_
        if isinstance(request, R.RecordUsageRequest):
            self.recorded.append((request, event_.event_id))
        else:
            self.consumed.append((request, event_.event_id))

    def _accept(
        self,
        requests: Sequence[R.RecordUsageRequest],
        answers: Sequence[R.RecordUsageResponse],
        before: dt.datetime,
        after: dt.datetime,
    ) -> None:
        """Checks a record call's answers against the model and adds its new events."""
        self.calls += 1
        assert len(answers) == len(requests)
        fresh: dict[tuple[str, str], tuple[int, R.RecordUsageRequest, str]] = {}
        for i, (req, ans) in enumerate(zip(requests, answers, strict=True)):
            key = (req.customer_id, req.idempotency_key)
            known = self.events.get(key)
            if known is not None or key in fresh:
                original = known.event_id if known is not None else fresh[key][2]
                assert ans.duplicate, f"a retry of {key} is not flagged duplicate"
                assert ans.event_id == original, f"a retry of {key} answers another event"
            else:
                assert not ans.duplicate, f"new key {key} flagged duplicate"
                fresh[key] = (i, req, ans.event_id)
        times = self.live.run(self._event_times([v[2] for v in fresh.values()]))
        for i, req, event_id in fresh.values():
            when = _time(req.event_time) if req.HasField("event_time") else times[event_id]
            if not req.HasField("event_time"):
                assert before <= when <= after, "a defaulted event_time is not the call's now"
            self._acknowledge(
                Event(
                    event_id,
                    req.customer_id,
                    req.idempotency_key,
                    req.meter,
                    req.quantity,
                    when,
                    (self.calls, i),
                ),
                req,
            )

    async def _event_times(self, ids: Sequence[str]) -> dict[str, dt.datetime]:
        return {r["id"]: r["event_time"] for r in await self.live.db.fetch(EVENT_TIMES, list(ids))}

    def _record_request(
        self, customer_id: str, meter: str, quantity: int, when: When
    ) -> R.RecordUsageRequest:
        req = R.RecordUsageRequest(
            customer_id=customer_id,
            meter=meter,
            quantity=quantity,
            idempotency_key=self._key("r"),
        )
        t = self._event_time(when)
        if t is not None:
            req.event_time.CopyFrom(_ts(t))
        return req

    def _consume_request(self, customer_id: str, quantity: int) -> R.CheckEntitlementRequest:
        return R.CheckEntitlementRequest(
            customer_id=customer_id,
            feature="tokens",
            quantity=quantity,
            consume=True,
            idempotency_key=self._key("k"),
        )

    def _consumed(
        self,
        req: R.CheckEntitlementRequest,
        answer: R.CheckEntitlementResponse,
        before: dt.datetime,
        after: dt.datetime,
    ) -> None:
        """Adds an allowed consume's event, timed by the service between `before` and
        `after`."""
        assert answer.event_id and not answer.duplicate
        when = self.live.run(self._event_times([answer.event_id]))[answer.event_id]
        assert before <= when <= after, "a consumed event is not timed at the call's now"
        self.calls += 1
        self._acknowledge(
            Event(
                answer.event_id,
                req.customer_id,
                req.idempotency_key,
                "tokens",
                req.quantity,
                when,
                (self.calls, 0),
            ),
            req,
        )

    def _upsert_request(self, customer_id: str, spec: Upsert) -> Sent:
        """The period an upsert sends and the cadence the model expects for it. The interval
        and the anchor are left out only where the service's inference is unambiguous."""
        account = self.accounts[customer_id]
        last = self.last_sent.get(customer_id)
        if spec.kind == "again" and last is not None:
            # The customer's last webhook again, another plan or status maybe: no period moves.
            request = C.UpsertCustomerRequest()
            request.CopyFrom(last.request)
            request.customer.plan_id, request.customer.subscription_status = spec.plan, spec.status
            return Sent(request, last.confirmed)
        previous = account.confirmed[-1].grid if account.confirmed else None
        anchor = self.now0 + spec.anchor_hours * HOUR
        if spec.month_end:
            anchor = anchor.replace(day=_month_days(anchor.year, anchor.month))
        grid = Grid(spec.interval, spec.count, anchor)
        calendar_based = spec.interval in ("month", "year")
        edges = [t for p in account.confirmed for t in (p.start, p.end)]
        kind = spec.kind if edges and spec.kind != "again" else "grid"
        if kind == "grid":  # one whole period of the cadence
            start, end = grid.around(self.now0 + spec.at_hours * HOUR)
            # Left out, the interval is inferred from the period: only a count of 1 is guessed.
            # A month-end period may stand for a later anchor day ([30 Nov, 28 Feb) fits the
            # 30th and the 31st) and the service takes the latest: the anchor is sent then.
            late_day = calendar_based and anchor.day > 28
            send_interval = spec.send_interval or spec.count != 1 or late_day
            send_anchor = spec.send_anchor or (late_day and _month_end(end))
        else:
            if kind == "resend":  # an existing confirmed period, maybe with another cadence
                p = account.confirmed[spec.pick % len(account.confirmed)]
                start, end = p.start, p.end
            elif kind == "follow":  # from an existing boundary
                start = edges[spec.pick % len(edges)]
                end = start + spec.length_hours * HOUR
            else:  # anywhere, any length
                start = self.now0 + spec.at_hours * HOUR
                end = start + spec.length_hours * HOUR
            # Not whole days long, it is no whole period of any cadence: left out, the interval
            # is the customer's (monthly for a new customer). Whole days may fit a guess: sent.
            send_interval = spec.send_interval or not (end - start) % DAY
            if not send_interval:
                interval, count = (previous.interval, previous.count) if previous else ("month", 1)
                grid = Grid(interval, count, anchor)
                calendar_based = interval in ("month", "year")
            # Left out, the anchor is the period's end, unless that is a month's last day.
            send_anchor = spec.send_anchor or (calendar_based and _month_end(end))
            if not send_anchor:
                grid = dataclasses.replace(grid, anchor=end)
        customer = C.Customer(
            customer_id=customer_id, plan_id=spec.plan, subscription_status=spec.status
        )
        customer.current_period_start_time.CopyFrom(_ts(start))
        customer.current_period_end_time.CopyFrom(_ts(end))
        if send_interval:
            customer.billing_interval = INTERVALS[grid.interval]
            customer.billing_interval_count = grid.count
        if send_anchor:
            customer.billing_cycle_anchor_time.CopyFrom(_ts(grid.anchor))
        return Sent(C.UpsertCustomerRequest(customer=customer), Confirmed(start, end, grid))

    def _upserted(self, sent: Sent, answer: C.UpsertCustomerResponse | None) -> None:
        """Applies an acknowledged upsert to the model; checks its answer when given."""
        c = sent.request.customer
        account = self.accounts[c.customer_id]
        new = sent.confirmed
        counted = any(e.customer_id == c.customer_id for e in self.events.values())
        last = account.confirmed[-1].start if account.confirmed else None
        where = (
            "first"
            if last is None
            else "the same period"
            if account.confirmed[-1] == new
            else "backward"
            if new.start < last
            else "forward"
        )
        event(f"upsert: {where}" + (" over events" if counted else ""))
        account.plan, account.status = c.plan_id, c.subscription_status
        account.confirmed = rewrite(account.confirmed, new)
        self.last_sent[c.customer_id] = sent
        self.edges = None
        if dt.datetime.now(dt.UTC) < new.start:
            event("now before the last confirmed period")
        if answer is not None:
            self._check_customer(c.customer_id, answer.customer, "UpsertCustomer")

    def _check_customer(self, customer_id: str, got: C.Customer, what: str) -> None:
        account = self.accounts[customer_id]
        grid = account.confirmed[-1].grid
        cadence = Grid(
            INTERVAL_NAMES.get(got.billing_interval, "?"),
            got.billing_interval_count,
            _time(got.billing_cycle_anchor_time),
        )
        assert grid.same_grid(cadence, account.confirmed[-1].end), (
            f"{what} {customer_id}: cadence {cadence}, the model says {grid}"
        )
        period = self._now_period(customer_id)
        bounds = (_time(got.current_period_start_time), _time(got.current_period_end_time))
        assert bounds == period.bounds, (
            f"{what} {customer_id}: current period {bounds}, the model says {period}"
        )
        assert got.current_period_source == period.source
        assert (got.plan_id, got.subscription_status) == (account.plan, account.status)

    def _note(self, what: str) -> None:
        self.log.append(what)

    # --- rules ---

    @initialize(spec=upserts())
    def start_first(self, spec: Upsert) -> None:
        """Two customers start with a webhook; the third may be known by its usage first."""
        self.upsert(CUSTOMERS[0], spec)

    @initialize(spec=upserts())
    def start_second(self, spec: Upsert) -> None:
        self.upsert(CUSTOMERS[1], spec)

    @rule(customer_id=customers, spec=upserts())
    def upsert(self, customer_id: str, spec: Upsert) -> None:
        sent = self._upsert_request(customer_id, spec)
        self._note(f"UpsertCustomer {_one_line(sent.request)}")
        answer = self.live.call(self.live.customers.UpsertCustomer, sent.request)
        self._upserted(sent, answer)

    @rule(customer_id=customers, meter=meters, quantity=st.integers(0, 300), when=whens)
    def record(self, customer_id: str, meter: str, quantity: int, when: When) -> None:
        req = self._record_request(customer_id, meter, quantity, when)
        self._note(f"RecordUsage {_one_line(req)}")
        before = dt.datetime.now(dt.UTC)
        answer = self.live.call(self.live.usage.RecordUsage, req)
        self._accept([req], [answer], before, dt.datetime.now(dt.UTC))

    @rule(
        items=st.lists(
            st.tuples(customers, meters, st.integers(0, 300), whens), min_size=1, max_size=4
        ),
        retries=st.lists(st.integers(0, 10_000), max_size=2),
        repeat_first=st.booleans(),
    )
    def batch(
        self, items: list[tuple[str, str, int, When]], retries: list[int], repeat_first: bool
    ) -> None:
        """A batch of new events, earlier keys retried, and maybe its first key twice."""
        requests = [self._record_request(*item) for item in items]
        if self.recorded:
            requests += [self.recorded[i % len(self.recorded)][0] for i in retries]
        if repeat_first:
            requests.append(requests[0])
        batch = R.BatchRecordUsageRequest(requests=requests)
        self._note(f"BatchRecordUsage {_one_line(batch)}")
        before = dt.datetime.now(dt.UTC)
        answer = self.live.call(self.live.usage.BatchRecordUsage, batch)
        self._accept(requests, list(answer.responses), before, dt.datetime.now(dt.UTC))

    # No preconditions: what was acknowledged depends on how concurrent calls ran, and rules
    # that hypothesis may pick must not.
    @rule(pick=st.integers(0, 10_000), conflict=st.booleans())
    def retry(self, pick: int, conflict: bool) -> None:
        """An earlier RecordUsage again: a duplicate; with another quantity: a key conflict."""
        if not self.recorded:
            return
        original, event_id = self.recorded[pick % len(self.recorded)]
        req = R.RecordUsageRequest()
        req.CopyFrom(original)
        if conflict:
            req.quantity += 1
        self._note(f"RecordUsage (again) {_one_line(req)}")
        try:
            answer = self.live.call(self.live.usage.RecordUsage, req)
        except grpc.aio.AioRpcError as exc:
            assert conflict and exc.code() == grpc.StatusCode.ALREADY_EXISTS, exc
            return
        assert not conflict, "a reused key with another payload was accepted"
        assert answer.duplicate and answer.event_id == event_id

    @rule(
        customer_id=customers,
        quantities=st.lists(st.integers(1, 600), min_size=1, max_size=3),
    )
    def consume(self, customer_id: str, quantities: list[int]) -> None:
        """Consumes tokens, a few times in a row (to reach the limit)."""
        for quantity in quantities:
            req = self._consume_request(customer_id, quantity)
            self._note(f"CheckEntitlement {_one_line(req)}")
            allowed, reason, now_used, period = self._expect_decision(
                customer_id, "tokens", quantity
            )
            before = dt.datetime.now(dt.UTC)
            answer = self.live.call(self.live.usage.CheckEntitlement, req)
            after = dt.datetime.now(dt.UTC)
            event(f"consume: {R.EntitlementReason.Name(reason)}")
            assert (answer.allowed, answer.reason) == (allowed, reason), _one_line(answer)
            self._check_period(answer, period, "consume")
            assert not answer.duplicate
            if now_used is not None:
                want = now_used + quantity if allowed else now_used
                assert answer.used == want, f"consume: used {answer.used}, the model says {want}"
            if allowed and self.accounts[customer_id].plan == "basic":
                assert answer.used <= TOKEN_LIMIT, f"an allowed consume reports {answer.used}"
            if not allowed:
                assert not answer.event_id
                continue
            self._consumed(req, answer, before, after)

    @rule(pick=st.integers(0, 10_000), conflict=st.booleans())
    def consume_again(self, pick: int, conflict: bool) -> None:
        """An earlier consume again: a replay, whatever happened since; with another quantity:
        a key conflict."""
        if not self.consumed:
            return
        original, event_id = self.consumed[pick % len(self.consumed)]
        req = R.CheckEntitlementRequest()
        req.CopyFrom(original)
        if conflict:
            req.quantity += 1
        self._note(f"CheckEntitlement (again) {_one_line(req)}")
        try:
            answer = self.live.call(self.live.usage.CheckEntitlement, req)
        except grpc.aio.AioRpcError as exc:
            assert conflict and exc.code() == grpc.StatusCode.ALREADY_EXISTS, exc
            return
        assert not conflict, "a reused consume key with another quantity was accepted"
        event("consume: replay")
        assert answer.allowed and answer.duplicate and answer.event_id == event_id
        self._check_period(answer, self._now_period(req.customer_id), "replay")
        want = self._tokens_now(req.customer_id)
        assert answer.used == want, f"replay: used {answer.used}, the model says {want}"

    @rule(
        customer_id=customers,
        feature=st.sampled_from([*METERS, "sso"]),
        quantity=st.integers(0, 600),
    )
    def check(self, customer_id: str, feature: str, quantity: int) -> None:
        req = R.CheckEntitlementRequest(customer_id=customer_id, feature=feature, quantity=quantity)
        self._note(f"CheckEntitlement {_one_line(req)}")
        allowed, reason, now_used, period = self._expect_decision(customer_id, feature, quantity)
        answer = self.live.call(self.live.usage.CheckEntitlement, req)
        assert (answer.allowed, answer.reason) == (allowed, reason), _one_line(answer)
        self._check_period(answer, period, "check")
        if now_used is not None:
            assert answer.used == now_used, f"check: used {answer.used}, the model says {now_used}"

    @rule(ops=st.lists(burst_ops, min_size=2, max_size=8))
    def burst(self, ops: list[tuple[Any, ...]]) -> None:
        """Calls made at once: records (a new key twice, earlier keys again), consumes, and at
        most one upsert per customer. The model takes what was acknowledged."""
        usage, customers_ = self.live.usage, self.live.customers
        calls: list[tuple[Callable[[Any], Awaitable[Any]], Any]] = []
        touched: set[str] = set()  # customers with records or an upsert in the burst
        sent: dict[int, Sent] = {}  # the upserts, by place in `calls`
        conflicts: set[int] = set()  # places of the calls reusing a key with another payload
        for op in ops:
            if op[0] in ("record", "twice"):
                req = self._record_request(op[1], op[2], op[3], op[4])
                calls += [(usage.RecordUsage, req)] * (2 if op[0] == "twice" else 1)
                touched.add(op[1])
            elif op[0] in ("retry", "conflict") and self.recorded:
                req = R.RecordUsageRequest()
                req.CopyFrom(self.recorded[op[1] % len(self.recorded)][0])
                if op[0] == "conflict":
                    req.quantity += 1
                    conflicts.add(len(calls))
                calls.append((usage.RecordUsage, req))
            elif op[0] == "consume":
                calls.append((usage.CheckEntitlement, self._consume_request(op[1], op[2])))
            elif op[0] == "consumes":
                for quantity in op[2]:
                    calls.append((usage.CheckEntitlement, self._consume_request(op[1], quantity)))
            elif op[0] == "bulk":
                _, customer_id, count, step = op
                span = HISTORY_DAYS * 24 * 60
                items = [
                    R.RecordUsageRequest(
                        customer_id=customer_id,
                        meter=("tokens", "calls", "storage")[i % 3],
                        quantity=i,
                        idempotency_key=self._key("b"),
                        event_time=_ts(self.now0 - dt.timedelta(minutes=(i * step * 97) % span)),
                    )
                    for i in range(count)
                ]
                calls.append((usage.BatchRecordUsage, R.BatchRecordUsageRequest(requests=items)))
                touched.add(customer_id)
            elif op[0] == "upsert":
                if any(s.request.customer.customer_id == op[1] for s in sent.values()):
                    continue  # two at once for one customer: no telling which wins
                touched.add(op[1])
                upsert = self._upsert_request(op[1], op[2])
                sent[len(calls)] = upsert
                calls.append((customers_.UpsertCustomer, upsert.request))
        self._note("at once: " + "; ".join(_one_line(req)[:2000] for _, req in calls))
        tokens_before = {c: self._tokens_now(c) for c in CUSTOMERS if self.accounts[c].plan}
        before = dt.datetime.now(dt.UTC)
        answers = self.live.gather(calls)
        after = dt.datetime.now(dt.UTC)
        for i, answer in enumerate(answers):
            if i in conflicts:
                assert isinstance(answer, grpc.aio.AioRpcError), "a reused key was accepted"
                assert answer.code() == grpc.StatusCode.ALREADY_EXISTS, answer
                answers[i] = answer = None
            if isinstance(answer, grpc.aio.AioRpcError):
                # Contention may abort a call (nothing stored); no other error is expected.
                assert answer.code() == grpc.StatusCode.ABORTED, answer
                event("burst: a call aborted")
            else:
                assert not isinstance(answer, BaseException), repr(answer)
        # Upserts first: the model places every event by the periods in force after the burst.
        for i, s in sent.items():
            if isinstance(answers[i], C.UpsertCustomerResponse):
                self._upserted(s, None)
        # Records: each key's answers name one event, new for at most one of them.
        by_key: dict[tuple[str, str], list[tuple[R.RecordUsageRequest, R.RecordUsageResponse]]]
        by_key = {}
        consumes: list[tuple[R.CheckEntitlementRequest, R.CheckEntitlementResponse]] = []
        for (_, req), answer in zip(calls, answers, strict=True):
            if answer is None or isinstance(answer, BaseException):
                continue
            if isinstance(req, R.RecordUsageRequest):
                by_key.setdefault((req.customer_id, req.idempotency_key), []).append((req, answer))
            elif isinstance(req, R.BatchRecordUsageRequest):
                assert len(answer.responses) == len(req.requests)
                for item, response in zip(req.requests, answer.responses, strict=True):
                    key = (item.customer_id, item.idempotency_key)
                    by_key.setdefault(key, []).append((item, response))
            elif isinstance(req, R.CheckEntitlementRequest):
                consumes.append((req, answer))
        self.calls += 1
        fresh: list[tuple[R.RecordUsageRequest, str]] = []
        for key, pairs in by_key.items():
            assert len({a.event_id for _, a in pairs}) == 1, f"{key} answered with two events"
            known = self.events.get(key)
            new = [a for _, a in pairs if not a.duplicate]
            if known is not None:
                assert not new and pairs[0][1].event_id == known.event_id, f"{key} again: {pairs}"
                continue
            assert len(new) == 1, f"{key} recorded {len(new)} times"
            fresh.append((pairs[0][0], new[0].event_id))
        times = self.live.run(self._event_times([event_id for _, event_id in fresh]))
        for item, event_id in fresh:
            when = _time(item.event_time) if item.HasField("event_time") else times[event_id]
            if not item.HasField("event_time"):
                assert before <= when <= after, "a defaulted event_time is not the call's now"
            self._acknowledge(
                Event(
                    event_id,
                    item.customer_id,
                    item.idempotency_key,
                    item.meter,
                    item.quantity,
                    when,
                    (self.calls, 0),
                ),
                item,
            )
        # Consumes: whatever order they ran in, the hard limit held.
        for consumed, answer in consumes:
            assert not answer.duplicate
            if answer.allowed and answer.HasField("limit"):
                assert answer.used <= answer.limit, f"an allowed consume reports {answer.used}"
            if answer.allowed:
                self._consumed(consumed, answer, before, after)
        for customer_id, tokens in tokens_before.items():
            account = self.accounts[customer_id]
            mine = [(q, a) for q, a in consumes if q.customer_id == customer_id]
            if not mine or customer_id in touched or account.plan != "basic":
                continue
            if account.status != ACTIVE:
                continue
            # Only consumes touched this customer's tokens: they ran in some order, each allowed
            # one within the limit, each denied one over it.
            total = self._tokens_now(customer_id)
            allowed = [q.quantity for q, a in mine if a.allowed]
            denied = [q.quantity for q, a in mine if not a.allowed]
            event(f"burst: {len(allowed)} consumes allowed, {len(denied)} denied")
            assert total == tokens + sum(allowed)
            if allowed:
                assert total <= TOKEN_LIMIT, f"concurrent consumes took tokens to {total}"
            for q in denied:
                assert total + q > TOKEN_LIMIT, f"a consume of {q} denied at {total} used"

    # --- after every step ---

    @invariant()
    def consistent(self) -> None:
        try:
            self.live.run(self._consistent())
        except AssertionError:
            print("\n".join(["calls:", *self.log]))
            raise

    async def _consistent(self) -> None:
        db = self.live.db
        # The stored events are exactly the acknowledged ones.
        stored = {
            r["event_id"]: (
                r["customer_id"],
                r["idempotency_key"],
                r["meter"],
                r["quantity"],
                r["event_time"],
            )
            for r in await db.fetch(EVENTS)
        }
        model = {
            e.event_id: (e.customer_id, e.key, e.meter, e.quantity, e.when)
            for e in self.events.values()
        }
        assert stored == model, f"stored events {stored}, acknowledged {model}"
        # Totals equal what the events say.
        differences = await history.verify(db)
        assert not differences, "verify: " + "; ".join(str(d) for d in differences)
        # Each event counted once, in the totals of the period containing its time.
        for r in await db.fetch(EVENT_ROWS):
            rows = list(zip(r["starts"], r["ends"], strict=True))
            assert len(rows) <= 1, f"event {r['event_id']} counted in {rows}"
            account = self.accounts[r["customer_id"]]
            if account.plan is None:
                assert not rows, f"event {r['event_id']} of a placeholder counted in {rows}"
                continue
            want = account.period(r["event_time"]).bounds
            assert rows == [want], (
                f"event {r['customer_id']}/{r['meter']} at {r['event_time']} counted in {rows}, "
                f"the model's period is {want}"
            )
        overlapping = await db.fetch(OVERLAPPING_ROWS)
        assert not overlapping, f"overlapping totals rows: {overlapping}"
        for customer_id, account in self.accounts.items():
            await self._summary(customer_id, account)

    async def _summary(self, customer_id: str, account: Account) -> None:
        req = R.GetUsageSummaryRequest(customer_id=customer_id)
        if account.plan is None:  # unknown, or known only by its usage
            for call in (
                self.live.usage.GetUsageSummary(req),
                self.live.customers.GetCustomer(C.GetCustomerRequest(customer_id=customer_id)),
            ):
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                    continue
                raise AssertionError(f"{customer_id}, which has no plan, was found")
            return
        got = await self.live.customers.GetCustomer(C.GetCustomerRequest(customer_id=customer_id))
        self._check_customer(customer_id, got.customer, "GetCustomer")
        answer = await self.live.usage.GetUsageSummary(req)
        self._check_period(answer, self._now_period(customer_id), f"summary of {customer_id}")
        assert (answer.plan_id, answer.subscription_status) == (account.plan, account.status)
        # From scratch, in the period the summary names.
        bounds = (_time(answer.period_start_time), _time(answer.period_end_time))
        events = self._events_in(customer_id, bounds)
        seats = [e.when for e in events if e.meter == "seats"]
        if len(seats) > len(set(seats)):
            event("summary: seats events with equal times")
        features = list(PLANS[account.plan])
        listed = features + sorted({e.meter for e in events} - set(features))
        figures = {m.meter: (m.used, m.unbilled) for m in answer.meters}
        want = {m: (used(events, m), unbilled(events, m)) for m in listed}
        assert figures == want, (
            f"summary of {customer_id}: (used, unbilled) {figures}, the events say {want}"
        )


def test_periods_hold_under_any_sequence_of_calls(dsn: str, plans: plans_mod.Plans) -> None:
    loop = asyncio.new_event_loop()
    try:
        live = loop.run_until_complete(Live.start(dsn, plans))
        try:

            class Machine(PeriodMachine):
                def __init__(self) -> None:
                    super().__init__(live)

            run_state_machine_as_test(Machine, settings=SETTINGS)
        finally:
            loop.run_until_complete(live.stop())
    finally:
        loop.close()
