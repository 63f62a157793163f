"""The alerter: follows every customer's change log and records each threshold crossing once.

It wakes on the log's NOTIFY (its own LISTEN on a pool connection, taken again when lost) for
the customers named, and every `interval` looks at every customer whose log is ahead of its
cursor, so a missed notification only delays an alert. Replicas share the work: a customer's
turn holds its cursor's row lock, and a worker that finds it held moves on. The holder looks
again once its turn has committed, so a change committed during its turn is never left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import Callable, Sequence

import asyncpg

from usage_service import metrics
from usage_service.alerts import crossings
from usage_service.domain.plans import Plans
from usage_service.storage import alerts, changes
from usage_service.storage import changes_queries as q

log = logging.getLogger(__name__)

READ_BATCH = 500  # changes read per customer turn
SCAN_BATCH = 500  # customers read per page of a full look
CONCURRENCY = 4  # customers followed at once per process
RELISTEN_DELAY = 1.0  # seconds between attempts to listen again


class Alerter:
    def __init__(
        self,
        pool: asyncpg.Pool,
        plans: Plans,
        interval: float,
        webhook_body: Callable[[alerts.Alert], str] | None = None,
        on_alert: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.plans = plans
        self.interval = interval
        self.webhook_body = webhook_body
        self.on_alert = on_alert
        self.watched = crossings.watched_plans(plans)
        self.listening = asyncio.Event()  # set while the LISTEN is in place
        self._pending: set[str] = set()
        self._scan_due = True
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        listener = asyncio.create_task(self._listen(), name="alerts-listen")
        last_scan = time.monotonic()
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                if time.monotonic() - last_scan >= self.interval:
                    self._scan_due = True
                scan, self._scan_due = self._scan_due, False
                pending, self._pending = self._pending, set()
                try:
                    if scan:
                        last_scan = time.monotonic()
                        await self.catch_up()
                    else:
                        await self._follow_all(sorted(pending))
                except Exception:
                    log.exception("following change logs failed", extra={"action": "alerts"})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def catch_up(self) -> int:
        """Follows every customer whose log is ahead of its cursor; returns the alerts raised."""
        raised, after = 0, ""
        while True:
            due = await alerts.due_customers(self.pool, after, SCAN_BATCH)
            raised += await self._follow_all(due)
            if len(due) < SCAN_BATCH or self._stopping.is_set():
                return raised
            after = due[-1]

    async def _follow_all(self, customer_ids: Sequence[str]) -> int:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(customer_id: str) -> int:
            async with gate:
                return await self.follow(customer_id)

        return sum(await asyncio.gather(*(one(c) for c in customer_ids)))

    async def follow(self, customer_id: str) -> int:
        """Checks the customer's changes up to its log's head; returns the alerts raised. A
        customer another worker holds is left to it."""
        raised = 0
        while True:
            now = dt.datetime.now(dt.UTC)
            turn = await alerts.advance(
                self.pool,
                customer_id,
                READ_BATCH,
                self.watched,
                self._judge(now),
                self.webhook_body,
                now,
            )
            if turn is None:
                return raised
            for a in turn.alerts:
                c = a.crossing
                log.info(
                    "%s: %s reached %s (%d of %d)",
                    customer_id,
                    c.feature,
                    c.threshold,
                    c.used,
                    c.amount,
                    extra={"action": "threshold", "alert_id": a.alert_id},
                )
            if turn.alerts:
                metrics.threshold_alerts(len(turn.alerts))
                self.on_alert()
                raised += len(turn.alerts)
            if not await alerts.is_due(self.pool, customer_id):
                return raised

    def _judge(self, now: dt.datetime) -> alerts.Evaluate:
        def judge(
            plan_id: str | None, logged: Sequence[changes.Logged], known: alerts.Known
        ) -> tuple[list[alerts.Crossing], str | None]:
            return crossings.crossings(self.plans, plan_id, logged, known, now)

        return judge

    async def _listen(self) -> None:
        while not self._stopping.is_set():
            try:
                async with self.pool.acquire() as conn:
                    lost = asyncio.Event()
                    conn.add_termination_listener(functools.partial(_set, lost))
                    await conn.add_listener(q.CHANNEL, self._notified)
                    try:
                        self.listening.set()
                        self._scan_due = True  # whatever was missed while away
                        self._wake.set()
                        await lost.wait()
                    finally:
                        self.listening.clear()
                        with contextlib.suppress(Exception):
                            await conn.remove_listener(q.CHANNEL, self._notified)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning(
                    "listening for changes failed; again soon",
                    exc_info=True,
                    extra={"action": "alerts"},
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), RELISTEN_DELAY)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        named = changes.notified(payload)
        if named is None:  # too many customers to name: look at every one
            self._scan_due = True
        else:
            self._pending.update(named)
        self._wake.set()


def _set(event: asyncio.Event, _conn: object) -> None:
    event.set()
