"""Coalescing of concurrent requests into one database round trip (group commit, group read).

Callers `submit` an item and wait; a flush takes every item queued so far (up to `max_items`)
and runs them through one `run` call, which answers each item with a result or an exception
of its own. A flush starts as soon as an item arrives and none is running, so a lone caller
waits for nothing but its own statement; under load, items queue while the running flush works
and the next flush takes them all (a second flush runs beside it only for a heavy backlog).
For writes, `run` commits before it returns, so every caller is answered only after the commit
that holds its item.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
Key = TypeVar("Key", bound=Hashable)

DEFAULT_MAX_ITEMS = 2000  # weight units (rows) per flush
DEFAULT_MAX_FLUSHES = 2  # flushes running at once, each on its own connection
# A second flush starts beside a running one only for a backlog this heavy (weight units):
# small items wait for the running flush, so groups grow with the load and the per-statement
# cost is shared by more callers; big batches still keep two connections busy.
DEFAULT_PARALLEL_WEIGHT = 500


class Coalescer(Generic[Item, Result]):
    def __init__(
        self,
        run: Callable[[Sequence[Item]], Awaitable[Sequence[Result | BaseException]]],
        weight: Callable[[Item], int] = lambda _: 1,
        max_items: int = DEFAULT_MAX_ITEMS,
        max_flushes: int = DEFAULT_MAX_FLUSHES,
        parallel_weight: int = DEFAULT_PARALLEL_WEIGHT,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self._run = run
        self._on_idle = on_idle  # called when the last flush ends with nothing queued
        self._weight = weight
        self._max_items = max_items
        self._max_flushes = max_flushes
        self._parallel_weight = parallel_weight
        self._queue: collections.deque[tuple[Item, asyncio.Future[Result]]] = collections.deque()
        self._queued_weight = 0
        # running flushes, each with its callers' futures
        self._flushes: dict[asyncio.Task[None], list[asyncio.Future[Result]]] = {}

    async def submit(self, item: Item) -> Result:
        """Queues `item` and waits for its own answer (raised when it is an exception)."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._queued_weight += self._weight(item)
        self._start_flushes()
        try:
            return await future
        except asyncio.CancelledError:  # the caller went away: so may its flush, if all did
            for task, futures in self._flushes.items():
                if future in futures and all(f.done() for f in futures):
                    task.cancel()
            raise

    async def close(self) -> None:
        """Waits until every queued item has been flushed."""
        while self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    def _start_flushes(self) -> None:
        while self._queue and (
            not self._flushes
            or (
                len(self._flushes) < self._max_flushes
                and self._queued_weight >= self._parallel_weight
            )
        ):
            taken = self._take()
            task = asyncio.get_running_loop().create_task(self._flush(taken))
            self._flushes[task] = [f for _, f in taken]
            task.add_done_callback(self._flush_done)

    def _take(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        taken: list[tuple[Item, asyncio.Future[Result]]] = []
        total = 0
        while self._queue:
            item, future = self._queue[0]
            w = self._weight(item)
            if future.done():  # the caller went away before its turn: nothing to do for it
                self._queue.popleft()
                self._queued_weight -= w
                continue
            if taken and total + w > self._max_items:
                break
            self._queue.popleft()
            self._queued_weight -= w
            taken.append((item, future))
            total += w
        return taken

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        self._flushes.pop(task, None)
        self._start_flushes()
        if self._on_idle is not None and not self._flushes and not self._queue:
            self._on_idle()

    async def _flush(self, taken: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        if not taken:
            return
        try:
            results: Sequence[Result | BaseException] = await self._run([i for i, _ in taken])
        except asyncio.CancelledError:
            for _, future in taken:
                future.cancel()
            raise
        except Exception as exc:  # every caller of this flush gets the failure
            for _, future in taken:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(taken, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


class Keyed(Generic[Key, Item, Result]):
    """A coalescer per key, each flushing one group at a time: items of one key (say, one hot
    row) are run together, and items of different keys never wait for each other. A key's
    coalescer is dropped once it has nothing queued or running."""

    def __init__(
        self,
        run: Callable[[Sequence[Item]], Awaitable[Sequence[Result | BaseException]]],
        weight: Callable[[Item], int] = lambda _: 1,
        max_items: int = DEFAULT_MAX_ITEMS,
    ) -> None:
        self._run = run
        self._weight = weight
        self._max_items = max_items
        self._by_key: dict[Key, Coalescer[Item, Result]] = {}

    async def submit(self, key: Key, item: Item) -> Result:
        coalescer = self._by_key.get(key)
        if coalescer is None:

            def drop() -> None:
                if self._by_key.get(key) is coalescer:
                    del self._by_key[key]

            coalescer = Coalescer(
                self._run, self._weight, max_items=self._max_items, max_flushes=1, on_idle=drop
            )
            self._by_key[key] = coalescer
        return await coalescer.submit(item)

    async def close(self) -> None:
        """Waits until every key's queued items have been flushed."""
        for coalescer in list(self._by_key.values()):
            await coalescer.close()
