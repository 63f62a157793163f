"""Read-backs against the fakes over HTTP: what Polar, Dodo Payments and Creem hold for a customer,
meter and period compared with the events sent (drops, doubles, lag, errors), and Lemon Squeezy's
current usage."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from fakes import event, report
from fakes.base import Fault
from fakes.ingest import CREEM_KEY, DODO_KEY, POLAR_KEY, FakeCreem, FakeDodo, FakeIngest, FakePolar
from fakes.lemon_squeezy import KEY as LEMON_KEY
from fakes.lemon_squeezy import FakeLemonSqueezy

from usage_service import domain
from usage_service.domain import plans
from usage_service.domain.plans import Meter
from usage_service.domain.reports import ReportEvent, Sent
from usage_service.providers import creem, dodo_payments, ingest, outcome, polar
from usage_service.providers.config import Endpoint
from usage_service.providers.lemon_squeezy import CURRENT_ONLY, LemonSqueezy
from usage_service.providers.readback import Held, Query

pytestmark = pytest.mark.slow  # over HTTP against the fake providers, timeouts included

POLAR_1 = "3d5e7f90-1a2b-4c3d-8e4f-5a6b7c8d9e0f"


@dataclasses.dataclass(frozen=True)
class Case:
    provider: domain.Provider
    fake: type[FakeIngest]
    key: str
    make: Callable[[Endpoint, Mapping[str, Meter], float], ingest.Ingest]
    customer: str
    read_route: str  # "METHOD /path" of the read endpoint

    def event(self, **fields: Any) -> ReportEvent:
        return event(customer_id="c1", provider_customer_id=self.customer, **fields)


CASES = [
    Case(domain.Provider.POLAR, FakePolar, POLAR_KEY, polar.adapter, POLAR_1, "GET /v1/events/"),
    Case(
        domain.Provider.DODO_PAYMENTS,
        FakeDodo,
        DODO_KEY,
        dodo_payments.adapter,
        "cus_1",
        "GET /events",
    ),
    Case(domain.Provider.CREEM, FakeCreem, CREEM_KEY, creem.adapter, "cus_1", "GET /v1/events"),
]


@pytest.fixture(params=CASES, ids=lambda c: c.provider.value)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def fake(case: Case) -> Iterator[FakeIngest]:
    server = case.fake([case.customer]).start()
    yield server
    server.stop()
    assert server.violations == []


@pytest.fixture
async def adapter(case: Case, fake: FakeIngest, plans: plans.Plans) -> ingest.Ingest:
    a = case.make(Endpoint(case.key, fake.url), plans.meters, 0.5)
    yield a
    await a.aclose()


async def send(
    case: Case, adapter: ingest.Ingest, meter: str, *quantities: int
) -> list[ReportEvent]:
    """One event per quantity, whole seconds apart and oldest first, delivered in one report."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    events = [
        case.event(
            meter=meter, quantity=q, when=now - dt.timedelta(seconds=10 + len(quantities) - i)
        )
        for i, q in enumerate(quantities)
    ]
    assert await adapter.send(report(case.provider, *events)) == outcome.Delivered()
    return events


def query(
    case: Case,
    meter: Meter,
    events: list[ReportEvent],
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
) -> Query:
    now = dt.datetime.now(dt.UTC)
    return Query(
        customer_id="c1",
        provider_customer_id=case.customer,
        subscription_item="",
        meter=meter,
        start=start or now - dt.timedelta(days=1),
        end=end or now + dt.timedelta(days=1),
        sent=tuple(Sent(e.event_id, e.quantity, e.event_time) for e in events),
    )


def reads(case: Case, fake: FakeIngest) -> int:
    method, path = case.read_route.split(" ", 1)
    return sum(1 for c in fake.calls if c.method == method and c.path == path)


