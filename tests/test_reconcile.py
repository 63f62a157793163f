"""Reconciliation against the five fake providers: what each holds, read back through its API,
against what the service reported, with a verdict per customer, meter and period, and fixes
queued where they are safe (then sent by the drain, once)."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable

import prometheus_client
import pytest
from conftest import PLANS_FILE, Service
from fakes.base import Fault
from fakes.world import CUSTOMERS, LEMON_ITEMS, Fakes
from process import executable
from test_drain import (
    MakeDrain,
    drain_until_quiet,
    fakes,
    make_drain,
    record_many,
    transient_faults,
)

from usage_service import providers
from usage_service.commands import reconcile as reconcile_commands
from usage_service.domain import plans
from usage_service.providers.config import ProviderSettings
from usage_service.reconcile import background as periodic
from usage_service.reconcile.reconciler import Reconciler, Row, Verdict
from usage_service.storage import store
from usage_service.storage.reconcile_store import ReconcileStore

__all__ = ["fakes", "make_drain"]  # fixtures

MakeReconciler = Callable[..., Awaitable[Reconciler]]
NAMES = ("stripe", "polar", "dodo_payments", "creem", "lemon_squeezy")
METERS = {"tokens": [5, 7, 11], "calls": [1, 1], "seats": [3, 2], "storage": [100, 50]}


@pytest.fixture
async def make_reconciler(
    service: Service, fakes: Fakes, plans: plans.Plans
) -> AsyncIterator[MakeReconciler]:
    made: list[providers.Adapter] = []

    async def make(settle: float = 600.0) -> Reconciler:
        adapters = providers.adapters(ProviderSettings.from_env(fakes.env()), plans.meters)
        made.extend(adapters.values())
        return Reconciler(ReconcileStore(service.db), adapters, plans.meters, settle)

    yield make
    for adapter in made:
        await adapter.aclose()


async def setup(
    service: Service,
    fakes: Fakes,
    names: tuple[str, ...] = NAMES,
    offset: dt.timedelta = dt.timedelta(0),
) -> None:
    """The customers of `names`, in a period of whole minutes (plus `offset`) that Lemon Squeezy
    shares (it shows only its current period), with usage on every meter."""
    now = dt.datetime.now(dt.UTC)
    start = (now - dt.timedelta(days=1)).replace(second=0, microsecond=0) + offset
    end = start + dt.timedelta(days=30)
    fakes.lemon_squeezy.roll_over(start, end)
    for name in names:
        c = CUSTOMERS[name]
        await service.add_customer(
            c.customer_id,
            start=start,
            end=end,
            provider=c.provider,
            provider_customer_id=c.provider_customer_id,
            subscription_items=c.subscription_items,
        )
        for i, (meter, quantities) in enumerate(METERS.items()):
            when = now - dt.timedelta(minutes=10 - i)
            await record_many(service, c.customer_id, meter, quantities, when)


def verdicts(rows: list[Row]) -> dict[tuple[str, str], Verdict]:
    return {(r.provider, r.meter): r.verdict for r in rows}


async def test_after_a_drain_through_faults_every_provider_matches(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    await setup(service, fakes)
    for fake in fakes.all():
        fake.inject(*transient_faults())
    await drain_until_quiet([await make_drain()], service.db)
    rows = await (await make_reconciler()).run()
    assert len(rows) == len(NAMES) * len(METERS)
    assert {r.verdict for r in rows} == {Verdict.MATCH}, [r for r in rows if r.verdict != "match"]
    tokens = [r for r in rows if r.meter == "tokens"]
    assert {(r.recorded, r.reported, r.held, r.drift) for r in tokens} == {(23, 23, 23, 0)}
    assert fakes.violations() == []


async def test_stripe_periods_not_in_whole_minutes_are_told_but_for_count_meters(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    """Stripe summarises by the minute: reports of sum, max and last meters are timed inside
    their period's whole minutes, so those figures are told; a count meter's events keep their
    own times, so over a period that starts or ends mid-minute it cannot be told."""
    await setup(service, fakes, ("stripe",), offset=dt.timedelta(seconds=17))
    await drain_until_quiet([await make_drain()], service.db)
    found = verdicts(await (await make_reconciler()).run())
    assert found.pop(("stripe", "calls")) is Verdict.CANNOT_TELL
    assert set(found.values()) == {Verdict.MATCH}


def _sent_ids(fakes: Fakes, name: str, meter_event: str) -> list[str]:
    """The provider's own ids of what it holds for one event name, in the order received."""
    if name == "stripe":
        return [i for i, e in fakes.stripe.events.items() if e.event_name == meter_event]
    fake = getattr(fakes, name)
    return [
        i for i, e in fake.accepted.items() if e.get("name", e.get("event_name")) == meter_event
    ]


