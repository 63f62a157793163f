"""The drain on a real PostgreSQL against five fake providers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import io
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

import asyncpg
import prometheus_client
import pytest
from conftest import Service
from fakes import event as fake_event
from fakes.base import Fault
from fakes.world import CUSTOMERS, LEMON_ITEMS, POLAR_CUSTOMER, Fakes
from helpers import Drains, record

from usage.v1 import customer_pb2, usage_pb2
from usage_service import domain
from usage_service.commands import drain as drain_commands
from usage_service.domain import plans, reports
from usage_service.domain.plans import Aggregation
from usage_service.drain.loop import Drain, DrainSettings
from usage_service.drain.reports import build_reports
from usage_service.providers import dodo_payments, outcome
from usage_service.providers import polar as polar_wire
from usage_service.providers.config import ProviderSettings
from usage_service.providers.outcome import Reporting
from usage_service.providers.stripe_meters import TOO_OLD, StripeMeters
from usage_service.storage import backlog, drain_store

FAST = DrainSettings(
    interval=0.05, lease=10, claim=1000, backoff_base=0.02, backoff_cap=0.2, concurrency=8
)
SETTLE_TIMEOUT = 60.0  # seconds
POLAR_UNKNOWN = "0b9e7c1a-2d4f-4e6a-8c3b-5f7a9d1e2c4b"  # a UUID no Polar customer has
MakeDrain = Callable[..., Awaitable[Drain]]


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    started = Fakes.start()
    yield started
    started.stop()


@pytest.fixture
async def make_drain(dsn: str, plans: plans.Plans, fakes: Fakes) -> AsyncIterator[MakeDrain]:
    drains = Drains(dsn, plans.meters)

    async def make(
        without: Sequence[str] = (), settings: DrainSettings = FAST, owner: str = ""
    ) -> Drain:
        env = {k: v for k, v in fakes.env().items() if not any(k.startswith(w) for w in without)}
        env["LEMONSQUEEZY_SETTLE_SECONDS"] = "0.2"  # how long an unknown increment holds a lane
        return await drains.make(env, settings, owner, pool_size=10)

    yield make
    await drains.close()
    if drains.made:
        db = await asyncpg.connect(dsn)
        try:
            assert await fakes_against_reported(fakes, db, plans) == []
        finally:
            await db.close()


# The fake holding each per-event provider's events, by the service's provider name.
_PER_EVENT = ("polar", "dodo_payments", "creem")


async def fakes_against_reported(
    fakes: Fakes, db: asyncpg.Connection, plans: plans.Plans
) -> list[str]:
    """Where a fake does not bill what the service says it reported: each per-event provider
    bills every event reported to it and nothing else but events of reports still open (sent,
    outcome unknown), and Stripe's sum meters hold the reported sums (of the part of each event
    no grant paid for), up to what open reports may have added."""
    rows = await db.fetch(
        """SELECT e.event_id, e.provider, e.meter, e.quantity - e.covered AS quantity,
               p.provider_customer_id,
               CASE WHEN e.report_state = 'pending' AND e.report_id IS NOT NULL THEN 'open'
                    ELSE e.report_state END AS state
           FROM usage_events e
           LEFT JOIN customer_providers p
               ON p.customer_id = e.customer_id AND p.provider = e.provider"""
    )
    sent_to = {  # event -> the provider customer id its report carried
        e["event_id"]: e["provider_customer_id"]
        for r in await db.fetch("SELECT events::text FROM reports")
        for e in json.loads(r["events"])
    }
    out: list[str] = []
    for name in _PER_EVENT:
        fake = getattr(fakes, name)
        billed = {i for i, e in fake.accepted.items() if fake.bills(e) and i not in fake.dropped}
        mine = [r for r in rows if r["provider"] == name]
        reported = {str(r["event_id"]) for r in mine if r["state"] == "reported"}
        maybe = {str(r["event_id"]) for r in mine if r["state"] == "open"}
        if not reported <= billed <= reported | maybe:
            out.append(f"{name}: bills {sorted(billed)}, reported {sorted(reported)}")
    sums: dict[tuple[str, str], list[int]] = {}  # (customer, event name) -> [reported, open]
    for r in rows:
        meter = plans.meters.get(r["meter"])
        if r["provider"] == "stripe" and meter and meter.aggregation is Aggregation.SUM:
            customer = sent_to.get(str(r["event_id"]), r["provider_customer_id"])
            key = (customer, meter.stripe.event_name)
            figures = sums.setdefault(key, [0, 0])
            if r["state"] in ("reported", "open"):
                figures[r["state"] == "open"] += r["quantity"]
    summed = {
        m.stripe.event_name for m in plans.meters.values() if m.aggregation is Aggregation.SUM
    }
    for key in fakes.stripe.totals():
        if key[1] not in summed:
            continue
        held = fakes.stripe.summary(*key, 0, 2**40)  # as summaries show it: lost ones left out
        reported, maybe = sums.pop(key, [0, 0])
        if not reported <= held <= reported + maybe:
            out.append(f"stripe {key}: holds {held}, reported {reported} (+{maybe} open)")
    out += [f"stripe {k}: holds nothing, reported {v[0]}" for k, v in sums.items() if v[0]]
    return out


async def add_customers(service: Service, names: Sequence[str] = tuple(CUSTOMERS)) -> None:
    for name in names:
        c = CUSTOMERS[name]
        await service.add_customer(
            c.customer_id,
            plan_id="basic",
            provider=c.provider,
            provider_customer_id=c.provider_customer_id,
            subscription_items=c.subscription_items,
        )


async def record_many(
    service: Service,
    customer_id: str,
    meter: str,
    quantities: Sequence[int],
    start: dt.datetime | None = None,
) -> list[str]:
    """Records one event per quantity, a millisecond apart (so `last` is well defined)."""
    start = start or dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    ids: list[str] = []
    for i in range(0, len(quantities), 1000):
        chunk = [
            record(
                customer_id, meter, q, uuid.uuid4().hex, start + dt.timedelta(milliseconds=i + j)
            )
            for j, q in enumerate(quantities[i : i + 1000])
        ]
        answer = await service.usage.BatchRecordUsage(
            usage_pb2.BatchRecordUsageRequest(requests=chunk)
        )
        ids += [r.event_id for r in answer.responses]
    return ids


async def drain_until_quiet(drains: Sequence[Drain], db: asyncpg.Pool) -> None:
    """Cycles until no event attributed to a configured provider is pending. Reports in
    backoff become due on their own time, so between cycles this polls, up to a deadline."""
    configured = sorted({p.value for d in drains for p in d.adapters})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT
    while loop.time() < deadline:
        await asyncio.gather(*(d.cycle() for d in drains))
        left = await db.fetchval(
            """SELECT count(*) FROM usage_events
               WHERE report_state = 'pending' AND provider = ANY($1::text[])""",
            configured,
        )
        if left == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{left} events still pending after {SETTLE_TIMEOUT}s")


async def states(db: asyncpg.Pool, customer_id: str) -> dict[str, int]:
    rows = await db.fetch(
        "SELECT report_state, count(*) AS n FROM usage_events WHERE customer_id = $1 GROUP BY 1",
        customer_id,
    )
    return {r["report_state"]: r["n"] for r in rows}


async def summary(service: Service, customer_id: str) -> dict[str, usage_pb2.MeterUsage]:
    answer = await service.usage.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(customer_id=customer_id)
    )
    return {m.meter: m for m in answer.meters}


def transient_faults(route: str = "") -> list[Fault]:
    return [
        Fault("status", 500, body={"error": {"type": "api_error", "message": "boom"}}, route=route),
        Fault("status", 429, {"Retry-After": "1"}, {"error": {"message": "slow"}}, route=route),
        Fault("hang", route=route),
        Fault("drop", route=route),
        Fault("status", 503, body=None, route=route),
        Fault("status", 408, body=None, route=route),
    ]


async def test_every_provider_ends_with_exactly_the_recorded_usage_through_every_fault(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    await add_customers(service)
    await service.add_customer(  # Polar refuses this customer id: its events are set aside
        "c_polar_bad", provider=customer_pb2.PROVIDER_POLAR, provider_customer_id=POLAR_UNKNOWN
    )
    d = await make_drain()
    recorded: dict[tuple[str, str], list[int]] = {}
    t0 = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    for round_ in range(2):
        for name, c in CUSTOMERS.items():
            for meter, qs in {
                "tokens": [5, 7, 11 + round_],
                "calls": [1, 1],
                "seats": [3 + round_, 2 + round_ * 4],
                "storage": [100 * (round_ + 1), 50],
            }.items():
                start = t0 + dt.timedelta(minutes=round_)
                await record_many(service, c.customer_id, meter, qs, start)
                recorded.setdefault((name, meter), []).extend(qs)
        await record_many(service, "c_polar_bad", "tokens", [9])
        for fake in fakes.all():
            fake.inject(*transient_faults())
        fakes.lemon_squeezy.inject(*transient_faults("GET /v1/subscription-items/"))
        await drain_until_quiet([d], service.db)

    assert fakes.violations() == []
    # Stripe: one summed event per report for sum meters, each event for count meters, the latest
    # value for last meters, the period's peak (as a last value) for max meters.
    stripe = fakes.stripe
    assert stripe.totals()[("cus_s", "llm_tokens")] == sum(recorded[("stripe", "tokens")])
    assert stripe.counts()[("cus_s", "calls")] == len(recorded[("stripe", "calls")])
    assert stripe.last("cus_s", "seats") == recorded[("stripe", "seats")][-1]
    assert stripe.last("cus_s", "storage") == max(recorded[("stripe", "storage")])
    lemon = fakes.lemon_squeezy.usage
    assert lemon[LEMON_ITEMS["tokens"]] == sum(recorded[("lemon_squeezy", "tokens")])
    assert lemon[LEMON_ITEMS["calls"]] == len(recorded[("lemon_squeezy", "calls")])
    assert lemon[LEMON_ITEMS["seats"]] == recorded[("lemon_squeezy", "seats")][-1]
    assert lemon[LEMON_ITEMS["storage"]] == max(recorded[("lemon_squeezy", "storage")])
    for name in ("polar", "dodo_payments", "creem"):
        fake = getattr(fakes, name)
        c = CUSTOMERS[name]
        expected = {
            (c.provider_customer_id, meter): sum(recorded[(name, meter)])
            for meter in ("tokens", "calls", "seats", "storage")
        }
        assert fake.totals() == expected, name
        assert len(fake.accepted) == sum(
            len(recorded[(name, m)]) for m in ("tokens", "calls", "seats", "storage")
        )
    for name, c in CUSTOMERS.items():
        assert await states(service.db, c.customer_id) == {"reported": 18}, name
        meters = await summary(service, c.customer_id)
        assert meters["tokens"].reported == sum(recorded[(name, "tokens")])
        assert meters["calls"].reported == 4
        assert all(m.pending == 0 for m in meters.values())
    assert await states(service.db, "c_polar_bad") == {"failed": 2}
    reason = await service.db.fetchval(
        "SELECT DISTINCT last_error FROM usage_events WHERE customer_id = 'c_polar_bad'"
    )
    assert f"{POLAR_UNKNOWN} does not exist" in reason


async def test_a_thousand_stripe_sum_events_cost_a_handful_of_calls(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    await add_customers(service, ["stripe"])
    await record_many(service, "c_stripe", "tokens", list(range(1, 1001)))
    labels = {"provider": "stripe", "outcome": "delivered"}
    before = prometheus_client.REGISTRY.get_sample_value("usage_events_reported_total", labels)
    d = await make_drain()
    assert await d.cycle() == 1  # one report
    assert len(fakes.stripe.writes()) == 1
    after = prometheus_client.REGISTRY.get_sample_value("usage_events_reported_total", labels)
    assert (after or 0) - (before or 0) == 1000
    assert fakes.stripe.totals() == {("cus_s", "llm_tokens"): 500500}
    assert await states(service.db, "c_stripe") == {"reported": 1000}
    (meter,) = [m for m in (await summary(service, "c_stripe")).values() if m.meter == "tokens"]
    assert (meter.reported, meter.pending) == (500500, 0)


async def test_summary_counts_pending_reported_and_parked(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    await add_customers(service, ["stripe"])
    await service.add_customer(  # no Stripe customer id: every report is refused
        "c_nostripe", provider=customer_pb2.PROVIDER_STRIPE
    )
    await record_many(service, "c_stripe", "tokens", [10, 20])
    await record_many(service, "c_nostripe", "tokens", [4, 5])
    before = (await summary(service, "c_stripe"))["tokens"]
    assert (before.reported, before.pending) == (0, 30)
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    after = (await summary(service, "c_stripe"))["tokens"]
    assert (after.reported, after.pending) == (30, 0)
    parked = (await summary(service, "c_nostripe"))["tokens"]
    assert (parked.reported, parked.pending) == (0, 0)  # parked is neither
    totals = await service.db.fetchrow(
        "SELECT failed_count, failed_sum FROM usage_totals WHERE customer_id = 'c_nostripe'"
    )
    assert tuple(totals) == (2, 9)

    status = await backlog.Backlog(service.db).status()
    (row,) = [s for s in status if s.provider == "stripe"]
    assert row.failed == 2 and row.pending == 0
    assert row.failed_reasons == (
        ("the customer has no Stripe customer id (provider_customer_id)", 2),
    )
    out = io.StringIO()
    drain_commands.write_status(status, ProviderSettings.from_env(fakes.env()), out)
    assert "stripe: pending 0 (oldest -), parked 2" in out.getvalue()
    assert "parked 2: the customer has no Stripe customer id" in out.getvalue()

    # The operator fixes the customer and requeues: the events go out under a new report.
    await service.add_customer(
        "c_nostripe", provider=customer_pb2.PROVIDER_STRIPE, provider_customer_id="cus_n"
    )
    assert await backlog.Backlog(service.db).requeue("stripe") == 2
    requeued = (await summary(service, "c_nostripe"))["tokens"]
    assert (requeued.reported, requeued.pending) == (0, 9)
    await drain_until_quiet([d], service.db)
    assert fakes.stripe.totals()[("cus_n", "llm_tokens")] == 9
    totals = await service.db.fetchrow(
        "SELECT failed_count, failed_sum, reported_sum FROM usage_totals "
        "WHERE customer_id = 'c_nostripe'"
    )
    assert tuple(totals) == (0, 0, 9)


async def test_a_provider_without_credentials_keeps_its_events_pending(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    await add_customers(service, ["stripe", "polar"])
    await record_many(service, "c_polar", "tokens", [1, 2, 3])
    await record_many(service, "c_stripe", "tokens", [4])
    off = await make_drain(without=["POLAR_"])
    await drain_until_quiet([off], service.db)
    await off.cycle()
    assert await states(service.db, "c_polar") == {"pending": 3}
    assert fakes.polar.calls == []
    status = await backlog.Backlog(service.db).status()
    out = io.StringIO()
    env = {k: v for k, v in fakes.env().items() if "POLAR" not in k}
    drain_commands.write_status(status, ProviderSettings.from_env(env), out)
    assert "polar (no credentials: waiting): pending 3" in out.getvalue()
    on = await make_drain()
    await drain_until_quiet([on], service.db)
    assert fakes.polar.totals() == {(POLAR_CUSTOMER, "tokens"): 6}


async def test_dodo_events_older_than_an_hour_are_parked_with_that_reason(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    await add_customers(service, ["dodo_payments"])
    old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    await record_many(service, "c_dodo", "tokens", [5], start=old)
    await record_many(service, "c_dodo", "tokens", [6])
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    assert await states(service.db, "c_dodo") == {"failed": 1, "reported": 1}
    reason = await service.db.fetchval(
        "SELECT last_error FROM usage_events WHERE report_state = 'failed'"
    )
    assert reason == f"dodo_payments: {dodo_payments.TOO_OLD}"
    assert fakes.dodo_payments.totals() == {("dodo_1", "tokens"): 6}
    assert fakes.violations() == []


async def test_stripe_reports_first_sent_over_23_hours_ago_are_not_resent(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    await add_customers(service, ["stripe"])
    await record_many(service, "c_stripe", "tokens", [5, 6])
    fakes.stripe.inject(Fault("status", 500, body={"error": {"message": "boom"}}))
    d = await make_drain()
    await d.cycle()
    assert len(fakes.stripe.writes()) == 1
    await service.db.execute(
        "UPDATE reports SET first_sent_at = now() - interval '24 hours', next_attempt_at = now()"
    )
    await d.cycle()
    assert len(fakes.stripe.writes()) == 1  # not re-sent
    assert await states(service.db, "c_stripe") == {"failed": 2}
    assert await service.db.fetchval("SELECT DISTINCT last_error FROM usage_events") == TOO_OLD


async def test_a_dead_workers_report_is_resent_under_the_same_identifier(
    service: Service, fakes: Fakes, make_drain: MakeDrain, dsn: str, plans: plans.Plans
) -> None:
    await add_customers(service, ["stripe"])
    await record_many(service, "c_stripe", "tokens", [5, 6])
    # A worker claims and commits a report, then dies before sending it.
    dead = await make_drain(settings=FAST, owner="dead")
    stripe = domain.Provider.STRIPE
    (claimed,) = await dead.store.claim_new(  # a lease long enough for a loaded machine
        stripe,
        "dead",
        3.0,
        100,
        lambda c: build_reports(stripe, StripeMeters.reporting, plans.meters, c),
    )
    live = await make_drain(owner="live")
    assert await live.cycle() == 0  # the lease holds: nothing to do yet, nothing sent
    assert fakes.stripe.calls == []
    await drain_until_quiet([live], service.db)
    (event,) = fakes.stripe.events.values()
    assert event.identifier == claimed.report_id and event.value == 11


async def test_replicas_on_one_database_send_each_report_once(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    await add_customers(service)
    expected: dict[str, int] = {}
    for name, c in CUSTOMERS.items():
        await record_many(service, c.customer_id, "tokens", [1] * 300)
        await record_many(service, c.customer_id, "calls", [1] * 50)
        expected[name] = 300
    replicas = [await make_drain(owner=f"r{i}") for i in range(3)]
    await drain_until_quiet(replicas, service.db)
    assert fakes.violations() == []  # includes "two calls in flight" for Stripe and LS
    assert fakes.stripe.totals()[("cus_s", "llm_tokens")] == 300
    assert fakes.stripe.counts()[("cus_s", "calls")] == 50
    assert fakes.lemon_squeezy.usage["si_tokens"] == 300
    assert fakes.lemon_squeezy.usage["si_calls"] == 50
    for name in ("polar", "dodo_payments", "creem"):
        assert len(getattr(fakes, name).accepted) == 350
    delivered = await service.db.fetchval("SELECT count(*) FROM reports WHERE state = 'delivered'")
    sent = len(fakes.stripe.writes()) + len(fakes.lemon_squeezy.writes())
    assert sent <= delivered + 50  # Stripe count events are one call each; nothing sent twice


async def test_stop_lets_the_current_cycle_finish(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    await add_customers(service, ["stripe"])
    await record_many(service, "c_stripe", "tokens", [3])
    fakes.stripe.inject(Fault("block"))
    d = await make_drain()
    task = asyncio.create_task(d.run())
    assert await asyncio.to_thread(fakes.stripe.blocked.wait, 10)  # a send is in flight
    d.stop()
    fakes.stripe.release()  # the connection drops: the cycle settles a retry, then stops
    await asyncio.wait_for(task, 10)
    row = await service.db.fetchrow("SELECT state, attempts, lease_until FROM reports")
    assert (row["state"], row["attempts"], row["lease_until"]) == ("open", 1, None)


def claimed(
    customer_id: str, meter: str, quantity: int, period: dt.datetime | None, **totals: int
) -> drain_store.Claimed:
    e = fake_event(customer_id=customer_id, meter=meter, quantity=quantity)
    return drain_store.Claimed(e, period, None, totals.get("peak"), totals.get("last"))


def test_reports_collapse_per_customer_meter_and_period(plans: plans.Plans) -> None:
    p1 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    p2 = dt.datetime(2026, 2, 1, tzinfo=dt.UTC)
    items = [
        claimed("a", "tokens", 2, p1),
        claimed("a", "tokens", 3, p1),
        claimed("a", "tokens", 4, p2),  # next period: waits for the first report to settle
        claimed("b", "tokens", 5, p1),
        claimed("a", "storage", 10, p1, peak=70, last=10),
        claimed("a", "seats", 4, p1, peak=9, last=4),
    ]
    stripe = domain.Provider.STRIPE
    built = {r.lane: r for r in build_reports(stripe, StripeMeters.reporting, plans.meters, items)}
    assert {lane: (len(r.events), r.value) for lane, r in built.items()} == {
        reports.lane(stripe, "a", "tokens"): (2, 5),
        reports.lane(stripe, "b", "tokens"): (1, 5),
        reports.lane(stripe, "a", "storage"): (1, 70),  # the period's peak, never lower
        reports.lane(stripe, "a", "seats"): (1, 4),
    }
    calls = [claimed("a", "calls", 1, p1) for _ in range(450)]
    (only,) = build_reports(stripe, StripeMeters.reporting, plans.meters, calls)
    assert len(only.events) == 200  # one call each: a bounded report
    polar = build_reports(
        domain.Provider.POLAR,
        Reporting(lanes=False, batch=polar_wire.WIRE.cap),
        plans.meters,
        calls,
    )
    assert [len(r.events) for r in polar] == [450]  # one call: Polar takes 500
    dodo = build_reports(
        domain.Provider.DODO_PAYMENTS,
        Reporting(lanes=False, batch=dodo_payments.WIRE.cap),
        plans.meters,
        calls,
    )
    assert [len(r.events) for r in dodo] == [100, 100, 100, 100, 50]
    assert all(r.lane is None for r in polar)


def test_backoff_is_capped_exponential_with_jitter() -> None:
    s = DrainSettings(backoff_base=1.0, backoff_cap=60.0)
    for attempts, step in ((0, 1.0), (1, 2.0), (3, 8.0), (10, 60.0), (500, 60.0)):
        delays = {s.backoff(attempts) for _ in range(50)}
        assert all(step / 2 <= d <= step for d in delays)
        assert len(delays) > 1


async def test_a_watcher_sees_the_drain_settle_its_usage(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    await add_customers(service, ["stripe"])
    await service.add_customer("c_nostripe", provider=customer_pb2.PROVIDER_STRIPE)
    await record_many(service, "c_stripe", "tokens", [10, 20])
    await record_many(service, "c_nostripe", "tokens", [4])
    calls = [
        service.usage.WatchUsage(usage_pb2.WatchUsageRequest(customer_id=c))
        for c in ("c_stripe", "c_nostripe")
    ]
    streams = [call.__aiter__() for call in calls]
    async with asyncio.timeout(30):
        snaps = [await anext(s) for s in streams]
        assert [(m.meters[0].pending, m.meters[0].reported) for m in snaps] == [(30, 0), (4, 0)]
        await drain_until_quiet([await make_drain()], service.db)
        settled = await anext(streams[0])
        parked = await anext(streams[1])
    assert settled.kind == parked.kind == usage_pb2.USAGE_CHANGE_KIND_DRAIN
    tokens = {m.meter: m for m in settled.meters}["tokens"]
    assert (tokens.reported, tokens.pending, tokens.used) == (30, 0, 30)
    refused = {m.meter: m for m in parked.meters}["tokens"]
    assert (refused.failed, refused.pending) == (4, 0)
    for call in calls:
        call.cancel()


ONLY_POLAR = ("STRIPE_", "LEMONSQUEEZY_", "DODO_", "CREEM_")


def polar_calls(fakes: Fakes) -> list[list[str]]:
    """The external ids of every event of every answered Polar ingest call, in order."""
    return [
        [e["external_id"] for e in json.loads(c.body)["events"]]
        for c in fakes.polar.calls
        if c.method == "POST" and c.status
    ]


async def add_polar_customers(service: Service, count: int) -> list[str]:
    names = [f"c_polar_{i:02d}" for i in range(count)]
    for name in names:  # no Polar id: the customer id is sent as external_customer_id
        await service.add_customer(name, plan_id="basic", provider=customer_pb2.PROVIDER_POLAR)
    return names


async def test_several_customers_go_to_polar_in_one_call_as_one_report_each(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    names = await add_polar_customers(service, 5)
    for i, name in enumerate(names):
        await record_many(service, name, "tokens", [i + 1] * 3)
    d = await make_drain(without=ONLY_POLAR)
    await drain_until_quiet([d], service.db)

    assert fakes.polar.batch_sizes == [15]  # every customer's events in one call
    rows = await service.db.fetch(
        "SELECT customer_id, report_id, state, events::text FROM reports ORDER BY 1"
    )
    assert [(r["customer_id"], r["state"]) for r in rows] == [(n, "delivered") for n in names]
    for row in rows:  # each report holds its own customer's events, and they name it
        events = json.loads(row["events"])
        assert {e["customer_id"] for e in events} == {row["customer_id"]} and len(events) == 3
        claimed = await service.db.fetch(
            "SELECT DISTINCT report_id FROM usage_events WHERE customer_id = $1",
            row["customer_id"],
        )
        assert [r["report_id"] for r in claimed] == [row["report_id"]]
    for i, name in enumerate(names):
        assert await states(service.db, name) == {"reported": 3}
        assert (await summary(service, name))["tokens"].reported == 3 * (i + 1)
    assert fakes.violations() == []


async def test_a_crash_between_claim_and_settle_resends_the_same_ids(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    names = await add_polar_customers(service, 3)
    for name in names:
        await record_many(service, name, "tokens", [2, 3])
    polar = domain.Provider.POLAR
    # A worker claims one report per customer and sends them in one call, then dies before
    # settling: their leases run out.
    dead = await make_drain(without=ONLY_POLAR, owner="dead")
    claimed = await dead.store.claim_batches(polar, "dead", 1.0, 100, 500)
    assert sorted(r.customer_id for r in claimed) == names
    together = dataclasses.replace(
        claimed[0], events=tuple(e for r in claimed for e in r.events), customer_id=""
    )
    assert await dead.adapters[polar].send(together) == outcome.Delivered()
    first = polar_calls(fakes)
    assert len(first) == 1 and len(first[0]) == 6

    live = await make_drain(without=ONLY_POLAR, owner="live")
    await drain_until_quiet([live], service.db)
    calls = polar_calls(fakes)
    # the same ids again (in one call, or one per report when their leases ran out apart)
    again = [event_id for call in calls[1:] for event_id in call]
    assert set(again) == set(first[0]) and len(again) >= 6
    assert len(fakes.polar.accepted) == 6  # deduplicated by Polar
    keys = await service.db.fetch("SELECT customer_id, report_id, state FROM reports")
    assert sorted((r["customer_id"], str(r["report_id"]), r["state"]) for r in keys) == sorted(
        (r.customer_id, r.report_id, "delivered") for r in claimed
    )  # the same reports, settled once each; no new ones
    for name in names:
        assert (await summary(service, name))["tokens"].reported == 5


async def test_two_drain_workers_never_send_an_event_twice(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    names = await add_polar_customers(service, 20)
    for i, name in enumerate(names):
        await record_many(service, name, "tokens", [1] * (10 + i))
    small = FAST.model_copy(update={"claim": 40})  # many cycles, both workers busy at once
    workers = [await make_drain(without=ONLY_POLAR, settings=small, owner=f"w{i}") for i in (1, 2)]
    await drain_until_quiet(workers, service.db)

    sent = [event_id for call in polar_calls(fakes) for event_id in call]
    assert len(sent) == len(set(sent)) == sum(10 + i for i in range(20))
    owners = await service.db.fetch("SELECT DISTINCT leased_by FROM reports")
    assert {r["leased_by"] for r in owners} == {"w1", "w2"}  # both took part
    reports = await service.db.fetch("SELECT customer_id, report_id, events::text FROM reports")
    held = {
        e["event_id"]: (r["customer_id"], r["report_id"])
        for r in reports
        for e in json.loads(r["events"])
        if e["customer_id"] == r["customer_id"]  # a report holds its customer's events only
    }
    events = await service.db.fetch("SELECT event_id, customer_id, report_id FROM usage_events")
    assert {str(e["event_id"]): (e["customer_id"], e["report_id"]) for e in events} == held
    for i, name in enumerate(names):
        assert await states(service.db, name) == {"reported": 10 + i}
