"""The drain's storage: claiming events into reports, leases, and settling what providers answer.

Its statements are in drain_queries.py. A report holds one customer's events; its events, value
and id are committed before the first send; settling moves events to reported / failed and
adjusts the period totals' drain counters in the same transaction. Every statement that writes or
locks names one customer; several customers' work is a lock-free read, then statements per
customer in customer_id order. Settling takes locks in the core's order: customers (shared,
sorted), then their reports, events, and totals rows (sorted), so the drain never deadlocks with
recorders, upserts or another worker settling the same report.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
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
    """A report `build` makes of claimed events: all of one customer."""

    report_id: str
    lane: str | None
    events: tuple[ReportEvent, ...]
    value: int = 0
    stated_at: dt.datetime | None = None

    @property
    def customer_id(self) -> str:
        return self.events[0].customer_id


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
        customer_id=row["customer_id"],
        report_id=str(row["report_id"]),
        provider=domain.Provider(row["provider"]),
        events=tuple(event_from_json(raw) for raw in _json(row["events"])),
        value=row["value"],
        checkpoint=dict(_json(row["checkpoint"])),
        attempts=row["attempts"],
        first_sent_at=row["first_sent_at"],
        stated_at=row["stated_at"],
    )


ReportKey = tuple[str, str]  # (customer_id, report_id): a report's key
CLAIM_ROUNDS = 3  # reads of due events per claim, while other workers hold some of them


class DrainStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def claim_reports(
        self, provider: domain.Provider, owner: str, lease: float, limit: int
    ) -> list[Report]:
        """Takes a lease on due open reports (retries, and those of workers that died): a
        lock-free read of their keys, then one statement per report, in key order (those another
        worker took in between are left out)."""
        due = await self.pool.fetch(q.DUE_REPORTS, provider.value, limit)
        if not due:
            return []
        order = {(r["customer_id"], str(r["report_id"])): k for k, r in enumerate(due)}
        now = dt.datetime.now(dt.UTC)
        rows = await self.pool.fetchmany(
            q.CLAIM_REPORT, [(c, rid, owner, lease, now) for c, rid in sorted(order)]
        )
        rows = sorted(rows, key=lambda r: order[(r["customer_id"], str(r["report_id"]))])
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
        """Claims pending events into the reports `build` makes of them (each of one customer),
        committed and leased to `owner`; events of the meters in `figures` come with their
        period's figures. Events `build` leaves out, or whose lane another worker just took,
        stay pending."""

        async def claim(counts: Mapping[str, int]) -> tuple[list[Report], int]:
            return await self._claim_lanes(provider, owner, lease, counts, build, figures)

        return await self._rounds(provider, limit, q.DUE_LANE_EVENTS, claim)

    async def claim_batches(
        self, provider: domain.Provider, owner: str, lease: float, limit: int, batch: int
    ) -> list[Report]:
        """Claims pending events into reports of at most `batch` events of one customer each (a
        provider without lanes), committed and leased to `owner`: one statement per customer
        (CLAIM_BATCHES), all sent at once in one transaction."""

        async def claim(counts: Mapping[str, int]) -> tuple[list[Report], int]:
            args = [
                (c, provider.value, n, _new_ids(-(-n // batch)), batch, owner, lease)
                for c, n in sorted(counts.items())
            ]
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetchmany(q.CLAIM_BATCHES, args)
            made = [
                Report(
                    str(row["report_id"]),
                    provider,
                    tuple(event_from_json(e) for e in json.loads(row["events"])),
                    customer_id=row["customer_id"],
                )
                for row in rows
            ]
            made.sort(key=lambda r: (r.events[0].event_time, r.events[0].event_id))
            return made, sum(len(r.events) for r in made)

        return await self._rounds(provider, limit, q.DUE_EVENTS, claim)

    async def _rounds(
        self,
        provider: domain.Provider,
        limit: int,
        due_sql: str,
        claim: Callable[[Mapping[str, int]], Awaitable[tuple[list[Report], int]]],
    ) -> list[Report]:
        """Claims in rounds: a lock-free read of the oldest due events finds their customers
        (and how many of its events each has among them), then `claim` takes them customer by
        customer and says how many events it locked. The read cannot see other workers' row
        locks: when a round finds events another worker holds, the next round reads again (that
        worker has likely committed its claim by then), up to CLAIM_ROUNDS."""
        out: list[Report] = []
        for _ in range(CLAIM_ROUNDS):
            want = limit - sum(len(r.events) for r in out)
            if want <= 0:
                break
            due = await self.pool.fetch(due_sql, provider.value, want)
            if not due:
                break
            made, locked = await claim(collections.Counter(r["customer_id"] for r in due))
            out += made
            if locked >= len(due):  # nothing was held by another worker
                break
        return out

    async def _claim_lanes(
        self,
        provider: domain.Provider,
        owner: str,
        lease: float,
        counts: Mapping[str, int],
        build: Callable[[list[Claimed]], list[NewReport]],
        figures: Collection[str],
    ) -> tuple[list[Report], int]:
        """In one transaction, each customer's events are claimed (FOR UPDATE SKIP LOCKED), then
        assigned to the reports `build` makes of them, then the reports are inserted (those whose
        lane another worker just took are not, and their events are released): one statement
        per customer or report, in customer order, each sent without waiting for the one before.
        Returns the reports and how many events were locked."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetchmany(
                q.CLAIM_EVENTS, [(c, provider.value, counts[c]) for c in sorted(counts)]
            )
            claimed = sorted(
                (claimed_from_row(r) for r in rows),
                key=lambda c: (c.event.event_time, c.event.event_id),
            )
            if figures and claimed:
                claimed = await _with_figures(conn, provider, claimed, figures)
            new = build(claimed) if claimed else []
            if not new:
                return [], len(rows)
            # Events first, then their reports, so the lease runs from the reports' insert.
            ordered = sorted(new, key=lambda r: (r.customer_id, r.report_id))
            await conn.executemany(
                q.ASSIGN_EVENTS,
                [(r.customer_id, r.report_id, [e.event_id for e in r.events]) for r in ordered],
            )
            now = dt.datetime.now(dt.UTC)
            inserted = await conn.fetchmany(
                q.INSERT_REPORT,
                [
                    (
                        r.customer_id,
                        r.report_id,
                        provider.value,
                        r.lane,
                        json.dumps([event_to_json(e) for e in r.events]),
                        r.value,
                        owner,
                        lease,
                        r.stated_at,
                        now,
                    )
                    for r in ordered
                ],
            )
            created = {(r["customer_id"], str(r["report_id"])) for r in inserted}
            kept = [r for r in new if (r.customer_id, r.report_id) in created]
            lost = [r for r in ordered if (r.customer_id, r.report_id) not in created]
            if lost:  # another worker just opened a report on the lane: its events wait
                await conn.executemany(
                    q.UNASSIGN_EVENTS, [(r.customer_id, r.report_id) for r in lost]
                )
        made = [
            Report(
                r.report_id,
                provider,
                r.events,
                r.value,
                stated_at=r.stated_at,
                customer_id=r.customer_id,
            )
            for r in kept
        ]
        return made, len(rows)

    async def save_checkpoint(
        self, key: ReportKey, owner: str, state: Mapping[str, Any], lease: float
    ) -> bool:
        """Stores the state and holds the lease `lease` seconds from now. False when the lease is
        no longer ours: the caller must not send."""
        found = await self.pool.fetchval(q.SAVE_CHECKPOINT, *key, owner, json.dumps(state), lease)
        return found is not None

    async def retry_later(self, key: ReportKey, owner: str, delay: float, reason: str) -> None:
        await self.pool.execute(q.RETRY_LATER, *key, owner, delay, reason)

    async def delivered(self, key: ReportKey, rejected: Mapping[str, str] | None = None) -> bool:
        """The provider holds the report, except `rejected` events (parked with their reason).
        False when another worker settled it first."""
        customer_id, report_id = key
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(q.LOCK_CUSTOMER, customer_id)
            if await conn.fetchval(q.CLOSE_REPORT, *key, "delivered", "") is None:
                return False
            changed = []
            if rejected:
                ids = list(rejected)
                parked = await conn.fetch(q.PARK_EVENTS, *key, ids, [rejected[i] for i in ids])
                changed += await adjust(conn, parked, reported=0, failed=1)
            reported = await conn.fetch(q.MARK_REPORTED, customer_id, [report_id])
            changed += await adjust(conn, reported, reported=1, failed=0)
            await log_drained(conn, changed)
        return True

    async def delivered_all(self, keys: Sequence[ReportKey]) -> set[ReportKey]:
        """Settles reports the provider holds in full, in one transaction; returns the keys it
        settled (another worker may have settled some first). The customers' rows are locked
        (shared, in order), then each customer's reports are settled by one statement
        (SETTLE_DELIVERED), in customer order, all sent at once."""
        if not keys:
            return set()
        by_customer = _by_customer(keys)
        customers = sorted(by_customer)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(q.LOCK_CUSTOMER, [(c,) for c in customers])
            rows = await conn.fetchmany(
                q.SETTLE_DELIVERED, [(c, by_customer[c]) for c in customers]
            )
            changed = [r for r in rows if r["customer_id"] is not None]
            if changed:
                await log_drained(conn, changed)
        return {(r["settled_for"], str(rid)) for r in rows for rid in r["closed"] or ()}

    async def failed(self, key: ReportKey, reason: str) -> bool:
        """Parks every event of the report with the provider's reason."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(q.LOCK_CUSTOMER, key[0])
            if await conn.fetchval(q.CLOSE_REPORT, *key, "failed", reason) is None:
                return False
            parked = await conn.fetch(q.PARK_REPORT_EVENTS, *key, reason)
            await log_drained(conn, await adjust(conn, parked, reported=0, failed=1))
        return True


def _new_ids(count: int) -> list[str]:
    return [ids.new_report_id() for _ in range(count)]


def _by_customer(pairs: Iterable[tuple[str, Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for customer_id, value in pairs:
        out.setdefault(customer_id, []).append(value)
    return out


def batches(claimed: list[Claimed], size: int) -> list[NewReport]:
    """Claimed events (oldest first) in reports of at most `size` events, each of one customer,
    in the order of their oldest event."""
    per_customer = _by_customer((c.event.customer_id, c.event) for c in claimed)
    return [
        NewReport(ids.new_report_id(), None, tuple(events[i : i + size]))
        for events in per_customer.values()
        for i in range(0, len(events), size)
    ]


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
    per_customer = _by_customer((p[0], p[1:]) for p in periods)
    rows = await conn.fetchmany(
        q.PERIOD_FIGURES,
        [
            (c, provider.value, *(list(column) for column in zip(*per_customer[c], strict=True)))
            for c in sorted(per_customer)
        ],
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
    """Moves events between the drain counters of their totals rows, one customer at a time in
    customer order; returns the rows after."""
    out: list[asyncpg.Record] = []
    per_customer = _by_customer((r["customer_id"], r) for r in moved)
    for customer_id in sorted(per_customer):
        rows = per_customer[customer_id]
        args = (
            customer_id,
            [r["meter"] for r in rows],
            [r["event_time"] for r in rows],
            [r["quantity"] for r in rows],
        )
        await conn.execute(q.LOCK_TOTALS, *args)
        out += await conn.fetch(q.ADJUST_TOTALS, *args, reported, failed, unbilled)
    return out


async def log_drained(conn: Conn, rows: Sequence[asyncpg.Record]) -> None:
    """The transaction's last statement: the totals rows whose drain counters moved, as
    changes for WatchUsage (a row adjusted twice: its latest values)."""
    await changes.append_totals(conn, "drain", rows, dt.datetime.now(dt.UTC))
