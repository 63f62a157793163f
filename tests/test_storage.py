"""Storage-level properties that the RPC tests cannot see: statement counts and migrations."""

from __future__ import annotations

import asyncio
import datetime as dt

import asyncpg
from helpers import logged_store

from usage_service import domain
from usage_service.storage import migrate, store


def _event(i: int, customer: str = "c") -> domain.UsageEvent:
    return domain.UsageEvent(
        event_id=store.new_event_id(),
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
        assert len(statements) == count_for_1000 <= 6
        assert await st.pool.fetchval("SELECT count(*) FROM usage_events") == 1005
    finally:
        await st.close()


async def test_replicas_migrating_at_once_apply_each_migration_once(
    server_dsn: str, dsn: str
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()
    results = await asyncio.gather(*(migrate.migrate_dsn(dsn) for _ in range(4)))
    applied = [version for r in results for version in r]
    files = sorted(p.stem for p in migrate.MIGRATIONS.glob("*.sql"))
    assert sorted(applied) == files
    assert await migrate.migrate_dsn(dsn) == []
