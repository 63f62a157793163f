"""Pruning forgets no idempotency key (usage_keys), and drops whole months of usage_events
(partitioned by month of recorded_at) when every event in them may go."""

from __future__ import annotations

import datetime as dt
import re
import uuid

import asyncpg
import grpc
import pytest
from conftest import Service, with_database
from helpers import RECOUNT_DRAIN_COUNTERS, details, record

from usage.v1 import customer_pb2, usage_pb2
from usage_service.storage import history, migrate, ops, partitions
from usage_service.storage import partitions_queries as pq

PARTITIONS = """
SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'usage_events'::regclass ORDER BY 1"""


def months_back(now: dt.datetime, n: int) -> dt.date:
    month = partitions.month_of(now)
    for _ in range(n):
        month = (month - dt.timedelta(days=1)).replace(day=1)
    return month


def inside(month: dt.date) -> dt.datetime:
    """An instant in the middle of a month."""
    return partitions.bounds(month)[0] + dt.timedelta(days=14, hours=3)


async def partition_names(db: asyncpg.Pool) -> set[str]:
    return {r[0] for r in await db.fetch(PARTITIONS)}


def consume(key: str, quantity: int = 3) -> usage_pb2.CheckEntitlementRequest:
    return usage_pb2.CheckEntitlementRequest(
        customer_id="cus_1", feature="tokens", quantity=quantity, consume=True, idempotency_key=key
    )


def batch(*requests: usage_pb2.RecordUsageRequest) -> usage_pb2.BatchRecordUsageRequest:
    return usage_pb2.BatchRecordUsageRequest(requests=list(requests))


async def retries(service: Service, old: dt.datetime) -> list[object]:
    """Every retry of the test's first calls, and each key with another payload: the answers
    (without the figures a consume's replay reads now) or the error's code and reason."""
    out: list[object] = []
    calls = [
        service.usage.RecordUsage(record(key="one", quantity=2, when=old)),
        service.usage.RecordUsage(record(key="one", quantity=5, when=old)),
        service.usage.BatchRecordUsage(
            batch(record(key="b0", quantity=1, when=old), record(key="b1", quantity=4, when=old))
        ),
        service.usage.BatchRecordUsage(
            batch(record(key="b0", quantity=1, when=old), record(key="b1", quantity=9, when=old))
        ),
        service.usage.CheckEntitlement(consume("con")),
        service.usage.CheckEntitlement(consume("con", quantity=4)),
    ]
    for call in calls:
        try:
            answer = await call
        except grpc.aio.AioRpcError as exc:
            d = details(exc)
            out.append((d.code, d.reason))
            continue
        if isinstance(answer, usage_pb2.CheckEntitlementResponse):
            out.append((answer.allowed, answer.event_id))
        elif isinstance(answer, usage_pb2.BatchRecordUsageResponse):
            out.append([(r.event_id, r.duplicate) for r in answer.responses])
        else:
            out.append((answer.event_id, answer.duplicate))
    return out