@pytest.mark.parametrize(
    ("meter", "quantities", "expected"),
    [
        ("tokens", (3, 4, 5), 12),  # sum
        ("calls", (3, 4, 5), 3),  # count
        ("storage", (7, 9, 2), 9),  # max
        ("seats", (2, 9, 4), 4),  # last
    ],
)
async def test_read_back_equals_what_was_sent(
    case, fake, adapter, plans, meter, quantities, expected
) -> None:
    events = await send(case, adapter, meter, *quantities)
    assert await adapter.held(query(case, plans.meters[meter], events)) == Held(expected)


async def test_a_dropped_event_lowers_the_figure_and_is_named_missing(
    case, fake, adapter, plans
) -> None:
    events = await send(case, adapter, "tokens", 3, 4, 5)
    fake.drop(events[1].event_id)
    held = await adapter.held(query(case, plans.meters["tokens"], events))
    assert held == Held(8, missing=(events[1].event_id,))


async def test_a_dropped_last_value_shows_the_one_before(case, fake, adapter, plans) -> None:
    events = await send(case, adapter, "seats", 2, 9, 4)
    fake.drop(events[2].event_id)
    held = await adapter.held(query(case, plans.meters["seats"], events))
    assert held == Held(9, missing=(events[2].event_id,))


async def test_a_doubled_event_raises_the_figure_as_extra(case, fake, adapter, plans) -> None:
    events = await send(case, adapter, "tokens", 3, 4, 5)
    fake.double(events[0].event_id)
    assert await adapter.held(query(case, plans.meters["tokens"], events)) == Held(15, extra=3)
    calls = await adapter.held(query(case, plans.meters["calls"], []))
    assert calls == Held(0)  # another meter's events are not counted


async def test_lag_shows_the_old_figure_until_catch_up(case, fake, adapter, plans) -> None:
    first = await send(case, adapter, "tokens", 3)
    fake.lag()
    second = await send(case, adapter, "tokens", 4)
    q = query(case, plans.meters["tokens"], first + second)
    assert await adapter.held(q) == Held(3, missing=(second[0].event_id,))
    fake.catch_up()
    assert await adapter.held(q) == Held(7)


async def test_only_events_of_the_period_count(case, fake, adapter, plans) -> None:
    events = await send(case, adapter, "tokens", 3, 4, 5)
    start = events[1].event_time
    end = events[2].event_time
    held = await adapter.held(query(case, plans.meters["tokens"], events[1:2], start, end))
    assert held == Held(4)


@pytest.mark.parametrize(
    "fault",
    [
        Fault("status", 500, body={"detail": "boom"}),
        Fault("status", 404, body={"detail": "Not Found"}),
        Fault("status", 200, body={"unexpected": []}),
        Fault("status", 200, body=None),
        Fault("drop"),
        Fault("hang"),
    ],
    ids=["500", "404", "unreadable", "empty", "no-answer", "timeout"],
)
async def test_errors_give_no_figure_and_say_why(case, fake, adapter, plans, fault) -> None:
    events = await send(case, adapter, "tokens", 3)
    fake.inject(dataclasses.replace(fault, route=case.read_route))
    held = await adapter.held(query(case, plans.meters["tokens"], events))
    assert held.value is None and held.why.startswith(f"{case.provider.value}: "), held
    fake.release()


async def test_a_wrong_key_gives_no_figure(case, fake, adapter, plans) -> None:
    events = await send(case, adapter, "tokens", 3)
    a = case.make(Endpoint("wrong", fake.url), plans.meters, 0.5)
    try:
        held = await a.held(query(case, plans.meters["tokens"], events))
    finally:
        await a.aclose()
    assert held.value is None and "401" in held.why
    fake.violations.clear()  # the fake records the wrong key


async def test_reads_page_through_many_events(case, fake, adapter, plans) -> None:
    events = await send(case, adapter, "tokens", *([1] * 230))
    # hundreds of reads: each may wait longer than the fixture's 0.5 s on a loaded machine
    patient = case.make(Endpoint(case.key, fake.url), plans.meters, 10.0)
    try:
        assert await patient.held(query(case, plans.meters["tokens"], events)) == Held(230)
    finally:
        await patient.aclose()
    calls = reads(case, fake)
    if case.provider is domain.Provider.CREEM:
        assert calls == 230  # one per sent event
    else:
        assert calls == 3  # 100 a page


