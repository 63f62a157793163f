"""Storage-level properties that the RPC tests cannot see: statement counts and migrations."""

from __future__ import annotations

import asyncio
import datetime as dt

import asyncpg
from helpers import logged_store

from usage_service import domain
from usage_service.domain import ids
from usage_service.storage import connections, history, migrate, queries


def _event(i: int, customer: str = "c") -> domain.UsageEvent:
    return domain.UsageEvent(
        event_id=ids.new_event_id(),
        customer_id=customer,
        meter="tokens",
        quantity=i,
        idempotency_key=f"k{i}",
        event_time=dt.datetime.now(dt.UTC),
        properties={},
        payload_hash=domain.payload_hash("tokens", i, None, {}),
    )


async def test_a_batch_is_written_by_a_fixed_number_of_statements(dsn: str) -> None:
    statements: list[str] = []

    st = await logged_store(dsn, statements, size=1)
    try:
        await st.record([_event(0, "warm-up")])  # type introspection happens once
        # A customer's first usage adds its placeholder row (two statements, once).
        await st.record([_event(5000, "c"), _event(5000, "d")])
        statements.clear()
        await st.record([_event(i) for i in range(1000)])
        count_for_1000 = len(statements)
        statements.clear()
        await st.record([_event(i, "d") for i in range(2)])
        assert len(statements) == count_for_1000 <= 8
        assert await st.pool.fetchval("SELECT count(*) FROM usage_events") == 1005
    finally:
        await st.close()


async def test_replicas_migrating_at_once_apply_each_migration_once(
    server_dsn: str, plain_dsn: str
) -> None:
    conn = await asyncpg.connect(plain_dsn)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()
    results = await asyncio.gather(*(migrate.migrate_dsn(plain_dsn) for _ in range(4)))
    applied = [version for r in results for version in r]
    files = sorted(p.stem for p in migrate.MIGRATIONS.glob("*.sql"))
    assert sorted(applied) == files
    assert await migrate.migrate_dsn(plain_dsn) == []


async def test_the_periods_migration_keeps_history_and_verify_repairs_the_rest(
    plain_dsn: str,
) -> None:
    """Data from before billing periods: the stored period and earlier ones seen in totals
    become confirmed periods; events the old model counted nowhere are listed by verify and
    counted by a repair."""
    conn = await asyncpg.connect(plain_dsn)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        await conn.execute(queries.MIGRATION_TABLE)
        for file in sorted(migrate.MIGRATIONS.glob("*.sql"))[:2]:
            for statement in migrate.statements(file.read_text()):
                await conn.execute(statement)
            await conn.execute(queries.MIGRATION_DONE, file.stem)
        t = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
        april, may = dt.datetime(2026, 4, 1, tzinfo=dt.UTC), dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
        await conn.execute(
            "INSERT INTO customers (customer_id, plan_id, subscription_status, period_start,"
            " period_end) VALUES ('c', 'basic', 'active', $1, $2)",
            april,
            may,
        )
        for i, (when, q) in enumerate([(t, 5), (april, 7), (may, 11)]):  # may: counted nowhere
            await conn.execute(
                "INSERT INTO usage_events (event_id, customer_id, idempotency_key, meter,"
                " quantity, event_time, payload_hash) VALUES ($1, 'c', $2, 'tokens', $3, $4, '')",
                ids.new_event_id(),
                f"k{i}",
                q,
                when,
            )
        for start, end, q in [(t, april, 5), (april, may, 7)]:
            await conn.execute(
                "INSERT INTO usage_totals (customer_id, meter, period_start, period_end,"
                " event_count, quantity_sum, quantity_max, last_quantity, last_event_time)"
                " VALUES ('c', 'tokens', $1, $2, 1, $3, $3, $3, $1)",
                start,
                end,
                q,
            )
    finally:
        await conn.close()
    applied = await migrate.migrate_dsn(plain_dsn)
    assert applied[:2] == ["0003_periods", "0004_attribution"]  # and any later
    pool = await connections.create_pool(plain_dsn, size=2)
    try:
        rows = await pool.fetch(
            "SELECT period_start, period_end FROM billing_periods ORDER BY period_start"
        )
        assert [tuple(r) for r in rows] == [(t, april), (april, may)]
        found = await history.verify(pool)
        assert [d.what for d in found] == ["1 events counted in no totals row"]
        assert await history.verify(pool, fix=True) == found
        assert await history.verify(pool) == []
        sums = await pool.fetch("SELECT period_start, quantity_sum FROM usage_totals ORDER BY 1")
        assert [tuple(r) for r in sums] == [(t, 5), (april, 7), (may, 11)]
    finally:
        await pool.close()
