"""Fills a usage-service database with events already stored, as months of history leave them,
so the benchmark can measure the hot paths with a large table behind them.

`preload` adds events to customers that exist (`bench/run.py` makes them through
UpsertCustomer): inside PostgreSQL, set-based (generate_series), in chunks of one statement and
one commit each; the events are spread evenly over the `months` before `now`, oldest first (the
order they would have arrived in), round-robin over the customers. Each carries what RecordUsage
would have stored for it: a key of its own, the payload fingerprint of a call that gave its
event_time (domain.payload_hash, computed in SQL: the test compares the two), the customer's
provider (none: unbilled), a place in the acceptance order. Then every customer's period and
lifetime totals are rebuilt from its events by the service's own repair
(storage.history.repair), so `usage-service verify` finds nothing, and the tables are vacuumed
and analysed, as autovacuum would have done with that history.

Everything that knows the event tables' layout is the SQL below, `insert_events` and
`make_months`: on the schema with the keys in usage_events, and on the one with them in
usage_keys and the events partitioned by month (each event recorded when it happened).

    .venv/bin/python bench/preload.py --database-url postgresql://postgres@127.0.0.1:5432/db \\
        --events 1000000 --customers 1000
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
import time
from collections.abc import Callable, Sequence

import asyncpg

from usage_service.storage import history

CHUNK = 250_000  # events per INSERT statement (one commit each)
MONTHS = 12  # months of history the events are spread over
KEY_PREFIX = "preload-"  # idempotency keys: KEY_PREFIX + the event's number
REPAIR_CONNECTIONS = 2  # customers whose totals are rebuilt at once

# Events $1..$2 (1-based numbers, over every preload of the database): event i is customer
# $3[i % len + 1]'s, meter $4, quantity 1 + (i / len) % 100, at $5 minus ($7 - (i - $8) - 0.5)
# / $7 of the span $6, in whole seconds (so the fingerprint's stamp has no fraction, as Python's
# isoformat gives none), recorded then; $7 the events of this preload, $8 its first number,
# $9 the key prefix.
_NUMBERED = """
WITH n AS (
    SELECT i, ($3::text[])[i % cardinality($3::text[]) + 1] AS c,
        1 + (i / cardinality($3::text[])) % 100 AS q,
        date_trunc('second', $5::timestamptz
            - $6::interval * (($7::bigint - (i - $8::bigint) - 0.5) / $7::bigint)) AS t
    FROM generate_series($1::bigint, $2::bigint) AS i
)"""
_EVENT_ROWS = """
INSERT INTO usage_events (
    event_id, customer_id, idempotency_key, meter, quantity, event_time, properties,
    payload_hash, seq, provider, report_state, recorded_at)
