"""The drain's backlog as operators see and move it: parked events put back in the queue, events
moved to their customer's current provider, and the status per provider."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

import asyncpg

from usage_service.storage import drain_queries as q
from usage_service.storage import drain_store


@dataclasses.dataclass(frozen=True)
class Moved:
    """What `requeue --move-to-current-provider` did."""

    events: int  # re-attributed to their customer's current provider
    by_route: tuple[tuple[str, str, int], ...]  # (from, to, events); to '' means unbilled
    from_open_reports: int  # of them, in open reports: the old provider may hold them
    left_in_open_reports: int  # not moved: in open reports (not asked for, or being sent)


@dataclasses.dataclass(frozen=True)
class ProviderStatus:
    provider: str  # '' for customers without a provider, '?' for unknown customers
    pending: int
    oldest_pending_age: dt.timedelta | None
    failed: int
    moved: int  # pending or parked events whose customer is billed by another provider now
    failed_reasons: tuple[tuple[str, int], ...]  # (reason, events), most frequent first
    retrying_reports: int
    retrying_error: str


class Backlog:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def requeue(self, provider: str = "", event_ids: Sequence[str] = ()) -> int:
        """Puts parked events back to pending (those billed to no provider: unbilled); returns
        how many. A lock-free read finds their customers; each customer's are moved in a
        transaction of their own, in customer order."""
        ids = list(event_ids)
        customers = [
            r["customer_id"] for r in await self.pool.fetch(q.PARKED_CUSTOMERS, provider, ids)
        ]
        total = 0
        for customer_id in customers:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(q.LOCK_CUSTOMER, customer_id)
                moved = await conn.fetch(q.REQUEUE, provider, ids, customer_id)
                unbilled = [r for r in moved if r["report_state"] == "unbilled"]
                billed = [r for r in moved if r["report_state"] != "unbilled"]
                changed = await drain_store.adjust(conn, billed, reported=0, failed=-1)
                changed += await drain_store.adjust(
                    conn, unbilled, reported=0, failed=-1, unbilled=1
                )
                await drain_store.log_drained(conn, changed)
            total += len(moved)
        return total

    async def move_to_current_provider(
        self, provider: str = "", customer_ids: Sequence[str] = (), open_reports: bool = False
    ) -> Moved:
        """Re-attributes events that a customer's earlier provider never accepted (waiting, or
        parked) to the customer's current provider: an operator's decision after a switch.
        Events in open reports were handed to that provider, which may hold them: they move only
        with `open_reports` (their reports are abandoned), and never while a worker holds the
        report or its retry is not due (a send's outcome may still land). A lock-free read finds
        the customers; each one's events move in a transaction of their own, in customer
        order."""
        customers = [
            r["customer_id"]
            for r in await self.pool.fetch(q.MOVABLE_CUSTOMERS, provider, list(customer_ids))
        ]
        moved: list[asyncpg.Record] = []
        abandoned: set[tuple[str, object]] = set()
        left = 0
        for customer_id in customers:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(q.LOCK_CUSTOMER, customer_id)
                reports = (
                    await conn.fetch(q.LOCK_MOVABLE_REPORTS, provider, customer_id)
                    if open_reports
                    else []
                )
                mine = [r["report_id"] for r in reports]
                rows = await conn.fetch(q.MOVE_EVENTS, provider, customer_id, mine)
                if mine:
                    await conn.execute(q.RELEASE_EVENTS, customer_id, mine)
                    await conn.execute(
                        q.ABANDON_REPORTS,
                        customer_id,
                        mine,
                        "abandoned: its events moved to another provider",
                    )
                changed = []
                for was in ("pending", "failed"):
                    for now in ("pending", "unbilled"):
                        part = [r for r in rows if r["was"] == was and r["report_state"] == now]
                        changed += await drain_store.adjust(
                            conn,
                            part,
                            reported=0,
                            failed=-1 if was == "failed" else 0,
                            unbilled=1 if now == "unbilled" else 0,
                        )
                left += int(
                    await conn.fetchval(q.COUNT_IN_OPEN_REPORTS, provider, customer_id) or 0
                )
                await drain_store.log_drained(conn, changed)
            moved += rows
            abandoned.update((customer_id, r) for r in mine)
        routes: dict[tuple[str, str], int] = {}
        for r in moved:
            key = (r["was_provider"], r["target"])
            routes[key] = routes.get(key, 0) + 1
        return Moved(
            events=len(moved),
            by_route=tuple((a, b, n) for (a, b), n in sorted(routes.items())),
            from_open_reports=sum(
                1 for r in moved if (r["customer_id"], r["was_report"]) in abandoned
            ),
            left_in_open_reports=left,
        )

    async def status(self) -> list[ProviderStatus]:
        async with self.pool.acquire() as conn:
            counts = await conn.fetch(q.STATUS_EVENTS)
            reasons = await conn.fetch(q.STATUS_REASONS)
            retrying = {r["provider"]: r for r in await conn.fetch(q.STATUS_RETRYING)}
        by_provider: dict[str, list[tuple[str, int]]] = {}
        for r in reasons:
            by_provider.setdefault(r["provider"], []).append((r["last_error"], r["events"]))
        out = []
        for row in counts:
            name = row["provider"]
            oldest = row["oldest_pending"]
            retry = retrying.get(name)
            out.append(
                ProviderStatus(
                    provider=name,
                    pending=row["pending"],
                    oldest_pending_age=row["now"] - oldest if oldest else None,
                    failed=row["failed"],
                    moved=row["moved"],
                    failed_reasons=tuple(by_provider.get(name, ())),
                    retrying_reports=retry["reports"] if retry else 0,
                    retrying_error=retry["last_error"] if retry else "",
                )
            )
        return out
