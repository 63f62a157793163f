"""What the threshold alert tests share: plans with thresholds, an alerter on its own pool, and
waiting for a condition with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import asyncpg

from usage_service.alerts import webhooks
from usage_service.alerts.alerter import Alerter
from usage_service.domain.plans import Plans
from usage_service.settings import plans_file
from usage_service.storage import changes, connections

T = TypeVar("T")

ALERT_PLANS = """
[meters.tokens]
aggregation = "sum"
[meters.calls]
aggregation = "count"

[plans.basic.features.tokens]
included = 100
limit = 1000
thresholds = ["80% of limit", "100% of limit"]
[plans.basic.features.calls]
included = 10
limit = 20
enforcement = "soft"
thresholds = ["100% of included"]

[plans.quiet.features.tokens]
included = 100
limit = 1000
"""
DEADLINE = 20.0  # seconds a condition may take to come true


def alert_plans() -> Plans:
    return plans_file.parse(tomllib.loads(ALERT_PLANS), "alerts.toml")


async def eventually(check: Callable[[], Awaitable[T]], deadline: float = DEADLINE) -> T:
    """The first true value of `check()`, asked again until the deadline passes."""
    give_up = time.monotonic() + deadline
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"still {value!r} after {deadline}s")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def pool(dsn: str, size: int = 4) -> AsyncIterator[asyncpg.Pool]:
    """A pool as the service makes them (jsonb as Python values)."""
    p = await connections.create_pool(dsn, size)
    try:
        yield p
    finally:
        await p.close()


def alerter(p: asyncpg.Pool, plans: Plans, interval: float = 60.0) -> Alerter:
    """An alerter that queues webhooks; its look at every customer is a minute apart, so what
    it does sooner it does on a notification (or when a test calls catch_up)."""
    return Alerter(p, plans, interval, webhook_body=webhooks.body)


@contextlib.asynccontextmanager
async def running(a: Alerter) -> AsyncIterator[Alerter]:
    """The alerter's loop while the block runs, listening before the block starts."""
    task = asyncio.create_task(a.run())
    try:
        await eventually(lambda: _true(a.listening.is_set()))
        yield a
    finally:
        a.stop()
        await task


async def _true(value: bool) -> bool:
    return value


async def threshold_changes(db: asyncpg.Pool, customer_id: str) -> list[changes.Logged]:
    logged = await changes.since(db, customer_id, 0, 100_000)
    return [c for c in logged if c.change.kind == "threshold"]


async def count(db: asyncpg.Pool, table: str) -> int:
    return int(await db.fetchval(f"SELECT count(*) FROM {table}"))
