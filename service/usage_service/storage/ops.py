"""Operational reads and chores on the database: drain backlog, pool use, pruning."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections import defaultdict
from collections.abc import Callable

import asyncpg

from usage_service.storage import ops_queries, partitions, queries
from usage_service.storage import partitions_queries as pq

DEFAULT_PRUNE_BATCH = 1000  # events deleted per transaction
DROP_TRIES = 5  # attempts at a month's drop lock before leaving the month to the next prune
CLOSE_CHUNK = 100  # customers a transaction, closing periods or folding counts


@dataclasses.dataclass(frozen=True)
class Backlog:
    provider: str
    events: int
    oldest_age_seconds: float


@dataclasses.dataclass(frozen=True)
class PoolUse:
    in_use: int
    idle: int
    max: int


async def drain_backlog(pool: asyncpg.Pool, seconds: float) -> list[Backlog]:
    rows = await pool.fetch(ops_queries.DRAIN_BACKLOG, timeout=seconds)
    return [Backlog(r["provider"], int(r["events"]), float(r["oldest_age_seconds"])) for r in rows]


def pool_use(pool: asyncpg.Pool) -> PoolUse:
    size, idle = pool.get_size(), pool.get_idle_size()
    return PoolUse(in_use=size - idle, idle=idle, max=pool.get_max_size())


@dataclasses.dataclass(frozen=True)
class Pruned:
    events: int  # events gone: dropped with their month, or deleted one by one
    months: tuple[dt.date, ...]  # months of recorded_at dropped whole
    longest_lock: float = 0.0  # seconds, of any drop's hold on usage_events


async def prune(
    pool: asyncpg.Pool,
    older_than: dt.timedelta,
    batch: int = DEFAULT_PRUNE_BATCH,
    progress: Callable[[int, int], None] | None = None,
    now: dt.datetime | None = None,
) -> Pruned:
    """Prunes settled events recorded more than `older_than` ago in their customers' closed
    periods: each month partition (of recorded_at) wholly before the cutoff whose events all
    qualify is dropped whole; then `prune_reported` deletes the qualifying events left (in
    months that still hold unsettled events or open periods, in the DEFAULT partition, in the
    month of the cutoff). Idempotency keys stay in usage_keys for ever either way.

    Nothing inserts into a past month (recorded_at is the inserting transaction's now()), and
    nothing but prune deletes events or changes their customer, meter, quantity or event_time,
    so a month's counts read first still hold when it is dropped; a settled event never
    becomes unsettled, but each drop checks again under its lock all the same."""
    now = now or dt.datetime.now(dt.UTC)
    cutoff = now - older_than
    counted: dict[dt.date, list[asyncpg.Record]] = {}
    async with pool.acquire() as conn:
        for r in await conn.fetch(pq.DETACHED):  # left by a prune stopped after a detach
            month = partitions.month_named(r["relname"])
            assert month is not None
            await conn.execute(partitions.sql(pq.DROP_MONTH, month))
        await partitions.ensure(conn, now)
        for month in await partitions.months(conn):
            if partitions.bounds(month)[1] > cutoff:
                continue
            if await conn.fetchval(partitions.sql(pq.UNSETTLED, month)):
                continue
            rows = await conn.fetch(partitions.sql(pq.MONTH_COUNTS, month))
            latest = _latest(rows)
            customers = sorted(latest)
            if not await conn.fetch(pq.OPEN_CUSTOMERS, customers, [latest[c] for c in customers]):
                counted[month] = rows
    latest = _latest([r for rows in counted.values() for r in rows])
    still_open = await _close_periods(pool, latest)
    dropped: list[dt.date] = []
    events = 0
    longest = 0.0
    for month, rows in counted.items():
        if any(r["customer_id"] in still_open for r in rows):
            continue
        gone = await _drop_month(pool, month, rows)
        if gone is not None:
            dropped.append(month)
            events += gone[0]
            longest = max(longest, gone[1])
    await fold_pruned(pool)
    events += await prune_reported(pool, older_than, batch, progress, now)
    return Pruned(events, tuple(dropped), longest)


async def fold_pruned(pool: asyncpg.Pool) -> None:
    """Folds the counts of dropped months (usage_pruned) into the lifetime totals' pruned
    counts, customer by customer in order, CLOSE_CHUNK to a transaction (those a dropping
    prune left unfolded too)."""
    customers = [r["customer_id"] for r in await pool.fetch(pq.UNFOLDED)]
    for first in range(0, len(customers), CLOSE_CHUNK):
        async with pool.acquire() as conn, conn.transaction():
            for c in customers[first : first + CLOSE_CHUNK]:
                await conn.execute(queries.FOLD_PRUNED, c)


def _latest(rows: list[asyncpg.Record]) -> dict[str, dt.datetime]:
    """The latest event_time of each customer in MONTH_COUNTS rows."""
    latest: dict[str, dt.datetime] = {}
    for r in rows:
        c, t = r["customer_id"], r["last_event_time"]
        latest[c] = max(latest.get(c, t), t)
    return latest


async def _close_periods(pool: asyncpg.Pool, latest: dict[str, dt.datetime]) -> set[str]:
    """Closes for good each customer's periods before its last confirmed one, as a row
    deletion does, when its events to drop (`latest`: the latest event_time of each customer's)
    are all before that period: no webhook may move those periods back over them from now on.
    Customers in order, CLOSE_CHUNK to a transaction; returns those whose periods are open."""
    still_open: set[str] = set()
    customers = sorted(latest)
    for first in range(0, len(customers), CLOSE_CHUNK):
        async with pool.acquire() as conn, conn.transaction():
            for c in customers[first : first + CLOSE_CHUNK]:
                if await conn.fetchval(pq.CLOSE_BEFORE, c, latest[c]) is None:
                    still_open.add(c)
    return still_open


async def _drop_month(
    pool: asyncpg.Pool, month: dt.date, rows: list[asyncpg.Record]
) -> tuple[int, float] | None:
    """Detaches a month partition, keeping its events' counts (`rows`: MONTH_COUNTS) in
    usage_pruned in the same transaction, to be folded into the lifetime totals, then drops
    the detached table; returns how many events went and how long usage_events was held, or
    None when the month stays (an unsettled event, or the lock not granted in DROP_TRIES
    tries)."""
    by_customer: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for r in rows:
        by_customer[r["customer_id"]].append(r)
    kept = [
        (
            c,
            month,
            [r["meter"] for r in mine],
            [r["events"] for r in mine],
            [r["quantity"] for r in mine],
        )
        for c, mine in sorted(by_customer.items())
    ]
    async with pool.acquire() as conn:
        for attempt in range(DROP_TRIES):
            try:
                async with conn.transaction():
                    await conn.execute(pq.DROP_LOCK_TIMEOUT)
                    # New rows of their own: written before the lock, they wait for no one.
                    await conn.executemany(pq.KEEP_PRUNED, kept)
                    await conn.execute(pq.LOCK_EVENTS)
                    held = time.perf_counter()
                    if await conn.fetchval(partitions.sql(pq.UNSETTLED, month)):
                        return None
                    await conn.execute(partitions.sql(pq.DETACH_MONTH, month))
                held = time.perf_counter() - held
                await conn.execute(partitions.sql(pq.DROP_MONTH, month))
                return sum(int(r["events"]) for r in rows), held
            except asyncpg.exceptions.LockNotAvailableError:
                await asyncio.sleep(0.1 * (attempt + 1))
    return None


async def prune_reported(
    pool: asyncpg.Pool,
    older_than: dt.timedelta,
    batch: int = DEFAULT_PRUNE_BATCH,
    progress: Callable[[int, int], None] | None = None,
    now: dt.datetime | None = None,
) -> int:
    """Deletes reported events recorded more than `older_than` ago that belong to a period
    before their customer's last confirmed one, customer by customer in order, `batch` per
    transaction; returns how many were deleted. Each transaction records what it deleted in the
    lifetime totals and closes the customer's periods before that horizon for good: their
    totals stay as they are, and no webhook may move their boundaries. `progress(done,
    total)` after each customer."""
    cutoff = (now or dt.datetime.now(dt.UTC)) - older_than
    deleted = 0
    customers = await pool.fetch(ops_queries.PRUNABLE_CUSTOMERS, cutoff)
    for done, row in enumerate(customers, 1):
        while True:
            count = await _prune_batch(pool, row["customer_id"], cutoff, batch)
            deleted += count
            if count < batch:
                break
        if progress is not None:
            progress(done, len(customers))
    return deleted


async def _prune_batch(
    pool: asyncpg.Pool, customer_id: str, cutoff: dt.datetime, batch: int
) -> int:
    async with pool.acquire() as conn, conn.transaction():
        horizon = await conn.fetchval(ops_queries.LOCK_CUSTOMER, customer_id)
        if horizon is None:
            return 0
        gone = await conn.fetch(ops_queries.PRUNE_REPORTED, customer_id, cutoff, horizon, batch)
        if not gone:
            return 0
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in gone:
            counts[r["meter"]][0] += 1
            counts[r["meter"]][1] += r["quantity"]
        meters = sorted(counts)
        await conn.execute(
            ops_queries.COUNT_PRUNED,
            customer_id,
            meters,
            [counts[m][0] for m in meters],
            [counts[m][1] for m in meters],
        )
        await conn.execute(ops_queries.MARK_PRUNED, customer_id, horizon)
    return len(gone)
