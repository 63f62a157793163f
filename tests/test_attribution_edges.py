"""Billable attribution at its edges: operator moves racing with a provider that may hold the
events already, the 0004 migration on data of customers that dropped their provider, races of
recorders with the first webhook and with moves, and ids/properties at providers' limits."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import asyncpg
import grpc
import pytest
from conftest import Service
from fakes.base import Fault
from fakes.world import POLAR_CUSTOMER, Fakes
from helpers import details, record
from test_drain import FAST, MakeDrain, drain_until_quiet, fakes, make_drain, record_many, summary

from usage.v1 import customer_pb2, usage_pb2
from usage_service.storage import backlog, migrate, queries

__all__ = ["fakes", "make_drain"]  # fixtures

NONE = customer_pb2.PROVIDER_UNSPECIFIED
STRIPE = customer_pb2.PROVIDER_STRIPE
POLAR = customer_pb2.PROVIDER_POLAR
CREEM = customer_pb2.PROVIDER_CREEM


async def event_providers(db: asyncpg.Pool, customer_id: str) -> dict[tuple[str | None, str], int]:
    rows = await db.fetch(
        "SELECT provider, report_state, count(*) AS n FROM usage_events"
        " WHERE customer_id = $1 GROUP BY 1, 2",
        customer_id,
    )
    return {(r["provider"], r["report_state"]): r["n"] for r in rows}


# --- moves: nothing billed twice ---


async def test_a_move_leaves_a_batch_polar_may_hold_to_polar(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    """Polar stores a batch but the answer is lost (connection dropped): the report retries.
    The customer moves to Creem and an operator runs `requeue --move-to-current-provider`: the
    event in the open report stays with Polar, whose dedupe settles it; Creem never gets it."""
    await service.add_customer("c_mv", provider=POLAR, provider_customer_id=POLAR_CUSTOMER)
    (event_id,) = await record_many(
        service, "c_mv", "tokens", [10], dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    )
    fakes.polar.inject(Fault("drop"))
    slow = FAST.model_copy(update={"backoff_base": 30, "backoff_cap": 30})
    d = await make_drain(settings=slow)
    await d.cycle()
    assert event_id in fakes.polar.accepted  # Polar holds it; we do not know
    fakes.creem.customers.add("creem_mv")
    await service.add_customer("c_mv", provider=CREEM, provider_customer_id="creem_mv")
    moved = await backlog.Backlog(service.db).move_to_current_provider("polar", ["c_mv"])
    assert (moved.events, moved.left_in_open_reports) == (0, 1)
    await service.db.execute("UPDATE reports SET next_attempt_at = now()")  # the retry is due
    await drain_until_quiet([await make_drain()], service.db)
    billed_by = [name for name in ("polar", "creem") if event_id in getattr(fakes, name).accepted]
    assert billed_by == ["polar"], (moved, billed_by)


async def test_moves_race_with_two_drains_and_recorders(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    """a Polar customer's reports keep failing (500, nothing stored) while it
    moves to Creem; moves run again and again while two drain replicas cycle and the customer
    keeps recording. In the end every event is held by exactly one provider, the one it is
    attributed to, and every move printed counts add up to the events that changed provider."""
    await service.add_customer("c_race", provider=POLAR, provider_customer_id=POLAR_CUSTOMER)
    now = dt.datetime.now(dt.UTC)
    first = await record_many(service, "c_race", "tokens", [1] * 50, now - dt.timedelta(minutes=5))
    fakes.polar.inject(*[Fault("status", 500, body={"detail": "boom"}) for _ in range(30)])
    fakes.creem.customers.add("creem_race")
    a, b = await make_drain(owner="a"), await make_drain(owner="b")
    await asyncio.gather(a.cycle(), b.cycle())
    await service.add_customer("c_race", provider=CREEM, provider_customer_id="creem_race")
    store = backlog.Backlog(service.db)
    total_moved = 0

    async def mover() -> None:
        nonlocal total_moved
        for i in range(15):  # open reports too: Polar stored none of them (500s)
            total_moved += (await store.move_to_current_provider("polar", (), i % 2 == 1)).events

    async def cycles() -> None:
        for _ in range(15):
            await asyncio.gather(a.cycle(), b.cycle())

    async def recorder() -> None:
        for i in range(5):
            await record_many(service, "c_race", "tokens", [1] * 10, now - dt.timedelta(seconds=i))

    await asyncio.gather(mover(), cycles(), recorder())
    total_moved += (await store.move_to_current_provider("polar")).events
    await drain_until_quiet([a, b], service.db)
    polar, creem = set(fakes.polar.accepted), set(fakes.creem.accepted)
    assert not polar & creem
    rows = await service.db.fetch(
        "SELECT event_id::text, provider FROM usage_events WHERE customer_id = 'c_race'"
    )
    assert {r["event_id"] for r in rows if r["provider"] == "polar"} == polar
    assert {r["event_id"] for r in rows if r["provider"] == "creem"} == creem
    assert len(polar) + len(creem) == 100
    assert total_moved == len(set(first) - polar)


# --- races of recorders with the first webhook ---


async def test_recorders_race_the_first_webhook_and_a_switch(service: Service) -> None:
    """events recorded for an unknown customer while its first webhook (Stripe)
    and then a switch to no provider arrive: none is left undecided, those counted before the
    switch are Stripe's, and the summary's pending + unbilled equal the events."""
    now = dt.datetime.now(dt.UTC)

    async def recorder(n: int) -> None:
        for i in range(30):
            await service.usage.RecordUsage(
                record("c_new", "tokens", 1, f"k{n}-{i}", now - dt.timedelta(seconds=i))
            )

    async def webhooks() -> None:
        await service.add_customer("c_new", provider=STRIPE, provider_customer_id="cus_new")
        await service.add_customer("c_new", provider=NONE)

    await asyncio.gather(*(recorder(n) for n in range(4)), webhooks())
    seen = await event_providers(service.db, "c_new")
    assert set(seen) <= {("stripe", "pending"), ("", "unbilled")}, seen
    meter = (await summary(service, "c_new"))["tokens"]
    assert meter.pending == seen.get(("stripe", "pending"), 0)
    assert meter.unbilled == seen.get(("", "unbilled"), 0)
    assert meter.used == 120


# --- the 0004 migration ---


@pytest.mark.tampers  # rows written by hand, without their billing periods
async def test_the_migration_makes_parked_events_of_a_customer_without_provider_unbilled(
    plain_dsn: str,
) -> None:
    """Before 0004: a customer on Stripe had an event parked (no Stripe id), then moved to a free
    plan. The migration attributes it to '' (no provider) and makes it unbilled, like the
    pending ones: left 'failed', a requeue would make it pending for ever (no provider claims ''
    events)."""
    conn = await asyncpg.connect(plain_dsn)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        await conn.execute(queries.MIGRATION_TABLE)
        for file in sorted(migrate.MIGRATIONS.glob("*.sql"))[:3]:
            for statement in migrate.statements(file.read_text()):
                await conn.execute(statement)
            await conn.execute(queries.MIGRATION_DONE, file.stem)
        april, may = dt.datetime(2026, 4, 1, tzinfo=dt.UTC), dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
        await conn.execute(
            "INSERT INTO customers (customer_id, plan_id, subscription_status, period_start,"
            " period_end, provider, provider_customer_id) VALUES"
            " ('gone', 'basic', 'active', $1, $2, '', '')",
            april,
            may,
        )
        await conn.execute(
            "INSERT INTO usage_totals (customer_id, meter, period_start, period_end,"
            " event_count, quantity_sum, failed_count, failed_sum)"
            " VALUES ('gone', 'tokens', $1, $2, 1, 4, 1, 4)",
            april,
            may,
        )
        await conn.execute(
            "INSERT INTO usage_events (event_id, customer_id, idempotency_key, meter,"
            " quantity, event_time, payload_hash, report_state, last_error)"
            " VALUES ($1, 'gone', 'k', 'tokens', 4, $2, '', 'failed', 'stripe: no customer id')",
            uuid.uuid4(),
            april + dt.timedelta(days=2),
        )
    finally:
        await conn.close()
    assert (await migrate.migrate_dsn(plain_dsn))[:1] == ["0004_attribution"]  # and any later
    pool = await asyncpg.create_pool(plain_dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        store = backlog.Backlog(pool)
        await store.requeue("")
        await store.move_to_current_provider()
        stuck = await pool.fetch(
            "SELECT provider, report_state FROM usage_events"
            " WHERE provider = '' AND report_state IN ('pending', 'failed')"
        )
        assert [tuple(r) for r in stuck] == [], "no drain will ever take these"
    finally:
        await pool.close()


# --- hostile ids and properties ---


@pytest.mark.parametrize(
    "pid",
    [
        "urn:0b9e7c1a2d4f4e6a8c3b5f7a9d1e2c4b",  # uuid.UUID strips 'urn:'; Polar does not
        "----0b9e7c1a2d4f4e6a8c3b5f7a9d1e2c4b",  # uuid.UUID drops every '-'
        "0b9e7c1a-2d4f-4e6a-8c3b5f7a-9d1e2c4b",  # dashes in the wrong places
    ],
)
async def test_a_polar_customer_id_must_be_a_canonical_uuid(service: Service, pid: str) -> None:
    """UpsertCustomer must refuse a Polar provider_customer_id that is not a UUID in a form
    Polar parses (canonical 8-4-4-4-12 or 32 hex digits); `polar.is_customer_id` only asks
    Python's lenient uuid.UUID and the length."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.add_customer("c_pid", provider=POLAR, provider_customer_id=pid)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "customer.provider_customer_id" in details(caught.value).fields


