"""The drain's storage: claiming events into reports, leases, and settling what providers answer.

Its statements are in drain_queries.py. A report's events, value and id are committed before
the first send; settling moves events to reported / failed and adjusts the period totals' drain
counters in the same transaction. Locks are taken in the core's order: customers (shared,
sorted), then events, then totals rows (sorted), so the drain never deadlocks with recorders or
upserts.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import asyncpg

from usage_service import domain
from usage_service.domain import ids
from usage_service.domain.reports import Report, ReportEvent
from usage_service.storage import changes
from usage_service.storage import drain_queries as q
from usage_service.storage.rows import Conn


@dataclasses.dataclass(frozen=True)
class Claimed:
    """A pending event as claimed, with its period (None outside every known period) and, when
    asked for, the period's max and last value among the events billed to the same provider."""

    event: ReportEvent
    period_start: dt.datetime | None
    period_end: dt.datetime | None
    period_max: int | None = None
    period_last: int | None = None


@dataclasses.dataclass(frozen=True)
class NewReport:
    report_id: str
    lane: str | None
    events: tuple[ReportEvent, ...]
    value: int = 0
    stated_at: dt.datetime | None = None


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def event_to_json(e: ReportEvent) -> dict[str, Any]:
    return {
        "event_id": e.event_id,
        "customer_id": e.customer_id,
        "meter": e.meter,
        "quantity": e.quantity,
        "event_time": e.event_time.isoformat(),
        "properties": dict(e.properties),
        "provider_customer_id": e.provider_customer_id,
        "subscription_item": e.subscription_item,
    }


def event_from_json(raw: Mapping[str, Any]) -> ReportEvent:
    return ReportEvent(
        event_id=raw["event_id"],
        customer_id=raw["customer_id"],
        meter=raw["meter"],
        quantity=int(raw["quantity"]),
        event_time=dt.datetime.fromisoformat(raw["event_time"]),
        properties=dict(raw["properties"]),
        provider_customer_id=raw["provider_customer_id"],
        subscription_item=raw["subscription_item"],
    )


def claimed_from_row(row: asyncpg.Record) -> Claimed:
    event = ReportEvent(
        event_id=str(row["event_id"]),
        customer_id=row["customer_id"],
        meter=row["meter"],
        quantity=row["quantity"],
        event_time=row["event_time"],
        properties={str(k): str(v) for k, v in _json(row["properties"] or {}).items()},
        provider_customer_id=row["provider_customer_id"],
        subscription_item=row["subscription_item"],
    )
    return Claimed(event, row.get("period_start"), row.get("period_end"))


def report_from_row(row: asyncpg.Record) -> Report:
    return Report(
        report_id=str(row["report_id"]),
        provider=domain.Provider(row["provider"]),
        events=tuple(event_from_json(raw) for raw in _json(row["events"])),
        value=row["value"],
        checkpoint=dict(_json(row["checkpoint"])),
        attempts=row["attempts"],
        first_sent_at=row["first_sent_at"],
        stated_at=row["stated_at"],
    )


class DrainStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def claim_reports(
        self, provider: domain.Provider, owner: str, lease: float, limit: int
    ) -> list[Report]:
        """Takes a lease on due open reports (retries, and those of workers that died)."""
        rows = await self.pool.fetch(q.CLAIM_REPORTS, provider.value, owner, lease, limit)
        return [report_from_row(r) for r in rows]

    async def claim_new(
        self,
        provider: domain.Provider,
        owner: str,
        lease: float,
        limit: int,
        build: Callable[[list[Claimed]], list[NewReport]],
        figures: Collection[str] = (),
    ) -> list[Report]:
        """Claims pending events and commits the reports `build` makes of them, leased to
        `owner`; events of the meters in `figures` come with their period's figures. Events
        `build` leaves out, or whose lane another worker just took, stay pending."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(q.CLAIM_EVENTS, provider.value, limit)
            claimed = [claimed_from_row(r) for r in rows]
            if figures:
                claimed = await _with_figures(conn, provider, claimed, figures)
            new = build(claimed) if claimed else []
            if not new:
                return []
            inserted = await conn.fetch(
                q.INSERT_REPORTS,
                [r.report_id for r in new],
                provider.value,
                [r.lane for r in new],
                [json.dumps([event_to_json(e) for e in r.events]) for r in new],
                [r.value for r in new],
                owner,
                lease,
                [r.stated_at for r in new],
            )
            created = {str(r["report_id"]) for r in inserted}
            kept = [r for r in new if r.report_id in created]
            pairs = [(e.event_id, r.report_id) for r in kept for e in r.events]
            await conn.execute(q.ASSIGN_EVENTS, [p[0] for p in pairs], [p[1] for p in pairs])
        return [
            Report(r.report_id, provider, r.events, r.value, stated_at=r.stated_at) for r in kept
        ]

    async def claim_batches(
        self, provider: domain.Provider, owner: str, lease: float, limit: int, batch: int
    ) -> list[Report]:
        """Claims pending events into reports of `batch` events (a provider without lanes),
        committed and leased to `owner`, in one statement."""
        report_ids = [ids.new_report_id() for _ in range(-(-limit // batch))]
        rows = await self.pool.fetch(
            q.CLAIM_BATCHES, provider.value, limit, report_ids, batch, owner, lease
        )
        grouped: dict[str, list[ReportEvent]] = {}
        for row in rows:
            grouped.setdefault(str(row["report_id"]), []).append(claimed_from_row(row).event)
        return [Report(rid, provider, tuple(events)) for rid, events in grouped.items()]

    async def save_checkpoint(
        self, report_id: str, owner: str, state: Mapping[str, Any], lease: float
    ) -> bool:
        """Stores the state and holds the lease `lease` seconds from now. False when the lease is
        no longer ours: the caller must not send."""
        found = await self.pool.fetchval(
            q.SAVE_CHECKPOINT, report_id, owner, json.dumps(state), lease
        )
        return found is not None

    async def retry_later(self, report_id: str, owner: str, delay: float, reason: str) -> None:
        await self.pool.execute(q.RETRY_LATER, report_id, owner, delay, reason)

    async def delivered(self, report_id: str, rejected: Mapping[str, str] | None = None) -> bool:
        """The provider holds the report, except `rejected` events (parked with their reason).
        False when another worker settled it first."""
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(q.CLOSE_REPORT, report_id, "delivered", "") is None:
                return False
            await conn.execute(q.LOCK_REPORT_CUSTOMERS, [report_id])
            changed = []
            if rejected:
                ids = list(rejected)
                parked = await conn.fetch(q.PARK_EVENTS, report_id, ids, [rejected[i] for i in ids])
                changed += await adjust(conn, parked, reported=0, failed=1)
            reported = await conn.fetch(q.MARK_REPORTED, [report_id])
            changed += await adjust(conn, reported, reported=1, failed=0)
            await log_drained(conn, changed)
        return True

    async def delivered_all(self, report_ids: Sequence[str]) -> set[str]:
        """Settles reports the provider holds in full, in one transaction; returns the ids it
        settled (another worker may have settled some first)."""
        if not report_ids:
            return set()
        async with self.pool.acquire() as conn, conn.transaction():
            closed = [r["report_id"] for r in await conn.fetch(q.CLOSE_DELIVERED, list(report_ids))]
            if closed:
                await conn.execute(q.LOCK_REPORT_CUSTOMERS, closed)
                folded = await conn.fetch(q.MARK_REPORTED_FOLDED, closed)
                if folded:
                    columns = ("customer_id", "meter", "period_start", "n", "s")
                    arrays = [[r[c] for r in folded] for c in columns]
                    changed = await conn.fetch(q.ADJUST_FOLDED, *arrays, 1, 0, 0)
                    await log_drained(conn, changed)
        return {str(r) for r in closed}

    async def failed(self, report_id: str, reason: str) -> bool:
        """Parks every event of the report with the provider's reason."""
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(q.CLOSE_REPORT, report_id, "failed", reason) is None:
                return False
            await conn.execute(q.LOCK_REPORT_CUSTOMERS, [report_id])
            parked = await conn.fetch(q.PARK_REPORT_EVENTS, report_id, reason)
            await log_drained(conn, await adjust(conn, parked, reported=0, failed=1))
        return True


async def _with_figures(
    conn: Conn, provider: domain.Provider, claimed: list[Claimed], meters: Collection[str]
) -> list[Claimed]:
    periods = sorted(
        {
            (c.event.customer_id, c.event.meter, c.period_start, c.period_end)
            for c in claimed
            if c.event.meter in meters and c.period_start is not None and c.period_end is not None
        }
    )
    if not periods:
        return claimed
    rows = await conn.fetch(
        q.PERIOD_FIGURES, provider.value, *(list(column) for column in zip(*periods, strict=True))
    )
    found = {(r["customer_id"], r["meter"], r["period_start"]): r for r in rows}
    out = []
    for c in claimed:
        r = found.get((c.event.customer_id, c.event.meter, c.period_start))
        if r is not None:
            c = dataclasses.replace(c, period_max=r["quantity_max"], period_last=r["last_quantity"])
        out.append(c)
    return out


async def adjust(
    conn: Conn, moved: Sequence[asyncpg.Record], reported: int, failed: int, unbilled: int = 0
) -> list[asyncpg.Record]:
    """Moves events between the drain counters of their totals rows; returns the rows after."""
    if not moved:
        return []
    args = (
        [r["customer_id"] for r in moved],
        [r["meter"] for r in moved],
        [r["event_time"] for r in moved],
        [r["quantity"] for r in moved],
    )
    await conn.execute(q.LOCK_TOTALS, *args)
    return await conn.fetch(q.ADJUST_TOTALS, *args, reported, failed, unbilled)


async def log_drained(conn: Conn, rows: Sequence[asyncpg.Record]) -> None:
    """The transaction's last statement: the totals rows whose drain counters moved, as
    changes for WatchUsage (a row adjusted twice: its latest values)."""
    await changes.append_totals(conn, "drain", rows, dt.datetime.now(dt.UTC))
