"""The drain's claims read their partial indexes, not the tables: with a table large enough that,
without the index, the planner scans it whole, EXPLAIN must show the intended index."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from conftest import CITUS

from usage_service.storage import drain_queries

# PostgreSQL's own plans; on Citus each statement runs on a worker (test_citus_drain_plans.py).
pytestmark = pytest.mark.skipif(CITUS, reason="plain PostgreSQL's plans")

CUSTOMERS = 400  # per provider: with each one's events few, no index but the claim's helps
PER_CUSTOMER = 10  # events, and reports

# Customers of each provider with their events and reports (20,000 of each); the first event of
# every tenth customer is pending and its first report open, the rest reported and delivered.
# Inserted in the test's transaction and rolled back.
_EACH = f"""
FROM unnest(ARRAY['stripe', 'lemon_squeezy', 'polar', 'dodo_payments', 'creem']) AS p,
    generate_series(1, {CUSTOMERS}) AS n, generate_series(1, {PER_CUSTOMER}) AS i"""
_CLAIMABLE = "i = 1 AND n % 10 = 0"
FILL = f"""
INSERT INTO customers (customer_id, plan_id, subscription_status, period_start, period_end,
    provider)
SELECT DISTINCT 'c_' || p || '_' || n, 'basic', 'active', now() - interval '1 day',
    now() + interval '29 days', p
{_EACH};
INSERT INTO customer_providers (customer_id, provider) SELECT customer_id, provider FROM customers;
INSERT INTO usage_events (event_id, customer_id, idempotency_key, meter, quantity, event_time,
    payload_hash, provider, report_state)
SELECT gen_random_uuid(), 'c_' || p || '_' || n, 'k' || i, 'tokens', 1,
    now() - make_interval(secs => n * {PER_CUSTOMER} + i), '\\x00', p,
    CASE WHEN {_CLAIMABLE} THEN 'pending' ELSE 'reported' END
{_EACH};
INSERT INTO reports (customer_id, report_id, provider, lane, state, events, next_attempt_at)
SELECT 'c_' || p || '_' || n, gen_random_uuid(), p,
    p || chr(31) || 'c_' || p || '_' || n || chr(31) || 'm' || i,
    CASE WHEN {_CLAIMABLE} THEN 'open' ELSE 'delivered' END, '[]',
    now() - make_interval(secs => n * {PER_CUSTOMER} + i)
{_EACH};
ANALYZE customers, customer_providers, usage_events, reports, usage_totals;
"""


@pytest.fixture
async def filled(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute(FILL)
        yield conn
    finally:
        await tx.rollback()
        await conn.close()


def scans(node: dict[str, Any], relation: str = "") -> Iterator[tuple[str, str, str]]:
    """(node type, relation, index) of every scan in an EXPLAIN (FORMAT JSON) plan; a bitmap
    index scan takes the relation of the heap scan above it."""
    relation = node.get("Relation Name", relation)
    if "Relation Name" in node or "Index Name" in node:
        yield node["Node Type"], relation, node.get("Index Name", "")
    for child in node.get("Plans", []):
        yield from scans(child, relation)


def indexes(used: set[tuple[str, str, str]], relation: str) -> set[str]:
    """The indexes a plan reads `relation` through; "" stands for a scan of the whole table."""
    found = {index for kind, rel, index in used if rel == relation and index}
    if any(kind == "Seq Scan" for kind, rel, _ in used if rel == relation):
        found.add("")
    return found


# Partitions and their indexes, with the table or index they belong to, and whether the
# partition holds no rows (as ANALYZE saw it).
PARTS = """
SELECT c.relname AS part, p.relname AS parent, c.relkind = 'r' AND c.reltuples <= 0 AS empty
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent"""


async def plan(conn: asyncpg.Connection, sql: str, *args: Any) -> set[tuple[str, str, str]]:
    """The scans of a plan, those of a partition (usage_events' months) named after its table
    and index; scans of empty partitions (months ahead, DEFAULT) are left out: whatever the
    planner reads them with costs nothing."""
    (explained,) = json.loads(await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args))
    parts = {r["part"]: r for r in await conn.fetch(PARTS)}
    out = set()
    for kind, rel, index in scans(explained["Plan"]):
        if rel in parts:
            if parts[rel]["empty"]:
                continue
            rel = parts[rel]["parent"]
        out.add((kind, rel, parts[index]["parent"] if index in parts else index))
    return out


async def without(conn: asyncpg.Connection, index: str, sql: str, *args: Any) -> set[str]:
    """The relations scanned whole when `index` is dropped (inside a savepoint)."""
    savepoint = conn.transaction()
    await savepoint.start()
    try:
        await conn.execute(f"DROP INDEX {index}")
        return {rel for kind, rel, _ in await plan(conn, sql, *args) if kind == "Seq Scan"}
    finally:
        await savepoint.rollback()


async def test_finding_due_events_reads_the_unclaimed_index(filled: asyncpg.Connection) -> None:
    sql, args = drain_queries.DUE_LANE_EVENTS, ("stripe", 100)
    used = await plan(filled, sql, *args)
    assert indexes(used, "usage_events") == {"usage_events_unclaimed"}
    # the lane check of each event reads the one open report of its lane, if any
    assert indexes(used, "reports") == {"reports_open_lane"}


async def test_claiming_a_customers_events_reads_its_unclaimed_index(
    filled: asyncpg.Connection,
) -> None:
    for sql, args, also in (
        (drain_queries.CLAIM_EVENTS, ("c_stripe_10", "stripe", 100), set()),
        (
            drain_queries.CLAIM_BATCHES,
            ("c_polar_10", "polar", 100, [str(uuid.uuid4())], 100, "worker", 30.0),
            {"usage_events_pkey"},  # setting report_id on each claimed event, by its key
        ),
    ):
        used = await plan(filled, sql, *args)
        assert indexes(used, "usage_events") == {"usage_events_unclaimed_by_customer"} | also
    used = await plan(filled, drain_queries.CLAIM_EVENTS, "c_stripe_10", "stripe", 100)
    assert indexes(used, "reports") == {"reports_open_lane"}


async def test_claiming_reports_reads_the_due_index(filled: asyncpg.Connection) -> None:
    sql, args = drain_queries.DUE_REPORTS, ("stripe", 100)
    used = await plan(filled, sql, *args)
    assert indexes(used, "reports") == {"reports_due"}
    assert "reports" in await without(filled, "reports_due", sql, *args)
    # then each one's row by its key
    used = await plan(
        filled,
        drain_queries.CLAIM_REPORT,
        "c_stripe_10",
        "00000000-0000-0000-0000-000000000000",
        "worker",
        30.0,
        dt.datetime.now(dt.UTC),
    )
    assert indexes(used, "reports") == {"reports_pkey"}