async def test_property_lengths_count_utf16_code_units(service: Service) -> None:
    """Creem (a TypeScript service: 'values at most 500 characters', JavaScript string length,
    UTF-16 code units) would refuse a value of 300 emoji (600 code units). RecordUsage counts
    code points and accepts it, so a Creem customer's event is parked at send time instead of
    refused at record time."""
    value = "\U0001f600" * 300
    assert len(value) <= 500 < len(value.encode("utf-16-le")) // 2
    await service.add_customer("c_emoji", provider=CREEM, provider_customer_id="creem_1")
    req = record("c_emoji", "tokens", 1, "k-emoji", dt.datetime.now(dt.UTC), note=value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.RecordUsage(req)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_properties_at_every_limit_reach_every_keeping_provider(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    """49 properties, keys of 40 characters (non-ASCII), values of 500 BMP
    characters, accepted at record time, reach Polar, Dodo and Creem whole."""
    now = dt.datetime.now(dt.UTC)
    props = {f"{i:02d}" + "é" * 38: chr(0x4E00 + i) * 500 for i in range(49)}
    customers = {
        "c_p": (POLAR, POLAR_CUSTOMER),
        "c_d": (customer_pb2.PROVIDER_DODO_PAYMENTS, "dodo_1"),
        "c_c": (CREEM, "creem_1"),
    }
    for cid, (provider, pid) in customers.items():
        await service.add_customer(cid, provider=provider, provider_customer_id=pid)
        await service.usage.RecordUsage(
            usage_pb2.RecordUsageRequest(
                customer_id=cid,
                meter="tokens",
                quantity=3,
                idempotency_key="k-limits",
                properties=props,
                event_time=_ts(now - dt.timedelta(seconds=10)),
            )
        )
    await drain_until_quiet([await make_drain()], service.db)
    for fake, bag in ((fakes.polar, "metadata"), (fakes.dodo_payments, "metadata")):
        (sent,) = fake.accepted.values()
        assert {k: v for k, v in sent[bag].items() if k != "value"} == props
    (sent,) = fakes.creem.accepted.values()
    assert {k: v for k, v in sent["properties"].items() if k != "value"} == props
    assert fakes.violations() == []


def _ts(when: dt.datetime):  # type: ignore[no-untyped-def]
    from google.protobuf import timestamp_pb2

    t = timestamp_pb2.Timestamp()
    t.FromDatetime(when)
    return t