SELECT gen_random_uuid(), n.c, $9 || n.i, $4, n.q, n.t, '{}'::jsonb,
    sha256(convert_to('[' || to_json($4::text)::text || ',' || n.q || ',"'
        || to_char(n.t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS') || '+00:00",[]]', 'UTF8')),
    nextval('usage_events_seq') * 1048576, cu.provider,
    CASE WHEN cu.provider = '' THEN 'unbilled' ELSE 'pending' END, n.t
FROM n JOIN customers cu ON cu.customer_id = n.c
ORDER BY n.i"""
# Events keep their own keys (usage_events unique on customer_id, idempotency_key).
EVENTS_SQL = _NUMBERED + _EVENT_ROWS
# Keys kept apart, for ever (usage_keys), from events partitioned by month of recorded_at.
EVENTS_AND_KEYS_SQL = f"""{_NUMBERED}, ins AS ({_EVENT_ROWS}
    RETURNING customer_id, idempotency_key, payload_hash, event_id
)
INSERT INTO usage_keys (customer_id, idempotency_key, payload_hash, event_id)
SELECT customer_id, idempotency_key, payload_hash, event_id FROM ins"""

KEYS_APART = "SELECT to_regclass('usage_keys') IS NOT NULL"
STORED = "SELECT count(*) FROM usage_events WHERE idempotency_key LIKE $1 || '%'"
STORED_KEYS = "SELECT count(*) FROM usage_keys WHERE idempotency_key LIKE $1 || '%'"
VACUUM = ("VACUUM (ANALYZE) usage_events", "VACUUM (ANALYZE) usage_totals")


async def insert_events(
    conn: asyncpg.Connection,
    keys_apart: bool,
    first: int,
    last: int,
    customers: Sequence[str],
    meter: str,
    now: dt.datetime,
    span: dt.timedelta,
    count: int,
    start: int,
) -> None:
    """Events number `first`..`last` of a preload of `count` events starting at number
    `start`, in one statement (with their keys in usage_keys when `keys_apart`)."""
    await conn.execute(
        EVENTS_AND_KEYS_SQL if keys_apart else EVENTS_SQL,
        *(first, last, list(customers), meter, now, span, count, start, KEY_PREFIX),
    )


async def make_months(conn: asyncpg.Connection, now: dt.datetime, months: int) -> None:
    """When usage_events is partitioned by month: the partitions of every month the preload
    writes to, made before it writes (storage/partitions.py)."""
    try:
        from usage_service.storage import partitions  # type: ignore[attr-defined]
    except ImportError:
        return
    await partitions.ensure(conn, now - dt.timedelta(days=31 * (months + 1)), months + 3)


async def preload(
    dsn: str,
    count: int,
    customers: Sequence[str],
    now: dt.datetime,
    meter: str = "tokens",
    months: int = MONTHS,
    chunk: int = CHUNK,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Adds `count` events (after those of earlier preloads of this database) and rebuilds the
    customers' totals. Returns seconds taken: insert, totals, vacuum, and in all."""
    say = progress or (lambda _: None)
    span = dt.timedelta(days=30.4375 * months)
    conn = await asyncpg.connect(dsn)
    try:
        keys_apart = bool(await conn.fetchval(KEYS_APART))
        start = int(await conn.fetchval(STORED_KEYS if keys_apart else STORED, KEY_PREFIX)) + 1
        t0 = time.monotonic()
        if keys_apart:
            await make_months(conn, now, months)
        for first in range(start, start + count, chunk):
            last = min(first + chunk, start + count) - 1
            await insert_events(
                conn, keys_apart, first, last, customers, meter, now, span, count, start
            )
            say(f"preload: {last - start + 1:,}/{count:,} events inserted")
        t1 = time.monotonic()
    finally:
        await conn.close()
    await rebuild_totals(dsn, customers)
    t2 = time.monotonic()
    say(f"preload: totals of {len(customers):,} customers rebuilt")
    conn = await asyncpg.connect(dsn)
    try:
        for sql in VACUUM:
            await conn.execute(sql)
    finally:
        await conn.close()
    t3 = time.monotonic()
    return {"insert_s": t1 - t0, "totals_s": t2 - t1, "vacuum_s": t3 - t2, "total_s": t3 - t0}


async def rebuild_totals(dsn: str, customers: Sequence[str]) -> None:
    """Each customer's totals and lifetime totals rebuilt from its events, as `verify --fix`
    does, one transaction per customer, REPAIR_CONNECTIONS at once."""
    todo = list(customers)

    async def worker() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            while todo:
                customer_id = todo.pop()
                async with conn.transaction():
                    await history.repair(conn, customer_id)
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(REPAIR_CONNECTIONS)))


async def verify(dsn: str, customers: Sequence[str]) -> list[str]:
    """What `usage-service verify` finds for these customers (nothing when the preload is
    consistent)."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    assert pool is not None
    try:
        return [str(d) for d in await history.verify(pool, customers)]
    finally:
        await pool.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    p.add_argument("--events", type=int, required=True)
    p.add_argument("--customers", type=int, default=1000, help="bench-0 .. bench-(N-1), existing")
    p.add_argument("--months", type=int, default=MONTHS)
    args = p.parse_args()
    if not args.database_url:
        p.error("--database-url (or DATABASE_URL) is required")
    ids = [f"bench-{i}" for i in range(args.customers)]

    def say(text: str) -> None:
        print(text, file=sys.stderr)

    now = dt.datetime.now(dt.UTC)
    took = asyncio.run(
        preload(args.database_url, args.events, ids, now, months=args.months, progress=say)
    )
    print(
        f"preload: {args.events:,} events in {took['total_s']:.1f} s (insert "
        f"{took['insert_s']:.1f} s, totals {took['totals_s']:.1f} s, "
        f"vacuum {took['vacuum_s']:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
