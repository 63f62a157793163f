"""Operational reads and chores on the database: drain backlog, pool use, pruning."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections import defaultdict
from collections.abc import Callable

import asyncpg

from usage_service.storage import ops_queries, partitions
from usage_service.storage import partitions_queries as pq

DEFAULT_PRUNE_BATCH = 1000  # events deleted per transaction
DROP_TRIES = 5  # attempts at a month's drop lock before leaving the month to the next prune


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
    month of the cutoff). Idempotency keys stay in usage_keys for ever either way."""
    now = now or dt.datetime.now(dt.UTC)
    cutoff = now - older_than
    async with pool.acquire() as conn:
        await partitions.ensure(conn, now)
        old = [m for m in await partitions.months(conn) if partitions.bounds(m)[1] <= cutoff]
    dropped: list[dt.date] = []
    events = 0
    for month in old:
        gone = await _drop_month(pool, month)
        if gone is not None:
            dropped.append(month)
            events += gone
    events += await prune_reported(pool, older_than, batch, progress, now)
    return Pruned(events, tuple(dropped))


async def _drop_month(pool: asyncpg.Pool, month: dt.date) -> int | None:
    """Drops a month partition whose events are all settled and all in their customers'
    closed periods, counting them as pruned in the lifetime totals in the same transaction;
    returns how many events went, None when the month stays.

    Nothing inserts into a past month (recorded_at is the inserting transaction's now()), and
    nothing but prune deletes events or changes their customer, meter or quantity, so the
    counts read before the drop's lock still hold under it; a settled event never becomes
    unsettled, but the drop checks again under its lock all the same."""
    async with pool.acquire() as conn:
        if await conn.fetchval(partitions.sql(pq.UNSETTLED, month)):
            return None
        counts = await conn.fetch(partitions.sql(pq.MONTH_COUNTS, month))
        latest: dict[str, dt.datetime] = {}
        for r in counts:
            c = r["customer_id"]
            latest[c] = max(latest.get(c, r["last_event_time"]), r["last_event_time"])
        customers = sorted(latest)
        open_ = await conn.fetch(pq.OPEN_CUSTOMERS, customers, [latest[c] for c in customers])
        if open_:
            return None
        # Each customer's periods before its last confirmed one are closed for good, as a row
        # deletion would: no webhook may move them back over these events from now on.
        for c in customers:
            if await conn.fetchval(pq.CLOSE_BEFORE, c, latest[c]) is None:
                return None
        by_customer: dict[str, list[asyncpg.Record]] = defaultdict(list)
        for r in counts:
            by_customer[r["customer_id"]].append(r)
        lifetime = [
            (
                c,
                [r["meter"] for r in by_customer[c]],
                [r["events"] for r in by_customer[c]],
                [r["quantity"] for r in by_customer[c]],
            )
            for c in customers
        ]
        for attempt in range(DROP_TRIES):
            try:
                async with conn.transaction():
                    await conn.execute(pq.DROP_LOCK_TIMEOUT)
                    await conn.execute(pq.LOCK_EVENTS)
                    if await conn.fetchval(partitions.sql(pq.UNSETTLED, month)):
                        return None
                    await conn.executemany(ops_queries.COUNT_PRUNED, lifetime)
                    await conn.execute(partitions.sql(pq.DROP_MONTH, month))
                return sum(int(r["events"]) for r in counts)
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
