"""Threshold alerts' storage: a cursor per customer over its change log, the alerts raised, and
the webhook outbox. Statements: alerts_queries.py.

A customer's turn (`advance`) is one transaction: lock its cursor (skipping a customer another
worker holds), read its changes after the cursor, record each new crossing (the unique key of
usage_alerts admits one per customer, feature, period and threshold), append its 'threshold'
change, queue its webhook and move the cursor. A crash at any point leaves all or none of it.
Locks: the cursor row, then the log head (appended last), so no lock cycle with the writers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Collection, Sequence

import asyncpg

from usage_service import domain
from usage_service.domain import ids
from usage_service.storage import alerts_queries as q
from usage_service.storage import changes
from usage_service.storage.rows import Conn

Known = set[tuple[str, dt.datetime, str]]  # (feature, period_start, threshold) already raised


@dataclasses.dataclass(frozen=True)
class Crossing:
    """A threshold reached by a change's figures."""

    feature: str
    threshold: str
    amount: int
    used: int
    period_start: dt.datetime
    period_end: dt.datetime
    totals: domain.Totals  # the feature's meter after the change


@dataclasses.dataclass(frozen=True)
class Alert:
    """A crossing as recorded, with the version of its 'threshold' change."""

    alert_id: str
    customer_id: str
    crossing: Crossing
    version: int
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Turn:
    checked: int  # changes read
    alerts: list[Alert]


# (the plan as of the cursor, or None; the changes after the cursor; the alerts already raised
# in their periods) -> (the crossings to record, in order; the plan as of the last change)
Evaluate = Callable[
    [str | None, Sequence[changes.Logged], Known], tuple[list[Crossing], str | None]
]


async def due_customers(pool: asyncpg.Pool, after: str, limit: int) -> list[str]:
    """Customers (after `after`, in order) whose logs have changes not yet checked."""
    return [r["customer_id"] for r in await pool.fetch(q.DUE_CUSTOMERS, after, limit)]


async def is_due(pool: asyncpg.Pool, customer_id: str) -> bool:
    return bool(await pool.fetchval(q.IS_DUE, customer_id))


