"""Watchers of customers' change logs: one LISTEN connection per process wakes them.

A NOTIFY only says that a customer's log grew; what a watcher receives is always read from the
log itself, every change after the last one it was given, in version order. So a notification
that arrives early, late, twice or never (the listening connection dropped: every watched
customer is read again when it is back) can neither reorder nor lose a change. Each watcher has
a bounded queue: one whose queue is full is left behind (the log holds its changes, not memory)
and catches up when it has room again, so it never slows the others.

The same connection feeds the read model (storage/readmodel.py), the hub's `follower`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import logging
from collections.abc import Iterator
from typing import Protocol

import asyncpg

from usage_service import domain
from usage_service.domain import periods
from usage_service.domain.credits import Grant
from usage_service.storage import changes, credits, queries, rows
from usage_service.storage import changes_queries as q

log = logging.getLogger(__name__)
QUEUE = 256  # changes a watcher may have waiting; more wait in the log until it has room
READ_BATCH = 200  # changes read from the log per query
RELISTEN_DELAY = 1.0  # seconds between attempts to listen again after the connection dropped
RETRY_DELAY = 1.0  # seconds before a failed read of a customer's log is tried again


class Follower(Protocol):
    """Told what the hub's listening connection hears, and when it starts and stops."""

    async def listening(self, conn: rows.Conn) -> None: ...

    def notified(self, payload: object) -> None: ...

    async def lost(self, conn: rows.Conn) -> None: ...


@dataclasses.dataclass(eq=False)
class Watcher:
    """One stream's view of a customer's log. `after`: the last version given to it (None until
    the stream has read its starting point)."""

    customer_id: str
    after: int | None = None
    queue: asyncio.Queue[changes.Logged] = dataclasses.field(
        default_factory=lambda: asyncio.Queue(QUEUE)
    )
    behind: bool = False  # its queue filled up: more changes wait in the log

    def taken(self, hub: Hub) -> None:
        """Call after taking from the queue: an emptied queue of a watcher left behind is
        filled again from the log."""
        if self.behind and self.queue.empty():
            self.behind = False
            hub.wake(self.customer_id)


