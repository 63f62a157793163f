"""A reconciliation's reads and writes: what was recorded and reported per customer, provider,
meter and period, and the fixes it queues as reports (sent by the drain like any other)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Callable, Sequence

import asyncpg

from usage_service import domain
from usage_service.domain import ids, periods, reports
from usage_service.domain.reports import Sent
from usage_service.storage import reconcile_queries as q
from usage_service.storage.rows import Conn, stored_periods


@dataclasses.dataclass(frozen=True)
class Carried:
    """What a Stripe meter event identifier carried."""

    customer_id: str
    meter: str
    event_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Figures:
    """Per aggregation: (all events, events the provider accepted)."""

    count: tuple[int, int]
    total: tuple[int, int]
    peak: tuple[int | None, int | None]
    last: tuple[int | None, int | None]


@dataclasses.dataclass(frozen=True)
class Unit:
    """What we know of one customer's meter at one provider in one period."""

    customer_id: str
    provider: domain.Provider
    meter: str
    period: periods.Period
    figures: Figures
    pending: int  # events not accepted yet
    in_reports: int  # of them, in reports being sent
    last_reported_at: dt.datetime | None  # the last acceptance (of an event or a fix)
    read_at: dt.datetime  # the database's time when these figures were read
    provider_customer_id: str
    subscription_item: str
    fixing: bool  # a fix report is open on this lane


class ReconcileStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def customers(self, customer_ids: Sequence[str], provider: str) -> list[str]:
        return [
            r["customer_id"]
            for r in await self.pool.fetch(q.CUSTOMERS, list(customer_ids), provider)
        ]

    async def units(
        self, customer_id: str, which: str | dt.datetime, provider: str, now: dt.datetime
    ) -> list[Unit]:
        """The customer's units of the period `which` names: 'current', 'previous', or the
        period containing a time."""
        stored = (await stored_periods(self.pool, [customer_id]))[customer_id]
        if not stored:
            return []
        period = periods.period_at(stored, which if isinstance(which, dt.datetime) else now)
        if which == "previous":
            period = periods.period_at(stored, period.start - dt.timedelta(microseconds=1))
        rows = await self.pool.fetch(q.FIGURES, customer_id, period.start, period.end, provider)
        ids = {r["provider"]: r for r in await self.pool.fetch(q.CUSTOMER_PROVIDERS, customer_id)}
        lanes = [
            reports.lane(domain.Provider(r["provider"]), customer_id, r["meter"]) for r in rows
        ]
        fixed_at: dict[str, dt.datetime] = {}
        fixing: set[str] = set()
        for f in await self.pool.fetch(q.FIXES, customer_id, lanes):
            if f["state"] == "open":
                fixing.add(f["lane"])
                continue
            at = dt.datetime.fromisoformat(json.loads(f["events"])[0]["event_time"])
            if period.start <= at < period.end:
                fixed_at[f["lane"]] = max(f["settled_at"], fixed_at.get(f["lane"], f["settled_at"]))
        out = []
        for r, lane in zip(rows, lanes, strict=True):
            known = ids.get(r["provider"])
            items = _json(known["subscription_items"]) if known else {}
            out.append(
                Unit(
                    customer_id=customer_id,
                    provider=domain.Provider(r["provider"]),
                    meter=r["meter"],
                    period=period,
                    figures=Figures(
                        (r["n"], r["rn"]),
                        (r["s"], r["rs"]),
                        (r["mx"], r["rmx"]),
                        (r["lq"], r["rlq"]),
                    ),
                    pending=r["pending"],
                    in_reports=r["in_reports"],
                    last_reported_at=_latest(r["last_reported_at"], fixed_at.get(lane)),
                    read_at=r["read_at"],
                    provider_customer_id=known["provider_customer_id"] if known else "",
                    subscription_item=str(items.get(r["meter"], "")),
                    fixing=lane in fixing,
                )
            )
        return out

    async def sent(self, unit: Unit) -> tuple[Sent, ...]:
        rows = await self.pool.fetch(
            q.SENT, unit.customer_id, unit.provider.value, unit.meter, *unit.period.bounds
        )
        return tuple(Sent(r["event_id"], r["quantity"], r["event_time"]) for r in rows)

    async def carried(self, identifiers: Sequence[str]) -> dict[str, Carried]:
        """Stripe identifiers to what they carried; unknown ones are left out."""
        ids = [i[:36] for i in identifiers if _is_uuid(i[:36])]
        found: dict[str, list[tuple[str, str, str]]] = {}
        for r in await self.pool.fetch(q.IDENTIFIED, ids, ids):
            found.setdefault(r["report_id"], []).append(
                (r["event_id"], r["customer_id"], r["meter"])
            )
            found.setdefault(r["event_id"], []).append(
                (r["event_id"], r["customer_id"], r["meter"])
            )
        out = {}
        for identifier in identifiers:
            rows = found.get(identifier[:36])
            if rows:
                out[identifier] = Carried(rows[0][1], rows[0][2], tuple(r[0] for r in rows))
        return out

    async def queued(self, customer_id: str, event_ids: Sequence[str]) -> set[str]:
        """Those of the customer's `event_ids` already in an open fix report."""
        rows = await self.pool.fetch(q.QUEUED, customer_id, list(event_ids))
        return {r["event_id"] for r in rows}

    async def sent_to(self, unit: Unit) -> set[str]:
        """The customer ids the unit's lane reports carried for the period's events."""
        lane = reports.lane(unit.provider, unit.customer_id, unit.meter)
        rows = await self.pool.fetch(q.SENT_TO, unit.customer_id, lane, *unit.period.bounds)
        return {r["id"] for r in rows}

    async def fix_amount(
        self, unit: Unit, amount: int, stated: Callable[[dt.datetime], dt.datetime]
    ) -> str | None:
        """Queues one report of `amount` on the unit's lane, addressed like its latest accepted
        event and stated at `stated(that event's time)`; its id is committed before the drain
        sends it. None when a report is in flight on the lane, a fix was queued on it since the
        unit was read (the provider's figure this fix is based on may be stale), or nothing was
        accepted in the period."""
        row = await self.pool.fetchrow(
            q.LATEST_SENT, unit.customer_id, unit.provider.value, unit.meter, *unit.period.bounds
        )
        if row is None:
            return None
        lane = reports.lane(unit.provider, unit.customer_id, unit.meter)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(q.LOCK_LANE, lane)
            if await conn.fetchval(q.FIXED_SINCE, unit.customer_id, lane, unit.read_at):
                return None
            return await self._insert(conn, unit, lane, [row], amount, stated(row["event_time"]))

    async def fix_events(self, unit: Unit, event_ids: Sequence[str]) -> str | None:
        """Queues a re-send of events a per-event provider lacks (it dedupes them by id)."""
        rows = await self.pool.fetch(q.EVENTS, unit.customer_id, list(event_ids))
        if not rows:
            return None
        async with self.pool.acquire() as conn:
            return await self._insert(conn, unit, None, rows, 0, None)

    @staticmethod
    async def _insert(
        conn: Conn,
        unit: Unit,
        lane: str | None,
        rows: Sequence[asyncpg.Record],
        value: int,
        stated_at: dt.datetime | None,
    ) -> str | None:
        events = [
            {
                "event_id": r["event_id"],
                "customer_id": r["customer_id"],
                "meter": r["meter"],
                "quantity": r["quantity"],
                "event_time": r["event_time"].isoformat(),
                "properties": {str(k): str(v) for k, v in _json(r["properties"]).items()},
                "provider_customer_id": unit.provider_customer_id,
                "subscription_item": unit.subscription_item,
            }
            for r in rows
        ]
        report_id = ids.new_report_id()
        found = await conn.fetchval(
            q.INSERT_FIX,
            unit.customer_id,
            report_id,
            unit.provider.value,
            lane,
            json.dumps(events),
            value,
            stated_at,
        )
        return None if found is None else report_id


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return len(text) == 36


def _latest(*times: dt.datetime | None) -> dt.datetime | None:
    known = [t for t in times if t is not None]
    return max(known) if known else None


def _json(value: object) -> dict[str, object]:
    loaded = json.loads(value) if isinstance(value, str) else value
    return dict(loaded) if isinstance(loaded, dict) else {}
