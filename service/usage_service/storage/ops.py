"""Operational reads and chores on the database: drain backlog, pool use, pruning."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict
from collections.abc import Callable

import asyncpg

from usage_service.storage import ops_queries

DEFAULT_PRUNE_BATCH = 1000  # events deleted per transaction


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


async def prune_reported(
    pool: asyncpg.Pool,
    older_than: dt.timedelta,
    batch: int = DEFAULT_PRUNE_BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Deletes reported events recorded more than `older_than` ago that belong to a period
    before their customer's last confirmed one, customer by customer in order, `batch` per
    transaction; returns how many were deleted. Each transaction records what it deleted in the
    lifetime totals and closes the customer's periods before that horizon for good: their
    totals stay as they are, and no webhook may move their boundaries. `progress(done,
    total)` after each customer."""
    cutoff = dt.datetime.now(dt.UTC) - older_than
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