class Hub:
    def __init__(self, pool: asyncpg.Pool, follower: Follower | None = None) -> None:
        self.pool = pool
        self.follower = follower
        self._watchers: dict[str, set[Watcher]] = {}
        self._reading: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._listener: asyncio.Task[None] | None = None
        self.closing = asyncio.Event()  # set when the server stops: streams end

    @property
    def watchers(self) -> int:
        return sum(len(ws) for ws in self._watchers.values())

    def start(self) -> None:
        """Listens for changes from now on, in the background: a database that is away is
        retried, and whatever committed meanwhile is read when the LISTEN is in place."""
        self._listener = asyncio.create_task(self._listen(), name="watch-listen")

    def close(self) -> None:
        """Ends every stream (they answer UNAVAILABLE, and their callers resume elsewhere)."""
        self.closing.set()

    async def stop(self) -> None:
        tasks = [t for t in (self._listener, *self._reading.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    @contextlib.contextmanager
    def watching(self, customer_id: str) -> Iterator[Watcher]:
        """A watcher of the customer's log, registered for as long as the block runs. Set its
        `after`, then `wake` it: every change after that version reaches its queue."""
        w = Watcher(customer_id)
        self._watchers.setdefault(customer_id, set()).add(w)
        try:
            yield w
        finally:
            ws = self._watchers.get(customer_id)
            if ws is not None:
                ws.discard(w)
                if not ws:
                    del self._watchers[customer_id]

    def wake(self, customer_id: str) -> None:
        """Reads the customer's log for its watchers (now, or again after the read under way)."""
        if customer_id not in self._watchers:
            return
        if customer_id in self._reading:
            self._again.add(customer_id)
            return
        self._reading[customer_id] = asyncio.create_task(self._read(customer_id), name="watch-read")

    async def _read(self, customer_id: str) -> None:
        try:
            while customer_id in self._watchers:
                self._again.discard(customer_id)
                try:
                    await self._deliver(customer_id)
                except Exception:  # the database is away or slow: read again soon
                    log.warning("reading %s's changes failed", customer_id, exc_info=True)
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                if customer_id not in self._again:
                    return
        finally:
            del self._reading[customer_id]

    async def _deliver(self, customer_id: str) -> None:
        while True:
            ready = [
                w
                for w in self._watchers.get(customer_id, ())
                if w.after is not None and not w.behind
            ]
            if not ready:
                return
            after = min(w.after for w in ready if w.after is not None)
            rows = await changes.since(self.pool, customer_id, after, READ_BATCH)
            for w in ready:
                for logged in rows:
                    if w.after is None or logged.version <= w.after:
                        continue
                    if w.queue.full():
                        w.behind = True
                        break
                    w.queue.put_nowait(logged)
                    w.after = logged.version
            if len(rows) < READ_BATCH:
                return

    async def _listen(self) -> None:
        while True:
            try:
                async with self.pool.acquire() as conn:
                    lost = asyncio.Event()
                    conn.add_termination_listener(functools.partial(_set, lost))
                    await conn.add_listener(q.CHANNEL, self._notified)
                    try:
                        if self.follower is not None:
                            await self.follower.listening(conn)
                        for customer_id in list(self._watchers):  # missed while away
                            self.wake(customer_id)
                        await lost.wait()
                    finally:
                        if self.follower is not None:
                            await self.follower.lost(conn)
                        with contextlib.suppress(Exception):
                            await conn.remove_listener(q.CHANNEL, self._notified)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("listening for changes failed (%r); again soon", exc)
            await asyncio.sleep(RELISTEN_DELAY)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if self.follower is not None:
            self.follower.notified(payload)
        named = changes.notified(payload)
        for customer_id in list(self._watchers) if named is None else named:
            self.wake(customer_id)


def _set(event: asyncio.Event, _conn: object) -> None:
    event.set()


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A customer's state at one version: read in one repeatable-read transaction."""

    version: int
    customer: domain.Customer
    period: periods.Period
    figures: dict[str, domain.Totals]
    grants: list[Grant] = dataclasses.field(default_factory=list)  # usage may still burn


async def snapshot(pool: asyncpg.Pool, customer_id: str, now: dt.datetime) -> Snapshot | None:
    """The customer, its period containing `now` and that period's totals, with the version of
    the log they stand at; None for an unknown customer."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        version = await changes.head(conn, customer_id)
        row = await conn.fetchrow(queries.GET_CUSTOMER, customer_id)
        customer = rows.customer_from_row(row) if row else None
        if customer is None:
            return None
        period = customer.period_after_confirmed(now)
        if period is None:
            stored = await rows.stored_periods(conn, [customer_id])
            period = periods.period_at(stored[customer_id], now)
        totals = await conn.fetch(queries.PERIOD_TOTALS, customer_id, period.start)
        grants = await credits.live(conn, customer_id, min(now, period.start))
    return Snapshot(
        version, customer, period, {r["meter"]: rows.totals_from_row(r) for r in totals}, grants
    )


async def grants(pool: asyncpg.Pool, customer_id: str, since: dt.datetime) -> list[Grant]:
    """The customer's grants usage may still burn, or that expired at or after `since`."""
    return await credits.live(pool, customer_id, since)


async def resumable(pool: asyncpg.Pool, customer_id: str, after: int) -> bool:
    """Whether every change after `after` is still in the log (or there is none yet)."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        head = await changes.head(conn, customer_id)
        oldest = await changes.oldest(conn, customer_id)
    if after > head:
        return False  # a version this log never gave (another database, or a restore)
    return after == head or (oldest is not None and oldest <= after + 1)


async def roll_over(
    pool: asyncpg.Pool, customer_id: str, period: periods.Period, now: dt.datetime
) -> None:
    """Logs that `period` began, unless a change in it already did (any replica may call this
    when it sees the boundary pass; one of them logs it)."""
    async with pool.acquire() as conn, conn.transaction():
        totals = await conn.fetch(queries.PERIOD_TOTALS, customer_id, period.start)
        figures = {r["meter"]: rows.totals_from_row(r) for r in totals}
        await changes.rollover(conn, customer_id, period.start, period.end, figures, now)