@pytest.mark.parametrize("name", ["stripe", "polar", "dodo_payments", "creem"])
async def test_a_dropped_event_is_provider_lower_and_a_doubled_one_provider_higher(
    name: str,
    service: Service,
    fakes: Fakes,
    make_drain: MakeDrain,
    make_reconciler: MakeReconciler,
) -> None:
    await setup(service, fakes, (name,))
    await drain_until_quiet([await make_drain()], service.db)
    fake = getattr(fakes, name)
    event_name = "llm_tokens" if name == "stripe" else "tokens"
    first = _sent_ids(fakes, name, event_name)[0]
    r = await make_reconciler(settle=0.001)  # whatever was accepted has settled
    fake.drop(first)
    (row,) = [x for x in await r.run() if x.meter == "tokens"]
    assert row.verdict is Verdict.PROVIDER_LOWER, row
    assert row.drift is not None and row.drift < 0
    fake.dropped.clear()
    fake.double(first)
    (row,) = [x for x in await r.run() if x.meter == "tokens"]
    assert row.verdict is Verdict.PROVIDER_HIGHER, row
    assert row.drift is not None and row.drift > 0
    fake.doubled.clear()


@pytest.mark.parametrize("name", ["stripe", "polar", "dodo_payments", "creem"])
async def test_a_lagging_provider_is_settling_then_matches(
    name: str,
    service: Service,
    fakes: Fakes,
    make_drain: MakeDrain,
    make_reconciler: MakeReconciler,
) -> None:
    fake = getattr(fakes, name)
    fake.lag()  # reads show nothing of what is sent now
    await setup(service, fakes, (name,))
    await drain_until_quiet([await make_drain()], service.db)
    r = await make_reconciler(settle=600.0)
    assert set(verdicts(await r.run()).values()) == {Verdict.SETTLING}
    fake.catch_up()
    assert set(verdicts(await r.run()).values()) == {Verdict.MATCH}


