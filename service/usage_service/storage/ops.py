"""Operational reads and chores on the database: drain backlog, pool use, pruning."""

from __future__ import annotations

import dataclasses
import datetime as dt

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
    pool: asyncpg.Pool, older_than: dt.timedelta, batch: int = DEFAULT_PRUNE_BATCH
) -> int:
    """Deletes reported events older than `older_than`, `batch` per transaction, until none is
    left; returns how many were deleted. Totals live in usage_totals and are unchanged."""
    cutoff = dt.datetime.now(dt.UTC) - older_than
    deleted = 0
    while True:
        status = await pool.execute(ops_queries.PRUNE_REPORTED, cutoff, batch)
        count = int(status.split()[-1])
        deleted += count
        if count < batch:
            return deleted