async def advance(
    pool: asyncpg.Pool,
    customer_id: str,
    limit: int,
    watched_plans: Collection[str],
    evaluate: Evaluate,
    webhook_body: Callable[[Alert], str] | None,
    now: dt.datetime,
) -> Turn | None:
    """Checks up to `limit` of the customer's changes after its cursor, recording the crossings
    `evaluate` finds (and their webhooks, given `webhook_body`). A customer whose plan is not in
    `watched_plans`, as of the cursor and now, has nothing to check: its cursor moves to its
    head. None: another worker holds the customer."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(q.ADD_CURSOR, customer_id)
        locked = await conn.fetchrow(q.LOCK_CURSOR, customer_id)
        if locked is None:
            return None
        cursor = locked["version"]
        row = await conn.fetchrow(q.HEAD_AND_PLAN, customer_id)
        head, plan_now = (row["version"], row["plan_id"]) if row else (0, None)
        if head <= cursor:
            return Turn(0, [])
        plan = locked["plan_id"]
        if plan is not None and plan not in watched_plans and plan_now not in watched_plans:
            await conn.execute(q.MOVE_CURSOR, customer_id, head, plan_now)
            return Turn(0, [])
        # up to the head read with the plan, so the last plan is the one those changes led to
        read = await changes.since(conn, customer_id, cursor, limit)
        logged = [c for c in read if c.version <= head]
        if not logged:  # forgotten changes
            await conn.execute(q.MOVE_CURSOR, customer_id, head, plan_now)
            return Turn(0, [])
        starts = sorted({c.change.period_start for c in logged if c.change.period_start})
        known = {
            (r["feature"], r["period_start"], r["threshold"])
            for r in await conn.fetch(q.KNOWN_ALERTS, customer_id, starts)
        }
        found, plan = evaluate(plan_now if plan is None else plan, logged, known)
        made: list[Alert] = []
        for crossing in found:
            alert = await _raise(conn, customer_id, crossing, now)
            if alert is None:
                continue
            made.append(alert)
            if webhook_body is not None:
                body = webhook_body(alert)
                await conn.execute(q.ADD_WEBHOOK, customer_id, alert.alert_id, body, now)
        checked = logged[-1].version
        # The log's own threshold changes follow the last one checked unless a writer got in
        # between; then they are read (and passed over) next time.
        if made and made[0].version == checked + 1:
            checked = made[-1].version
        await conn.execute(q.MOVE_CURSOR, customer_id, checked, plan)
    return Turn(len(logged), made)


async def _raise(conn: Conn, customer_id: str, c: Crossing, now: dt.datetime) -> Alert | None:
    """Records the crossing and appends its 'threshold' change; None when it was raised before."""
    alert_id = ids.new_event_id()
    added = await conn.fetchval(
        q.ADD_ALERT,
        customer_id,
        c.feature,
        c.period_start,
        c.threshold,
        alert_id,
        c.period_end,
        c.amount,
        c.used,
        now,
    )
    if added is None:
        return None
    detail = {
        "alert_id": alert_id,
        "feature": c.feature,
        "threshold": c.threshold,
        "amount": c.amount,
        "used": c.used,
    }
    change = changes.Change(
        customer_id, "threshold", c.period_start, c.period_end, {c.feature: c.totals}, detail
    )
    version = (await changes.append(conn, [change], now))[customer_id]
    return Alert(alert_id, customer_id, c, version, now)


# --- the webhook outbox ---


@dataclasses.dataclass(frozen=True)
class Webhook:
    customer_id: str
    alert_id: str
    body: str
    attempts: int  # this one included


@dataclasses.dataclass(frozen=True)
class Backlog:
    waiting: int
    oldest: dt.datetime | None  # the oldest waiting webhook's creation
    next_due: dt.datetime | None  # when the next one may be sent


async def due_webhooks(pool: asyncpg.Pool, now: dt.datetime, limit: int) -> list[tuple[str, str]]:
    """(customer_id, alert_id) of webhooks due and not leased."""
    rows = await pool.fetch(q.DUE_WEBHOOKS, now, limit)
    return [(r["customer_id"], str(r["alert_id"])) for r in rows]


async def claim_webhook(
    pool: asyncpg.Pool,
    customer_id: str,
    alert_id: str,
    owner: str,
    now: dt.datetime,
    lease: dt.timedelta,
) -> Webhook | None:
    """Leases a due webhook to `owner` until `now + lease`; None when another worker has it."""
    row = await pool.fetchrow(q.CLAIM_WEBHOOK, customer_id, alert_id, now, now + lease, owner)
    return None if row is None else Webhook(customer_id, alert_id, row["body"], row["attempts"])


async def webhook_delivered(pool: asyncpg.Pool, customer_id: str, alert_id: str) -> None:
    await pool.execute(q.WEBHOOK_DELIVERED, customer_id, alert_id)


async def webhook_retry(
    pool: asyncpg.Pool, w: Webhook, owner: str, at: dt.datetime, error: str
) -> bool:
    """Sends it again at `at`; False when the lease was no longer ours."""
    status = await pool.execute(q.WEBHOOK_RETRY, w.customer_id, w.alert_id, owner, at, error)
    return status.endswith(" 1")


async def webhook_backlog(pool: asyncpg.Pool) -> Backlog:
    row = await pool.fetchrow(q.WEBHOOK_BACKLOG)
    assert row is not None
    return Backlog(row["waiting"], row["oldest"], row["next_due"])


async def alerts_of(pool: asyncpg.Pool, customer_id: str) -> list[asyncpg.Record]:
    """The customer's alerts, oldest first (for operators and tests)."""
    return list(await pool.fetch(q.ALERTS, customer_id))


async def webhooks(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """Every waiting webhook (for operators and tests)."""
    return list(await pool.fetch(q.WEBHOOKS))