async def test_lemon_squeezy_shows_its_current_period_only(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    await setup(service, fakes, ("lemon_squeezy",))
    await drain_until_quiet([await make_drain()], service.db)
    r = await make_reconciler(settle=0.001)
    fakes.lemon_squeezy.usage[LEMON_ITEMS["tokens"]] += 4
    found = verdicts(await r.run())
    assert found[("lemon_squeezy", "tokens")] is Verdict.PROVIDER_HIGHER
    (previous,) = {r.verdict for r in await r.run(which="previous")} or {Verdict.CANNOT_TELL}
    assert previous is Verdict.CANNOT_TELL


async def test_a_stripe_sum_fix_is_queued_once_and_sent_once(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    """A Stripe sum meter lost a report: --fix queues one meter event of the missing amount,
    committed before the drain sends it; running --fix again (before or after the drain sent it)
    queues nothing more, and once sent Stripe holds what was reported."""
    await setup(service, fakes, ("stripe",))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    (lost,) = _sent_ids(fakes, "stripe", "llm_tokens")
    fakes.stripe.drop(lost)
    r = await make_reconciler(settle=0.001)
    (row,) = [x for x in await r.run(fix=True) if x.meter == "tokens"]
    assert row.verdict is Verdict.PROVIDER_LOWER and row.drift == -23
    assert row.fix.startswith("queued 23 (report ")
    (again,) = [x for x in await r.run(fix=True) if x.meter == "tokens"]
    assert (again.verdict, again.fix) == (Verdict.SETTLING, "")
    await d.cycle()  # the drain sends the fix
    (done,) = [x for x in await r.run(fix=True) if x.meter == "tokens"]
    assert (done.verdict, done.held, done.reported, done.fix) == (Verdict.MATCH, 23, 23, "")
    fixes = await service.db.fetch("SELECT state, value FROM reports WHERE kind = 'fix'")
    assert [tuple(f) for f in fixes] == [("delivered", 23)]
    assert fakes.stripe.summary("cus_s", "llm_tokens", 0, 2**40) == 23


async def test_a_fix_committed_but_never_sent_is_sent_by_the_drain_and_not_queued_again(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    """The fix is one committed report: a reconcile killed right after it queued the fix leaves
    it for the drain; another run sees it in flight and queues nothing."""
    await setup(service, fakes, ("stripe",))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    (lost,) = _sent_ids(fakes, "stripe", "llm_tokens")
    fakes.stripe.drop(lost)
    fakes.stripe.inject(Fault("status", 500, body={"error": {"message": "boom"}}))
    r = await make_reconciler(settle=0.001)
    await r.run(fix=True)
    await d.cycle()  # the fix's first send fails: it stays open, retrying
    (row,) = [x for x in await r.run(fix=True) if x.meter == "tokens"]
    assert (row.verdict, row.fix) == (Verdict.SETTLING, "")
    await drain_until_quiet([d], service.db)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while await service.db.fetchval("SELECT count(*) FROM reports WHERE state = 'open'"):
        assert loop.time() < deadline
        await d.cycle()
    assert fakes.stripe.summary("cus_s", "llm_tokens", 0, 2**40) == 23
    assert await service.db.fetchval("SELECT count(*) FROM reports WHERE kind = 'fix'") == 1


@pytest.mark.parametrize("name", ["polar", "dodo_payments", "creem"])
async def test_a_per_event_fix_sends_the_missing_events_again_once(
    name: str,
    service: Service,
    fakes: Fakes,
    make_drain: MakeDrain,
    make_reconciler: MakeReconciler,
) -> None:
    await setup(service, fakes, (name,))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    fake = getattr(fakes, name)
    lost = _sent_ids(fakes, name, "tokens")[1]
    fake.drop(lost)
    r = await make_reconciler(settle=0.001)
    (row,) = [x for x in await r.run(fix=True) if x.meter == "tokens"]
    assert row.verdict is Verdict.PROVIDER_LOWER and row.drift == -7
    assert row.fix.startswith("queued a re-send of 1 events")
    (again,) = [x for x in await r.run(fix=True) if x.meter == "tokens"]
    assert again.fix == "a re-send is already queued"
    await d.cycle()
    (done,) = [x for x in await r.run(fix=True) if x.meter == "tokens"]
    assert (done.verdict, done.held, done.fix) == (Verdict.MATCH, 23, "")


@pytest.mark.process
async def test_the_command_prints_a_row_per_customer_meter_and_period_and_exits_1_on_drift(
    service: Service, fakes: Fakes, make_drain: MakeDrain, dsn: str
) -> None:
    await setup(service, fakes, ("polar",))
    await drain_until_quiet([await make_drain()], service.db)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            **fakes.env(),
            "DATABASE_URL": dsn,
            "USAGE_PLANS_FILE": str(PLANS_FILE),
            "USAGE_RECONCILE_SETTLE_SECONDS": "0.001",
        }
        return subprocess.run(
            [*executable(), "reconcile", *args], env=env, capture_output=True, text=True, timeout=60
        )

    clean = await asyncio.to_thread(cli)
    assert clean.returncode == 0, clean.stderr
    lines = clean.stdout.splitlines()
    assert lines[0].split() == [
        "customer", "provider", "meter", "period", "recorded", "reported", "held", "drift",
        "verdict",
    ]  # fmt: skip
    assert len(lines) == 1 + len(METERS) + 1 and lines[-1] == f"{len(METERS)} match"
    assert clean.stderr.splitlines() == ["reconcile: 1/1 customers"]  # no library chatter
    fakes.polar.drop(_sent_ids(fakes, "polar", "tokens")[0])
    drift = await asyncio.to_thread(cli, "--json", "--provider", "polar")
    assert drift.returncode == 1
    rows = [json.loads(line) for line in drift.stdout.splitlines()]
    (tokens,) = [r for r in rows if r["meter"] == "tokens"]
    assert (tokens["verdict"], tokens["drift"], tokens["held"]) == ("provider lower", -5, 18)
    other = await asyncio.to_thread(cli, "--provider", "stripe")
    assert (other.returncode, other.stdout) == (0, "nothing to reconcile\n")
    fakes.polar.dropped.clear()


async def test_stripe_meter_error_reports_name_the_events_they_concern(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    """Stripe accepted a meter event, then reported it could not bill it: the reconciliation
    shows the report with the customer, meter and events that meter event carried."""
    await setup(service, fakes, ("stripe",))
    await drain_until_quiet([await make_drain()], service.db)
    (identifier,) = _sent_ids(fakes, "stripe", "llm_tokens")
    fakes.stripe.report_error(identifier, "meter_event_customer_not_found", "No such customer")
    r = await make_reconciler()
    errors = await r.meter_errors(dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    assert not isinstance(errors, str)
    (error,) = errors
    events = await service.db.fetch(
        "SELECT event_id::text FROM usage_events WHERE customer_id = 'c_stripe' AND meter = "
        "'tokens' ORDER BY event_time"
    )
    assert (error.code, error.customer_id, error.meter) == (
        "meter_event_customer_not_found",
        "c_stripe",
        "tokens",
    )
    assert sorted(error.event_ids) == sorted(r["event_id"] for r in events)
    out = io.StringIO()
    reconcile_commands.write_errors(errors, out)
    assert (
        "meter_event_customer_not_found x1: No such customer (customer c_stripe" in out.getvalue()
    )


async def test_the_periodic_reconciliation_sets_its_gauges_and_logs_a_drift_once(
    service: Service,
    fakes: Fakes,
    make_drain: MakeDrain,
    plans: plans.Plans,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await setup(service, fakes, ("polar",))
    await drain_until_quiet([await make_drain()], service.db)
    fakes.polar.drop(_sent_ids(fakes, "polar", "tokens")[0])
    env = {**fakes.env(), "USAGE_RECONCILE_INTERVAL_SECONDS": "3600"}
    env["USAGE_RECONCILE_SETTLE_SECONDS"] = "0.001"
    st = store.Store(service.db)
    background = periodic.Background.start(
        st, plans, periodic.ReconcileSettings.from_env(env), ProviderSettings.from_env(env)
    )
    assert background is not None
    try:
        await background.once()
        await background.once()
    finally:
        await background.stop()
    sample = prometheus_client.REGISTRY.get_sample_value
    assert sample("usage_reconcile_periods", {"provider": "polar", "verdict": "match"}) == 3
    lower = {"provider": "polar", "verdict": "provider lower"}
    assert sample("usage_reconcile_periods", lower) == 1
    assert sample("usage_reconcile_drift", {"provider": "polar", "meter": "tokens"}) == -5
    drifts = [r for r in caplog.records if "provider lower" in r.getMessage()]
    assert len(drifts) == 1
    fakes.polar.dropped.clear()
