"""Billable attribution: each event is billed to the provider its customer had when the event was
counted (usage before the customer exists: its first provider); usage counted without a provider
is unbilled for ever; after a switch, events stay with their provider unless an operator moves
them."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import os
import subprocess
import uuid

import asyncpg
import pytest
from conftest import PLANS_FILE, Service
from fakes.base import Fault
from fakes.world import CUSTOMERS, Fakes
from helpers import record
from process import executable
from test_drain import FAST, MakeDrain, drain_until_quiet, fakes, make_drain, summary

from usage.v1 import customer_pb2
from usage_service.commands import drain as drain_commands
from usage_service.providers.config import ProviderSettings
from usage_service.storage import backlog, history, migrate, ops_queries, queries

__all__ = ["fakes", "make_drain"]  # fixtures

NONE = customer_pb2.PROVIDER_UNSPECIFIED
STRIPE = customer_pb2.PROVIDER_STRIPE
POLAR = customer_pb2.PROVIDER_POLAR
POLAR_ID = CUSTOMERS["polar"].provider_customer_id  # a customer the fake Polar knows


def days(n: float) -> dt.timedelta:
    return dt.timedelta(days=n)


async def add(
    service: Service, customer_id: str, provider: int, pid: str = "", **period: dt.datetime
) -> None:
    await service.add_customer(customer_id, provider=provider, provider_customer_id=pid, **period)


async def tokens(service: Service, customer_id: str, quantity: int, when: dt.datetime) -> None:
    await service.usage.RecordUsage(record(customer_id, "tokens", quantity, uuid.uuid4().hex, when))


async def by_state(db: asyncpg.Pool, customer_id: str) -> dict[tuple[str | None, str], int]:
    rows = await db.fetch(
        "SELECT provider, report_state, sum(quantity) AS q FROM usage_events"
        " WHERE customer_id = $1 GROUP BY 1, 2",
        customer_id,
    )
    return {(r["provider"], r["report_state"]): r["q"] for r in rows}


async def test_history_of_a_free_plan_is_never_billed_on_upgrade(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    """A customer on a free plan (no provider) uses 3,000 tokens over closed periods and 100 in
    the current one, then subscribes with Polar and uses 7: Polar receives 7, not 3,107."""
    now = dt.datetime.now(dt.UTC)
    await add(service, "c_up", NONE, start=now - days(40), end=now - days(10))
    for i in range(3):
        await tokens(service, "c_up", 1000, now - days(39 - 10 * i))
    await tokens(service, "c_up", 100, now - days(1))
    await add(service, "c_up", POLAR, POLAR_ID, start=now - days(10), end=now + days(20))
    await tokens(service, "c_up", 7, now - dt.timedelta(seconds=5))

    d = await make_drain()
    await drain_until_quiet([d], service.db)
    assert fakes.polar.totals() == {(POLAR_ID, "tokens"): 7}
    meter = (await summary(service, "c_up"))["tokens"]
    assert (meter.used, meter.reported, meter.pending, meter.unbilled) == (107, 7, 0, 100)
    assert await by_state(service.db, "c_up") == {("", "unbilled"): 3100, ("polar", "reported"): 7}


async def test_usage_before_the_first_webhook_takes_the_first_provider(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    now = dt.datetime.now(dt.UTC)
    await tokens(service, "c_early", 5, now - dt.timedelta(minutes=2))
    await tokens(service, "c_free", 9, now - dt.timedelta(minutes=2))
    status = await backlog.Backlog(service.db).status()
    assert [(s.provider, s.pending) for s in status] == [("?", 2)]
    out = io.StringIO()
    drain_commands.write_status(status, ProviderSettings.from_env(fakes.env()), out)
    assert "(customer not known yet: not attributed to a provider): pending 2" in out.getvalue()

    await add(service, "c_early", STRIPE, "cus_early")
    await add(service, "c_free", NONE)
    await tokens(service, "c_early", 3, now - dt.timedelta(minutes=1))
    await tokens(service, "c_free", 1, now - dt.timedelta(minutes=1))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    assert fakes.stripe.totals() == {("cus_early", "llm_tokens"): 8}
    free = (await summary(service, "c_free"))["tokens"]
    assert (free.used, free.pending, free.unbilled, free.reported) == (10, 0, 10, 0)
    assert await backlog.Backlog(service.db).status() == []


async def test_switches_mid_period_leave_each_provider_exactly_its_usage(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    """Stripe -> Polar -> none -> Stripe within one period, with Stripe's first report still
    open (retrying) through the switches: Stripe holds what was counted under Stripe, Polar
    what was counted under Polar, and the rest is unbilled."""
    now = dt.datetime.now(dt.UTC)
    at = [now - dt.timedelta(minutes=10 - i) for i in range(4)]
    await add(service, "c_sw", STRIPE, "cus_sw")
    await tokens(service, "c_sw", 10, at[0])
    fakes.stripe.inject(Fault("status", 500, body={"error": {"message": "boom"}}))
    d = await make_drain()
    await d.cycle()
    open_reports = await service.db.fetchval("SELECT count(*) FROM reports WHERE state = 'open'")
    assert open_reports == 1  # retrying, its event inside

    await add(service, "c_sw", POLAR, POLAR_ID)
    await tokens(service, "c_sw", 20, at[1])
    await add(service, "c_sw", NONE)
    await tokens(service, "c_sw", 40, at[2])
    await add(service, "c_sw", STRIPE, "cus_sw")
    await tokens(service, "c_sw", 80, at[3])

    await drain_until_quiet([d], service.db)
    assert fakes.stripe.totals() == {("cus_sw", "llm_tokens"): 90}
    assert fakes.polar.totals() == {(POLAR_ID, "tokens"): 20}
    meter = (await summary(service, "c_sw"))["tokens"]
    assert (meter.used, meter.reported, meter.pending, meter.unbilled) == (150, 110, 0, 40)


@pytest.mark.process
async def test_events_stranded_by_a_switch_are_named_and_moved_on_request(
    service: Service, fakes: Fakes, make_drain: MakeDrain, dsn: str
) -> None:
    """An event inside a Stripe report that was retrying when the customer moved to Polar and
    the Stripe key was removed: status says why it waits, and an explicit requeue moves it."""
    now = dt.datetime.now(dt.UTC)
    await add(service, "c_st", STRIPE, "cus_st")
    await tokens(service, "c_st", 10, now - dt.timedelta(minutes=3))
    fakes.stripe.inject(Fault("status", 500, body={"error": {"message": "boom"}}))
    # a lease that runs out at once and a long backoff: the report stays open, retrying
    short = FAST.model_copy(update={"lease": 0.001, "backoff_base": 30, "backoff_cap": 30})
    with_stripe = await make_drain(settings=short)
    await with_stripe.cycle()
    await add(service, "c_st", POLAR, POLAR_ID)
    await tokens(service, "c_st", 1, now - dt.timedelta(minutes=1))

    no_stripe = await make_drain(without=["STRIPE_"])
    await drain_until_quiet([no_stripe], service.db)
    assert fakes.polar.totals() == {(POLAR_ID, "tokens"): 1}
    store = backlog.Backlog(service.db)
    assert await store.requeue("stripe") == 0  # nothing parked: it is waiting, not failed
    env = {k: v for k, v in fakes.env().items() if not k.startswith("STRIPE_")}
    out = io.StringIO()
    drain_commands.write_status(await store.status(), ProviderSettings.from_env(env), out)
    text = out.getvalue()
    assert "stripe (no credentials: waiting): pending 1" in text
    assert "waiting 1: STRIPE_API_KEY is not set" in text
    assert "1 of them belong to customers now billed by another provider" in text

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        environ = {**os.environ, **env, "DATABASE_URL": dsn, "USAGE_PLANS_FILE": str(PLANS_FILE)}
        return subprocess.run(
            [*executable(), "requeue", *args],
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
        )

    # Stripe may hold what it was sent: without the operator's word, nothing in an open report
    # moves.
    held = await asyncio.to_thread(cli, "--move-to-current-provider", "--provider", "stripe")
    assert held.returncode == 0, held.stderr
    assert held.stdout.splitlines()[0] == "moved 0 events"
    assert "1 events left in open reports: their old provider may hold them" in held.stdout
    # Nor while its retry is not due (a send's outcome could still land); then it is.
    await service.db.execute("UPDATE reports SET next_attempt_at = now()")
    args = ("--move-to-current-provider", "--provider", "stripe", "--include-open-reports")
    moved = await asyncio.to_thread(cli, *args)
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.splitlines() == [
        "moved 1 events",
        "  stripe -> polar: 1",
        "  1 of them were in open reports, handed to their old provider: it must hold none of them",
    ]
    again = await asyncio.to_thread(cli, "--move-to-current-provider", "--include-open-reports")
    assert again.stdout.splitlines() == ["moved 0 events"]

    await drain_until_quiet([no_stripe], service.db)
    assert fakes.polar.totals() == {(POLAR_ID, "tokens"): 11}
    assert fakes.stripe.totals() == {}
    assert await by_state(service.db, "c_st") == {("polar", "reported"): 11}
    abandoned = await service.db.fetch(
        "SELECT state, last_error FROM reports WHERE provider = 'stripe'"
    )
    assert [tuple(r) for r in abandoned] == [
        ("failed", "abandoned: its events moved to another provider")
    ]


async def test_a_move_to_a_customer_without_provider_makes_parked_events_unbilled(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    now = dt.datetime.now(dt.UTC)
    await add(service, "c_gone", STRIPE)  # no Stripe id: every report is parked
    await tokens(service, "c_gone", 6, now - dt.timedelta(minutes=1))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    assert (await summary(service, "c_gone"))["tokens"].failed == 6
    await add(service, "c_gone", NONE)
    moved = await backlog.Backlog(service.db).move_to_current_provider("", ["c_gone"])
    assert (moved.events, moved.by_route) == (1, (("stripe", "", 1),))
    meter = (await summary(service, "c_gone"))["tokens"]
    assert (meter.failed, meter.pending, meter.unbilled) == (0, 0, 6)


async def test_attribution_holds_while_the_provider_flips_under_load(service: Service) -> None:
    """Recorders race with webhooks that flip the customer between no provider and Stripe: every
    event carries one of the two, and the totals' unbilled figures equal the events' (the
    teardown's verify checks every counter against the events)."""
    now = dt.datetime.now(dt.UTC)
    await add(service, "c_flip", NONE)

    async def recorder(n: int) -> None:
        for i in range(40):
            await tokens(service, "c_flip", 1 + i % 3, now - dt.timedelta(seconds=n + i))

    async def flipper() -> None:
        for i in range(20):
            await add(service, "c_flip", STRIPE if i % 2 == 0 else NONE, "cus_flip")

    await asyncio.gather(*(recorder(n) for n in range(4)), flipper())
    seen = await by_state(service.db, "c_flip")
    assert set(seen) <= {("", "unbilled"), ("stripe", "pending")}
    assert sum(seen.values()) == (await summary(service, "c_flip"))["tokens"].used
    meter = (await summary(service, "c_flip"))["tokens"]
    assert meter.unbilled == seen.get(("", "unbilled"), 0)
    assert meter.pending == seen.get(("stripe", "pending"), 0)


@pytest.mark.tampers  # rows written by hand, without their billing periods
async def test_the_attribution_migration_decides_existing_events(plain_dsn: str) -> None:
    """Data from before attribution: events of customers with a provider take it, those of
    customers without one become unbilled (counted in their totals), those of customers known
    only by their usage wait for the first webhook."""
    conn = await asyncpg.connect(plain_dsn)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        await conn.execute(queries.MIGRATION_TABLE)
        for file in sorted(migrate.MIGRATIONS.glob("*.sql"))[:3]:
            for statement in migrate.statements(file.read_text()):
                await conn.execute(statement)
            await conn.execute(queries.MIGRATION_DONE, file.stem)
        april, may = dt.datetime(2026, 4, 1, tzinfo=dt.UTC), dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
        for cid, provider, pid in [("paid", "stripe", "cus_p"), ("free", "", "")]:
            await conn.execute(
                "INSERT INTO customers (customer_id, plan_id, subscription_status, period_start,"
                " period_end, provider, provider_customer_id) VALUES"
                " ($1, 'basic', 'active', $2, $3, $4, $5)",
                cid,
                april,
                may,
                provider,
                pid,
            )
            await conn.execute(
                "INSERT INTO usage_totals (customer_id, meter, period_start, period_end,"
                " event_count, quantity_sum) VALUES ($1, 'tokens', $2, $3, 1, 4)",
                cid,
                april,
                may,
            )
        await conn.execute(
            "INSERT INTO customers (customer_id, plan_id, subscription_status)"
            " VALUES ('early', '', '')"
        )
        for i, cid in enumerate(["paid", "free", "early"]):
            await conn.execute(
                "INSERT INTO usage_events (event_id, customer_id, idempotency_key, meter,"
                " quantity, event_time, payload_hash) VALUES ($1, $2, 'k', 'tokens', 4, $3, '')",
                uuid.uuid4(),
                cid,
                april + dt.timedelta(days=i + 1),
            )
    finally:
        await conn.close()
    assert (await migrate.migrate_dsn(plain_dsn))[:1] == ["0004_attribution"]  # and any later
    conn = await asyncpg.connect(plain_dsn)
    try:
        events = await conn.fetch(
            "SELECT customer_id, provider, report_state FROM usage_events ORDER BY 1"
        )
        assert [tuple(r) for r in events] == [
            ("early", None, "pending"),
            ("free", "", "unbilled"),
            ("paid", "stripe", "pending"),
        ]
        totals = await conn.fetch(
            "SELECT customer_id, unbilled_count, unbilled_sum FROM usage_totals ORDER BY 1"
        )
        assert [tuple(r) for r in totals] == [("free", 1, 4), ("paid", 0, 0)]
        ids = await conn.fetch(
            "SELECT customer_id, provider, provider_customer_id FROM customer_providers"
        )
        assert [tuple(r) for r in ids] == [("paid", "stripe", "cus_p")]
    finally:
        await conn.close()


async def test_status_and_backlog_read_the_attributed_provider(service: Service) -> None:
    now = dt.datetime.now(dt.UTC)
    await add(service, "c_b", STRIPE, "cus_b")
    await tokens(service, "c_b", 2, now - dt.timedelta(minutes=1))
    await add(service, "c_b", POLAR, POLAR_ID)
    await service.usage.RecordUsage(record("c_b", "tokens", 3, "late", now))
    rows = await service.db.fetch(
        f"SELECT provider, events FROM ({ops_queries.DRAIN_BACKLOG}) b ORDER BY 1"
    )
    assert [tuple(r) for r in rows] == [("polar", 1), ("stripe", 1)]


@pytest.mark.tampers
async def test_verify_names_events_of_a_known_customer_without_a_decided_provider(
    service: Service,
) -> None:
    now = dt.datetime.now(dt.UTC)
    await add(service, "c_v", STRIPE, "cus_v")
    await tokens(service, "c_v", 2, now)
    assert await history.verify(service.db) == []
    await service.db.execute("UPDATE usage_events SET provider = NULL")
    (found,) = await history.verify(service.db)
    assert str(found).endswith("1 events billed to no provider, neither decided nor unbilled")