async def test_a_retry_after_its_event_was_pruned_is_answered_as_before(service: Service) -> None:
    now = dt.datetime.now(dt.UTC)
    await service.add_customer("cus_1", start=now - dt.timedelta(days=1))
    old = now - dt.timedelta(days=60)
    one = await service.usage.RecordUsage(record(key="one", quantity=2, when=old))
    both = await service.usage.BatchRecordUsage(
        batch(record(key="b0", quantity=1, when=old), record(key="b1", quantity=4, when=old))
    )
    consumed = await service.usage.CheckEntitlement(consume("con"))
    assert consumed.allowed and consumed.event_id
    # The period moves on past the consume: every event is in a closed period now. They were
    # recorded three months ago, and are unbilled (the customer has no provider): settled.
    await service.add_customer(
        "cus_1", start=now + dt.timedelta(minutes=1), end=now + dt.timedelta(days=30)
    )
    month = months_back(now, 3)
    await service.db.execute("UPDATE usage_events SET recorded_at = $1", inside(month))
    before = await retries(service, old)
    assert before == [
        (one.event_id, True),
        (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"),
        [(r.event_id, True) for r in both.responses],
        (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"),
        (True, consumed.event_id),
        (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"),
    ]
    summary = usage_pb2.GetUsageSummaryRequest(customer_id="cus_1")
    summary_before = await service.usage.GetUsageSummary(summary)

    pruned = await ops.prune(service.db, dt.timedelta(days=30))

    assert (pruned.events, pruned.months) == (4, (month,))
    assert partitions.name(month) not in await partition_names(service.db)
    assert await service.count_events() == 0
    assert await retries(service, old) == before
    assert await service.count_events() == 0  # no retry stored anything
    assert await service.usage.GetUsageSummary(summary) == summary_before
    assert await history.verify(service.db) == []  # as `usage-service verify` finds it
    keys = await service.db.fetch("SELECT idempotency_key, event_id::text FROM usage_keys")
    assert dict(keys) == {
        "one": one.event_id,
        "b0": both.responses[0].event_id,
        "b1": both.responses[1].event_id,
        "con": consumed.event_id,
    }
    lifetime = await service.db.fetchrow("SELECT * FROM usage_lifetime WHERE meter = 'tokens'")
    assert (lifetime["event_count"], lifetime["pruned_count"]) == (4, 4)
    assert (lifetime["quantity_sum"], lifetime["pruned_sum"]) == (10, 10)
    # The pruned periods are closed: no webhook may move their boundaries.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.add_customer("cus_1", start=old, end=now + dt.timedelta(days=30))
    assert details(caught.value).reason == "PERIODS_PRUNED"


async def test_a_month_holding_an_event_not_settled_stays(service: Service) -> None:
    now = dt.datetime.now(dt.UTC)
    await service.add_customer("cus_1", provider=customer_pb2.PROVIDER_STRIPE)
    await service.add_customer("cus_2")  # no provider: its events are unbilled, settled
    old = now - dt.timedelta(days=60)
    for i in range(3):
        await service.usage.RecordUsage(record("cus_1", key=f"s{i}", quantity=1, when=old))
        await service.usage.RecordUsage(record("cus_2", key=f"u{i}", quantity=1, when=old))
    await service.usage.RecordUsage(record("cus_1", key="waits", quantity=7, when=old))
    month, other = months_back(now, 2), months_back(now, 4)
    await service.db.execute(
        "UPDATE usage_events SET recorded_at = $1, report_state = CASE "
        "WHEN idempotency_key = 'waits' THEN report_state ELSE 'reported' END "
        "WHERE customer_id = 'cus_1'",
        inside(month),
    )
    await service.db.execute(
        "UPDATE usage_events SET recorded_at = $1 WHERE customer_id = 'cus_2'", inside(other)
    )
    await service.db.execute(RECOUNT_DRAIN_COUNTERS)

    pruned = await ops.prune(service.db, dt.timedelta(days=30))

    # cus_2's month goes whole; cus_1's stays for its pending event, its settled ones deleted.
    assert pruned.months == (other,)
    assert pruned.events == 6
    names = await partition_names(service.db)
    assert partitions.name(month) in names and partitions.name(other) not in names
    left = await service.db.fetch("SELECT idempotency_key, report_state FROM usage_events")
    assert [tuple(r) for r in left] == [("waits", "pending")]
    assert await service.db.fetchval("SELECT count(*) FROM usage_keys") == 7
    # Once it is reported, the next prune takes the month.
    await service.db.execute("UPDATE usage_events SET report_state = 'reported'")
    await service.db.execute(RECOUNT_DRAIN_COUNTERS)
    again = await ops.prune(service.db, dt.timedelta(days=30))
    assert (again.events, again.months) == (1, (month,))
    assert await history.verify(service.db) == []


async def test_a_month_with_events_of_an_open_period_stays(service: Service) -> None:
    now = dt.datetime.now(dt.UTC)
    # A yearly customer: its current period began months ago, and holds the events.
    await service.add_customer(
        "cus_1", start=now - dt.timedelta(days=100), end=now + dt.timedelta(days=265)
    )
    for i in range(3):
        await service.usage.RecordUsage(
            record(key=f"k{i}", quantity=1, when=now - dt.timedelta(days=70))
        )
    month = months_back(now, 2)
    await service.db.execute("UPDATE usage_events SET recorded_at = $1", inside(month))

    pruned = await ops.prune(service.db, dt.timedelta(days=30))

    assert (pruned.events, pruned.months) == (0, ())
    assert partitions.name(month) in await partition_names(service.db)
    assert await service.count_events() == 3
    pruned_before = await service.db.fetchval("SELECT pruned_before FROM customers")
    assert pruned_before is None


def _table(name: str) -> str:
    """The table a row is in: on Citus, rows are read from shards, named as their table with the
    shard's id after it."""
    return re.sub(r"_[0-9]{6,}$", "", name)


async def test_events_land_in_the_partition_of_their_month(service: Service) -> None:
    now = dt.datetime.now(dt.UTC)
    await service.add_customer("cus_1", start=now - dt.timedelta(days=1))
    # Whatever their event_time, events are recorded now: the current month's partition.
    for i in range(14):
        when = now - dt.timedelta(days=31 * i)
        await service.usage.RecordUsage(record(key=f"k{i}", quantity=1, when=when))
    where = await service.db.fetch("SELECT DISTINCT tableoid::regclass::text FROM usage_events")
    assert [_table(r[0]) for r in where] == [partitions.name(partitions.month_of(now))]
    # Months made ahead: the current one and the next two.
    ahead = [partitions.month_of(now)]
    for _ in range(2):
        ahead.append(partitions.next_month(ahead[-1]))
    assert {partitions.name(m) for m in ahead} <= await partition_names(service.db)
    # Rows of months without a partition wait in the DEFAULT one, and move to their month's
    # own partition when it is made.
    for i in range(14):
        recorded = inside(months_back(now, i + 1)) + dt.timedelta(days=i % 14)
        await service.db.execute(
            "UPDATE usage_events SET recorded_at = $1 WHERE idempotency_key = $2",
            recorded,
            f"k{i}",
        )
    assert await service.db.fetchval("SELECT count(*) FROM usage_events_default") == 14
    async with service.db.acquire() as conn:
        made = await partitions.ensure(conn, now)
    assert made == sorted(months_back(now, i + 1) for i in range(14))
    assert await service.db.fetchval("SELECT count(*) FROM usage_events_default") == 0
    rows = await service.db.fetch(
        "SELECT tableoid::regclass::text AS part, recorded_at FROM usage_events"
    )
    assert len(rows) == 14
    for r in rows:
        assert _table(r["part"]) == partitions.name(partitions.month_of(r["recorded_at"]))
    # Nothing to make the second time.
    async with service.db.acquire() as conn:
        assert await partitions.ensure(conn, now) == []


async def test_the_migration_keeps_every_event_and_its_key(server_dsn: str) -> None:
    name = f"usage_keys_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(with_database(server_dsn, name))
        try:
            files = sorted(migrate.MIGRATIONS.glob("*.sql"))
            before = [f for f in files if f.stem < "0010"]
            await conn.execute(migrate.queries.MIGRATION_TABLE)
            for file in before:
                for statement in migrate.statements(file.read_text(encoding="utf-8")):
                    await conn.execute(statement)
                await conn.execute(migrate.queries.MIGRATION_DONE, file.stem)
            now = dt.datetime.now(dt.UTC)
            recorded = [inside(months_back(now, i)) for i in range(3)]
            ids = [uuid.uuid4() for _ in recorded]
            pairs = list(zip(ids, recorded, strict=True))
            await conn.executemany(
                "INSERT INTO usage_events (event_id, customer_id, idempotency_key, meter,"
                " quantity, event_time, payload_hash, recorded_at, provider, report_state)"
                " VALUES ($1, 'c1', $2, 'tokens', 1, $3, $4, $3, '', 'unbilled')",
                [(e, f"k{i}", r, bytes([i])) for i, (e, r) in enumerate(pairs)],
            )
            assert await migrate.migrate(conn) == [f.stem for f in files if f.stem >= "0010"]
            keys = await conn.fetch(
                "SELECT idempotency_key, event_id, payload_hash FROM usage_keys ORDER BY 1"
            )
            assert [tuple(r) for r in keys] == [(f"k{i}", e, bytes([i])) for i, e in enumerate(ids)]
            rows = await conn.fetch(
                "SELECT event_id, tableoid::regclass::text AS part FROM usage_events"
            )
            assert {r["event_id"]: r["part"] for r in rows} == {
                e: partitions.name(partitions.month_of(r)) for e, r in pairs
            }
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_a_drop_not_yet_folded_counts_as_pruned(service: Service) -> None:
    """A prune stopped between a month's drop and folding its counts into the lifetime totals:
    verify finds nothing, and the next fold (every prune's) completes it."""
    now = dt.datetime.now(dt.UTC)
    await service.add_customer("cus_1")
    old = now - dt.timedelta(days=60)
    for i in range(3):
        await service.usage.RecordUsage(record(key=f"k{i}", quantity=i + 1, when=old))
    month = months_back(now, 3)
    await service.db.execute("UPDATE usage_events SET recorded_at = $1", inside(month))
    async with service.db.acquire() as conn:
        await partitions.ensure(conn, now)
        rows = await conn.fetch(partitions.sql(pq.MONTH_COUNTS, month))
    await service.db.execute("UPDATE customers SET pruned_before = period_start")

    gone = await ops._drop_month(service.db, month, rows)

    assert gone is not None and gone[0] == 3
    assert await service.count_events() == 0
    assert await service.db.fetchval("SELECT count(*) FROM usage_pruned") == 1
    life = await service.db.fetchrow("SELECT * FROM usage_lifetime")
    assert (life["pruned_count"], life["pruned_sum"]) == (0, 0)
    assert await history.verify(service.db) == []
    await ops.fold_pruned(service.db)
    assert await service.db.fetchval("SELECT count(*) FROM usage_pruned") == 0
    life = await service.db.fetchrow("SELECT * FROM usage_lifetime")
    assert (life["pruned_count"], life["pruned_sum"]) == (3, 6)
    assert await history.verify(service.db) == []


async def test_a_month_detached_but_not_dropped_goes_at_the_next_prune(service: Service) -> None:
    now = dt.datetime.now(dt.UTC)
    month = months_back(now, 5)
    async with service.db.acquire() as conn:
        await partitions.ensure(conn, partitions.bounds(month)[0], ahead=0)
    assert partitions.name(month) in await partition_names(service.db)
    await service.db.execute(partitions.sql(pq.DETACH_MONTH, month))
    table = "SELECT count(*) FROM pg_class WHERE relname = $1"
    assert await service.db.fetchval(table, partitions.name(month)) == 1

    await ops.prune(service.db, dt.timedelta(days=30))

    assert await service.db.fetchval(table, partitions.name(month)) == 0
