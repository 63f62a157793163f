"""The read model: what checks read, kept in memory per customer and forgotten when the
customer's change log grows, so most checks need no database round trip.

Freshness guarantee (the README's "Checks from memory" says the same):
- A write acknowledged by this process is seen by every check this process starts after the
  acknowledgement: the store forgets the customer after the commit, before it answers.
- A write acknowledged by any other process at time t is seen by every check this process
  starts after t + `max_lag` (USAGE_READ_MODEL_MAX_LAG_SECONDS); typically after the few
  milliseconds its NOTIFY takes to arrive. Memory is used only while a fence proves it: every
  `max_lag / 4` this process NOTIFYs its own channel and waits for that notification on the
  listening connection. PostgreSQL delivers notifications in commit order, so when the fence
  sent at s arrives, every notification of a commit before s has been applied, and memory is
  trusted until s + max_lag. A fence late for any reason (the connection dropped or went
  silent, the database is slow) makes every check read the database until one arrives; a
  connection that drops forgets everything.
- Writes made outside the service (psql) notify nobody: they are seen once the entry is
  MAX_AGE old, or at once after `NOTIFY usage_changes, '*'`.

A read that raced with a forget never installs what it read: each forget advances a tick, a
read remembers the tick it started at, and installs only when no forget of its customer (or of
everything) came after that.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Generic, TypeVar

import asyncpg
from pydantic import Field

from usage_service import settings
from usage_service.storage import changes
from usage_service.storage import changes_queries as q
from usage_service.storage.rows import Conn

log = logging.getLogger(__name__)
DEFAULT_MAX_ENTRIES = 100_000  # (customer, feature) reads kept; the least recently used go
DEFAULT_MAX_LAG = 1.0  # seconds: another process's write is seen by checks at most this late
MAX_AGE = 60.0  # seconds an entry is trusted at all (writes made outside the service)
FENCES_PER_LAG = 4  # fences sent per max_lag
DEAD_AFTER = 10.0  # seconds a sent fence may stay unheard before the connection is dropped

V = TypeVar("V")


class ReadModelSettings(settings.Group):
    enabled: settings.Flag = Field(True, validation_alias="USAGE_READ_MODEL")
    max_entries: settings.Count = Field(
        DEFAULT_MAX_ENTRIES, validation_alias="USAGE_READ_MODEL_ENTRIES"
    )
    max_lag: settings.Seconds = Field(
        DEFAULT_MAX_LAG, validation_alias="USAGE_READ_MODEL_MAX_LAG_SECONDS"
    )


@dataclasses.dataclass
class _Fence:
    token: str
    sent: float  # monotonic time the NOTIFY was sent
    heard: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class ReadModel(Generic[V]):
    """Values read from the database per (customer, key), trusted while `fresh()`. The hub's
    listening connection feeds it (`listening`, `notified`, `lost`); the store reads through
    it (`get`, `read`) and tells it what it wrote (`forget`)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_lag: float = DEFAULT_MAX_LAG,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.max_entries = max_entries
        self.max_lag = max_lag
        self.clock = clock
        self.channel = f"usage_fence_{os.getpid()}_{id(self):x}"
        # (customer, key) -> (monotonic time read, value), least recently used first
        self._entries: collections.OrderedDict[tuple[str, Hashable], tuple[float, V]] = (
            collections.OrderedDict()
        )
        self._keys: dict[str, set[Hashable]] = {}  # customer -> its keys in _entries
        self._tick = 0  # advanced by every forget
        self._everything = 0  # the tick of the last forget of everything
        self._forgotten: dict[str, int] = {}  # customer with reads under way -> its last forget
        self._reading: collections.Counter[str] = collections.Counter()
        self._trusted_until = 0.0  # monotonic; memory is used before this only
        self._fence: _Fence | None = None
        self._fences = 0  # fences sent: each has its own token
        self._fencing: asyncio.Task[None] | None = None
        self._conn: Conn | None = None

    @classmethod
    def configured(cls, pool: asyncpg.Pool, config: ReadModelSettings) -> ReadModel[V] | None:
        if not config.enabled:
            return None
        return cls(pool, config.max_entries, config.max_lag)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def trusted_until(self) -> float:
        """The monotonic time memory is trusted until (a fence sent at s gives s + max_lag)."""
        return self._trusted_until

    def fresh(self) -> bool:
        """Whether memory may answer now (a recent fence was heard)."""
        return self.clock() < self._trusted_until

    def get(self, customer_id: str, key: Hashable) -> V | None:
        """The value kept for the customer's key; None when there is none (or it is old)."""
        found = self._entries.get((customer_id, key))
        if found is None:
            return None
        if self.clock() - found[0] > MAX_AGE:
            self._drop(customer_id, key)
            return None
        self._entries.move_to_end((customer_id, key))
        return found[1]

    async def read(self, customer_id: str, key: Hashable, fetch: Callable[[], Awaitable[V]]) -> V:
        """`fetch()`'s value, kept unless the customer (or everything) was forgotten while it
        was being read."""
        started = self._tick
        self._reading[customer_id] += 1
        try:
            value = await fetch()
        finally:
            self._reading[customer_id] -= 1
            forgotten = self._forgotten.get(customer_id, 0)
            if not self._reading[customer_id]:
                del self._reading[customer_id]
                self._forgotten.pop(customer_id, None)
        if forgotten <= started and self._everything <= started:
            self._put(customer_id, key, value)
        return value

    def forget(self, customer_ids: Iterable[str] | None) -> None:
        """Drops what is kept of these customers (None: of everyone); reads under way will not
        keep what they read."""
        self._tick += 1
        if customer_ids is None:
            self._everything = self._tick
            self._entries.clear()
            self._keys.clear()
            return
        for customer_id in customer_ids:
            for key in self._keys.pop(customer_id, ()):
                del self._entries[(customer_id, key)]
            if customer_id in self._reading:
                self._forgotten[customer_id] = self._tick

    def _put(self, customer_id: str, key: Hashable, value: V) -> None:
        self._entries[(customer_id, key)] = (self.clock(), value)
        self._entries.move_to_end((customer_id, key))
        self._keys.setdefault(customer_id, set()).add(key)
        while len(self._entries) > self.max_entries:
            (old_customer, old_key), _ = self._entries.popitem(last=False)
            self._unindex(old_customer, old_key)

    def _drop(self, customer_id: str, key: Hashable) -> None:
        del self._entries[(customer_id, key)]
        self._unindex(customer_id, key)

    def _unindex(self, customer_id: str, key: Hashable) -> None:
        keys = self._keys[customer_id]
        keys.discard(key)
        if not keys:
            del self._keys[customer_id]

    # --- fed by the hub's listening connection ---

    async def listening(self, conn: Conn) -> None:
        """The change log is listened to on `conn` from now on: what was kept before may have
        missed changes and is dropped; memory is used again once a fence is heard on it."""
        self.forget(None)
        self._conn = conn
        await conn.add_listener(self.channel, self._heard)
        self._fencing = asyncio.create_task(self._fence_loop(conn), name="read-model-fences")

    def notified(self, payload: object) -> None:
        """A NOTIFY of the change log: its customers (or everyone) changed."""
        self.forget(changes.notified(payload))

    async def lost(self, conn: Conn) -> None:
        """The listening connection is gone (or being closed): nothing kept can be trusted."""
        self._trusted_until = 0.0
        self.forget(None)
        self._conn = None
        self._fence = None
        task, self._fencing = self._fencing, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await conn.remove_listener(self.channel, self._heard)

    def _heard(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        fence = self._fence  # None after the connection was lost: a late fence counts for nothing
        if fence is not None and payload == fence.token:
            self._trusted_until = max(self._trusted_until, fence.sent + self.max_lag)
            fence.heard.set()

    async def _fence_loop(self, conn: Conn) -> None:
        """Fences `conn` while it is the listening connection (a cancel ends it sooner)."""
        every = self.max_lag / FENCES_PER_LAG
        while self._conn is conn:
            self._fences += 1
            fence = self._fence = _Fence(str(self._fences), self.clock())
            try:
                await self.pool.execute(q.FENCE, self.channel, fence.token)
            except Exception as exc:  # the database is away: the hub notices; try again
                log.warning("read model fence not sent: %r", exc, extra={"action": "read-model"})
                await asyncio.sleep(every)
                continue
            try:
                async with asyncio.timeout(max(DEAD_AFTER, self.max_lag)):
                    await fence.heard.wait()
            except TimeoutError:
                log.warning(
                    "read model fence unheard: listening again", extra={"action": "read-model"}
                )
                if self._conn is not None:
                    self._conn.terminate()  # the hub's termination listener listens again
                return
            await asyncio.sleep(max(0.0, fence.sent + every - self.clock()))