async def test_polar_matches_a_clamped_timestamp(plans) -> None:
    fake = FakePolar([POLAR_1]).start()
    a = polar.adapter(Endpoint(POLAR_KEY, fake.url), plans.meters, 0.5)
    case = CASES[0]
    try:
        e = case.event(quantity=6, when=dt.datetime.now(dt.UTC))  # sent as now - CLOCK_SKEW
        assert await a.send(report(case.provider, e)) == outcome.Delivered()
        (held,) = fake.accepted.values()
        assert held["timestamp"] < outcome.iso(e.event_time)
        assert await a.held(query(case, plans.meters["tokens"], [e])) == Held(6)
    finally:
        await a.aclose()
        fake.stop()
    assert fake.violations == []


async def test_creem_counts_only_events_a_meter_matches(plans) -> None:
    fake = FakeCreem(["cus_1"], meters=["calls"]).start()
    a = creem.adapter(Endpoint(CREEM_KEY, fake.url), plans.meters, 0.5)
    try:
        case = CASES[2]
        e = case.event(meter="tokens", quantity=3)
        answer = await a.send(report(case.provider, e))
        assert isinstance(answer, outcome.Rejected)  # stored, but never billed
        held = await a.held(query(case, plans.meters["tokens"], [e]))
    finally:
        await a.aclose()
        fake.stop()
    assert held == Held(0, missing=(e.event_id,))
    assert fake.violations == []


# --- Lemon Squeezy ---


@pytest.fixture
def lemon() -> Iterator[FakeLemonSqueezy]:
    server = FakeLemonSqueezy({"si_1": 10}).start()
    yield server
    server.stop()
    assert server.violations == []


@pytest.fixture
async def lemon_adapter(lemon: FakeLemonSqueezy, plans: plans.Plans) -> LemonSqueezy:
    a = LemonSqueezy(Endpoint(LEMON_KEY, lemon.url), plans.meters, 0.5)
    yield a
    await a.aclose()


def lemon_query(
    plans: plans.Plans, start: str, end: str, item: str = "si_1", meter: str = "tokens"
) -> Query:
    return Query(
        customer_id="c1",
        provider_customer_id="",
        subscription_item=item,
        meter=plans.meters[meter],
        start=dt.datetime.fromisoformat(start),
        end=dt.datetime.fromisoformat(end),
        sent=(),
    )


async def test_lemon_squeezy_current_period_is_its_usage(lemon, lemon_adapter, plans) -> None:
    q = lemon_query(plans, lemon.period_start, lemon.period_end)
    assert await lemon_adapter.held(q) == Held(10)
    lemon.usage["si_1"] += 5  # the figure shifts there
    assert await lemon_adapter.held(q) == Held(15)


async def test_lemon_squeezy_cannot_tell_another_period(lemon, lemon_adapter, plans) -> None:
    start = dt.datetime.fromisoformat(lemon.period_start)
    earlier = lemon_query(plans, (start - dt.timedelta(days=30)).isoformat(), start.isoformat())
    assert await lemon_adapter.held(earlier) == Held(None, why=CURRENT_ONLY)
    partly = lemon_query(plans, lemon.period_start, (start + dt.timedelta(days=1)).isoformat())
    assert await lemon_adapter.held(partly) == Held(None, why=CURRENT_ONLY)


async def test_lemon_squeezy_errors_give_no_figure(lemon, lemon_adapter, plans) -> None:
    unknown = lemon_query(plans, lemon.period_start, lemon.period_end, item="si_nope")
    held = await lemon_adapter.held(unknown)
    assert held.value is None and held.why.startswith("lemon squeezy 404"), held
    no_item = lemon_query(plans, lemon.period_start, lemon.period_end, item="")
    assert (await lemon_adapter.held(no_item)).value is None
    lemon.inject(Fault("status", 503, route="GET /v1/subscription-items"))
    held = await lemon_adapter.held(lemon_query(plans, lemon.period_start, lemon.period_end))
    assert held.value is None and "503" in held.why
