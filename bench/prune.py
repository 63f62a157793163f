"""Prune time: `--events` settled events recorded months ago, pruned with the service's own prune.

Makes a scratch database on the server, migrates it with the `usage_service` this interpreter
imports (so the same file times any commit: put that commit's `service` folder first on
PYTHONPATH), stores `--customers` customers whose current period began yesterday and
`--events` reported events spread over `--months` months of recording ending two months ago,
then times one prune of events older than 30 days, in this process, as `usage-service prune
--older-than 30` runs it. Months of recording that have a partition of their own (from
migration 0010 on) are made before the events are stored, as the service makes them ahead.

    .venv/bin/python bench/prune.py --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import time
import urllib.parse
import uuid

import asyncpg

from usage_service.storage import connections, migrate, ops

STORE_CHUNK = 100_000  # events per INSERT while loading

# $1 first event number, $2 last, $3 customers, $4 first instant, $5 seconds per event
EVENTS = """
INSERT INTO usage_events (event_id, customer_id, idempotency_key, meter, quantity, event_time,
    payload_hash, recorded_at, provider, report_state, seq, reported_at)
SELECT gen_random_uuid(), 'c' || lpad((g % $3)::text, 6, '0'), 'k' || g, 'tokens', 1 + g % 7,
    w, '\\x00', w, 'stripe', 'reported', g, w
FROM generate_series($1::bigint, $2::bigint) AS g,
    LATERAL (SELECT $4::timestamptz + make_interval(secs => g * $5::float8) AS w) AS t"""

KEYS = """
INSERT INTO usage_keys (customer_id, idempotency_key, payload_hash, event_id)
SELECT customer_id, idempotency_key, payload_hash, event_id FROM usage_events"""

# $1 customers, $2 period start, $3 period end
CUSTOMERS = """
INSERT INTO customers (customer_id, plan_id, subscription_status, period_start, period_end,
    provider, billing_anchor)
SELECT 'c' || lpad(g::text, 6, '0'), 'basic', 'active', $2, $3, 'stripe', $2
FROM generate_series(0, $1 - 1) AS g"""

LIFETIME = """
INSERT INTO usage_lifetime (customer_id, meter, event_count, quantity_sum)
SELECT customer_id, meter, count(*), sum(quantity) FROM usage_events GROUP BY 1, 2"""


def with_database(dsn: str, name: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


def first_of_month(when: dt.datetime, back: int) -> dt.datetime:
    month = when.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    for _ in range(back):
        month = (month - dt.timedelta(days=1)).replace(day=1)
    return month


async def load(dsn: str, events: int, customers: int, months: int, now: dt.datetime) -> str:
    """Stores the customers and events; returns the schema's shape ('partitioned' or not)."""
    start = first_of_month(now, months + 1)
    end = first_of_month(now, 1)  # events end a month before the current one began
    conn = await asyncpg.connect(dsn)
    try:
        await migrate.migrate(conn)
        partitioned = importlib.util.find_spec("usage_service.storage.partitions") is not None
        if partitioned:
            from usage_service.storage import partitions

            for back in range(months + 1, 0, -1):
                await partitions.ensure(conn, first_of_month(now, back), ahead=0)
        await conn.execute(
            CUSTOMERS, customers, now - dt.timedelta(days=1), now + dt.timedelta(days=29)
        )
        step = (end - start).total_seconds() / (events + 1)
        for first in range(1, events + 1, STORE_CHUNK):
            last = min(first + STORE_CHUNK - 1, events)
            await conn.execute(EVENTS, first, last, customers, start, step)
        if partitioned:
            await conn.execute(KEYS)
        await conn.execute(LIFETIME)
        await conn.execute("VACUUM ANALYZE")
        return "partitioned by month" if partitioned else "one table"
    finally:
        await conn.close()


async def prune(dsn: str) -> tuple[int, str, float]:
    pool = await connections.create_pool(dsn, size=4)
    try:
        began = time.perf_counter()
        if hasattr(ops, "prune"):
            pruned = await ops.prune(pool, dt.timedelta(days=30))
            seconds = time.perf_counter() - began
            months = ", ".join(f"{m:%Y-%m}" for m in pruned.months) or "none"
            held = f" (longest hold of usage_events: {pruned.longest_lock * 1000:.0f} ms)"
            return pruned.events, months + held, seconds
        deleted = await ops.prune_reported(pool, dt.timedelta(days=30))
        return deleted, "none", time.perf_counter() - began
    finally:
        await pool.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--database-url", default="postgresql://postgres@127.0.0.1:5432/test", help="a server"
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=1_000)
    parser.add_argument("--months", type=int, default=3, help="months of recording")
    args = parser.parse_args()
    name = f"usage_bench_prune_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(args.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = with_database(args.database_url, name)
        now = dt.datetime.now(dt.UTC)
        began = time.perf_counter()
        shape = await load(dsn, args.events, args.customers, args.months, now)
        loaded = time.perf_counter() - began
        events, months, seconds = await prune(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            left = await conn.fetchval("SELECT count(*) FROM usage_events")
        finally:
            await conn.close()
        print(
            f"schema: {shape}; stored {args.events:,} events of {args.customers:,} customers "
            f"over {args.months} months in {loaded:.1f} s"
        )
        print(
            f"prune --older-than 30: {events:,} events in {seconds:.2f} s "
            f"({events / seconds:,.0f} events/s); months dropped whole: {months}; "
            f"events left: {left:,}"
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
