"""The drain's storage: claiming events into reports, leases, and settling what providers answer.

Every drain statement lives here. A report's events, value and id are committed before the first
send; settling moves events to reported / failed and adjusts the period totals' drain counters in
the same transaction. Locks are taken in the core's order: customers (shared, sorted), then
events, then totals rows (sorted), so the drain never deadlocks with recorders or upserts.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import asyncpg

from usage_service import domain
from usage_service.domain.reports import Report, ReportEvent
from usage_service.storage.rows import Conn

LANE_SEPARATOR = "\x1f"  # chr(31) in SQL

_EVENT_FIELDS = """e.event_id, e.customer_id, e.meter, e.quantity, e.event_time, e.properties,
    p.provider_customer_id, coalesce(p.subscription_items ->> e.meter, '') AS subscription_item"""

# Pending events attributed to one provider, not yet in a report, oldest first, skipping rows
# other workers hold and lanes that have a report in flight; each with the customer's ids at that
# provider (kept after a switch) and the bounds of its period's totals row (NULL when the event is
# outside every known period).
# $1 provider, $2 limit
CLAIM_EVENTS = f"""
SELECT {_EVENT_FIELDS}, t.period_start, t.period_end
FROM usage_events e
JOIN customer_providers p ON p.customer_id = e.customer_id AND p.provider = e.provider
LEFT JOIN usage_totals t ON t.customer_id = e.customer_id AND t.meter = e.meter
    AND t.period_start <= e.event_time AND e.event_time < t.period_end
WHERE e.report_state = 'pending' AND e.report_id IS NULL AND e.provider = $1
    AND NOT EXISTS (
        SELECT 1 FROM reports r
        WHERE r.state = 'open' AND r.lane = concat_ws(chr(31), $1::text, e.customer_id, e.meter))
ORDER BY e.event_time, e.event_id
LIMIT $2
FOR UPDATE OF e SKIP LOCKED"""

# The max and the last value of the events billed to one provider in periods of customers'
# meters, parked ones left out: a period's totals also count events billed elsewhere or unbilled.
# $1 provider, $2 customer_id[], $3 meter[], $4 period_start[], $5 period_end[]
PERIOD_FIGURES = """
SELECT g.c AS customer_id, g.m AS meter, g.s AS period_start, max(e.quantity) AS quantity_max,
    (array_agg(e.quantity ORDER BY e.event_time DESC, e.seq DESC))[1] AS last_quantity
FROM unnest($2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[]) AS g(c, m, s, en)
JOIN usage_events e ON e.customer_id = g.c AND e.meter = g.m AND e.provider = $1
    AND e.event_time >= g.s AND e.event_time < g.en AND e.report_state <> 'failed'
GROUP BY 1, 2, 3"""

# A lane conflict (another worker just opened a report on it) inserts nothing for that report.
# $1 report_id[], $2 provider, $3 lane[] (NULL: no lane), $4 events[] (JSON text), $5 value[],
# $6 owner, $7 lease (seconds), $8 stated_at[]
INSERT_REPORTS = """
INSERT INTO reports (report_id, provider, lane, events, value, lease_until, leased_by,
                     first_sent_at, stated_at)
SELECT r, $2, l, ev::jsonb, v, now() + make_interval(secs => $7), $6, now(), s
FROM unnest($1::uuid[], $3::text[], $4::text[], $5::bigint[], $8::timestamptz[])
    AS u(r, l, ev, v, s)
ON CONFLICT (lane) WHERE state = 'open' AND lane IS NOT NULL DO NOTHING
RETURNING report_id"""

# $1 event_id[], $2 report_id[]
ASSIGN_EVENTS = """
UPDATE usage_events e SET report_id = u.r
FROM unnest($1::uuid[], $2::uuid[]) AS u(e, r)
WHERE e.event_id = u.e"""

_REPORT_FIELDS = """r.report_id, r.provider, r.events, r.value, r.checkpoint, r.attempts,
    r.first_sent_at, r.stated_at"""

# Open reports that are due and whose lease (if any) has run out: a retry, or a dead worker's.
# $1 provider, $2 owner, $3 lease (seconds), $4 limit
CLAIM_REPORTS = f"""
UPDATE reports r SET lease_until = now() + make_interval(secs => $3), leased_by = $2,
    first_sent_at = coalesce(r.first_sent_at, now())
FROM (
    SELECT report_id FROM reports
    WHERE provider = $1 AND state = 'open' AND next_attempt_at <= now()
        AND (lease_until IS NULL OR lease_until < now())
    ORDER BY next_attempt_at
    LIMIT $4
    FOR UPDATE SKIP LOCKED
) due
WHERE r.report_id = due.report_id
RETURNING {_REPORT_FIELDS}"""

# Only while the lease is ours: a Lemon Squeezy baseline must be stored before the send. It
# renews the lease, so no other worker takes the report while the send it precedes may land.
# $1 report_id, $2 owner, $3 checkpoint (JSON text), $4 lease (seconds from now)
SAVE_CHECKPOINT = """
UPDATE reports SET checkpoint = $3::jsonb, lease_until = now() + make_interval(secs => $4)
WHERE report_id = $1 AND state = 'open' AND leased_by = $2 AND lease_until > now()
RETURNING report_id"""

# $1 report_id, $2 owner, $3 delay (seconds), $4 reason
RETRY_LATER = """
UPDATE reports SET attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => $3),
    lease_until = NULL, leased_by = NULL, last_error = $4
WHERE report_id = $1 AND state = 'open' AND leased_by = $2"""

# Settles a report once, whoever holds the lease: a delivery is a fact.
# $1 report_id, $2 state (delivered | failed), $3 reason
CLOSE_REPORT = """
UPDATE reports SET state = $2, last_error = $3, settled_at = now(), lease_until = NULL
WHERE report_id = $1 AND state = 'open'
RETURNING report_id"""

# Several delivered reports at once; report rows are locked in id order.
# $1 report_id[]
CLOSE_DELIVERED = """
UPDATE reports r SET state = 'delivered', last_error = '', settled_at = now(), lease_until = NULL
FROM (
    SELECT report_id FROM reports WHERE report_id = ANY($1::uuid[]) AND state = 'open'
    ORDER BY report_id
    FOR UPDATE
) due
WHERE r.report_id = due.report_id
RETURNING r.report_id"""

# $1 report_id[]
LOCK_REPORT_CUSTOMERS = """
SELECT customer_id FROM customers
WHERE customer_id IN (
    SELECT customer_id FROM usage_events
    WHERE report_id = ANY($1::uuid[]) AND report_state = 'pending')
ORDER BY customer_id
FOR SHARE"""

_MOVED = "RETURNING e.customer_id, e.meter, e.event_time, e.quantity"

# $1 report_id, $2 event_id[], $3 reason[]
PARK_EVENTS = f"""
UPDATE usage_events e SET report_state = 'failed', last_error = u.reason
FROM unnest($2::uuid[], $3::text[]) AS u(event_id, reason)
WHERE e.event_id = u.event_id AND e.report_id = $1 AND e.report_state = 'pending'
{_MOVED}"""

# $1 report_id, $2 reason
PARK_REPORT_EVENTS = f"""
UPDATE usage_events e SET report_state = 'failed', last_error = $2
WHERE e.report_id = $1 AND e.report_state = 'pending'
{_MOVED}"""

# $1 report_id[]
MARK_REPORTED = f"""
UPDATE usage_events e SET report_state = 'reported', reported_at = now(), last_error = ''
WHERE e.report_id = ANY($1::uuid[]) AND e.report_state = 'pending'
{_MOVED}"""

_PARKED = """e.report_state = 'failed' AND ($1::text = '' OR e.provider = $1)
    AND (cardinality($2::uuid[]) = 0 OR e.event_id = ANY($2::uuid[]))"""

# $1 provider ('' for all), $2 event_id[] (empty for all)
LOCK_PARKED_CUSTOMERS = f"""
SELECT customer_id FROM customers
WHERE customer_id IN (SELECT e.customer_id FROM usage_events e WHERE {_PARKED})
ORDER BY customer_id
FOR SHARE"""

# Parked events go back to pending, out of their report: the next claim builds a new one.
# $1 provider ('' for all), $2 event_id[] (empty for all)
REQUEUE = f"""
UPDATE usage_events e SET report_id = NULL, last_error = '',
    report_state = CASE WHEN e.provider = '' THEN 'unbilled' ELSE 'pending' END
WHERE {_PARKED}
{_MOVED}, e.report_state"""

_EVENTS_IN_TOTALS = """
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[]) AS ev(c, m, w, q)
JOIN usage_totals t ON t.customer_id = ev.c AND t.meter = ev.m
    AND t.period_start <= ev.w AND ev.w < t.period_end"""

# $1 customer_id[], $2 meter[], $3 event_time[], $4 quantity[]
LOCK_TOTALS = f"""
SELECT t.customer_id {_EVENTS_IN_TOTALS}
ORDER BY t.customer_id, t.meter, t.period_start
FOR UPDATE OF t"""

# Moves events between the drain counters of their periods' totals rows.
# $1..$4 as LOCK_TOTALS, $5 reported delta per event (-1, 0, 1), $6 failed delta, $7 unbilled
ADJUST_TOTALS = f"""
UPDATE usage_totals t SET
    reported_count = t.reported_count + $5 * a.n, reported_sum = t.reported_sum + $5 * a.s,
    failed_count = t.failed_count + $6 * a.n, failed_sum = t.failed_sum + $6 * a.s,
    unbilled_count = t.unbilled_count + $7 * a.n, unbilled_sum = t.unbilled_sum + $7 * a.s
FROM (
    SELECT t.customer_id, t.meter, t.period_start, count(*) AS n, sum(ev.q) AS s
    {_EVENTS_IN_TOTALS}
    GROUP BY 1, 2, 3
) a
WHERE t.customer_id = a.customer_id AND t.meter = a.meter AND t.period_start = a.period_start"""

# Events of a customer known only by its usage (a placeholder) are not attributed yet: '?'.
_PROVIDER = "coalesce(e.provider, '?')"

# Per provider the events are attributed to; `moved`: those whose customer is billed by another
# provider now.
STATUS_EVENTS = f"""
SELECT {_PROVIDER} AS provider,
    count(*) FILTER (WHERE e.report_state = 'pending') AS pending,
    min(e.recorded_at) FILTER (WHERE e.report_state = 'pending') AS oldest_pending,
    count(*) FILTER (WHERE e.report_state = 'failed') AS failed,
    count(*) FILTER (WHERE c.plan_id <> '' AND c.provider <> e.provider) AS moved,
    now() AS now
FROM usage_events e LEFT JOIN customers c ON c.customer_id = e.customer_id
WHERE e.report_state IN ('pending', 'failed')
GROUP BY 1 ORDER BY 1"""

STATUS_REASONS = f"""
SELECT {_PROVIDER} AS provider, e.last_error, count(*) AS events
FROM usage_events e
WHERE e.report_state = 'failed'
GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2"""

STATUS_RETRYING = """
SELECT provider, count(*) AS reports, max(attempts) AS attempts,
    (array_agg(last_error ORDER BY next_attempt_at DESC))[1] AS last_error
FROM reports WHERE state = 'open' AND attempts > 0
GROUP BY provider ORDER BY provider"""


# Events attributed to a provider other than their customer's current one, that it never
# accepted (pending or parked). $1 from provider ('' any), $2 customer_id[] (empty: all)
_MOVABLE = """e.provider IS NOT NULL AND e.provider <> c.provider AND c.plan_id <> ''
    AND e.report_state IN ('pending', 'failed') AND ($1::text = '' OR e.provider = $1)
    AND (cardinality($2::text[]) = 0 OR e.customer_id = ANY($2::text[]))"""

# $1, $2 as _MOVABLE
LOCK_MOVABLE_CUSTOMERS = f"""
SELECT c.customer_id FROM customers c
WHERE c.customer_id IN (
    SELECT e.customer_id FROM usage_events e JOIN customers c ON c.customer_id = e.customer_id
    WHERE {_MOVABLE})
ORDER BY c.customer_id
FOR SHARE"""

# Open reports holding movable events that are due and no worker holds (a worker may be sending,
# or a send's outcome may still land). $1, $2 as _MOVABLE
LOCK_MOVABLE_REPORTS = f"""
SELECT r.report_id FROM reports r
WHERE r.state = 'open' AND (r.lease_until IS NULL OR r.lease_until < now())
    AND r.next_attempt_at <= now()
    AND r.report_id IN (
        SELECT e.report_id FROM usage_events e JOIN customers c ON c.customer_id = e.customer_id
        WHERE {_MOVABLE} AND e.report_state = 'pending' AND e.report_id IS NOT NULL)
ORDER BY r.report_id
FOR UPDATE SKIP LOCKED"""

# Re-attributes movable events to their customer's current provider ('' none: unbilled), out of
# their reports; those in an open report not given in $3 stay.
# $1, $2 as _MOVABLE, $3 abandoned report_id[]
MOVE_EVENTS = f"""
WITH moving AS (
    SELECT e.event_id, e.report_state AS was, e.provider AS was_provider,
        e.report_id AS was_report, c.provider AS target
    FROM usage_events e JOIN customers c ON c.customer_id = e.customer_id
    WHERE {_MOVABLE}
        AND (e.report_state = 'failed' OR e.report_id IS NULL OR e.report_id = ANY($3::uuid[]))
    FOR UPDATE OF e
)
UPDATE usage_events e SET provider = m.target, report_id = NULL, last_error = '',
    report_state = CASE WHEN m.target = '' THEN 'unbilled' ELSE 'pending' END
FROM moving m
WHERE e.event_id = m.event_id
RETURNING e.customer_id, e.meter, e.event_time, e.quantity, m.was, e.report_state,
    m.was_provider, m.was_report, m.target"""

# Movable events left in open reports. $1, $2 as _MOVABLE
COUNT_IN_OPEN_REPORTS = f"""
SELECT count(*) FROM usage_events e JOIN customers c ON c.customer_id = e.customer_id
WHERE {_MOVABLE} AND e.report_state = 'pending' AND e.report_id IS NOT NULL"""

# The rest of an abandoned report's events go back to the queue: per-event providers dedupe them
# by event id when they are sent again. $1 report_id[]
RELEASE_EVENTS = """
UPDATE usage_events SET report_id = NULL
WHERE report_id = ANY($1::uuid[]) AND report_state = 'pending'"""

# $1 report_id[], $2 reason
ABANDON_REPORTS = """
UPDATE reports SET state = 'failed', last_error = $2, settled_at = now(), lease_until = NULL
WHERE report_id = ANY($1::uuid[]) AND state = 'open'"""


@dataclasses.dataclass(frozen=True)
class Moved:
    """What `requeue --move-to-current-provider` did."""

    events: int  # re-attributed to their customer's current provider
    by_route: tuple[tuple[str, str, int], ...]  # (from, to, events); to '' means unbilled
    from_open_reports: int  # of them, in open reports: the old provider may hold them
    left_in_open_reports: int  # not moved: in open reports (not asked for, or being sent)


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
        properties={str(k): str(v) for k, v in _json(row["properties"]).items()},
        provider_customer_id=row["provider_customer_id"],
        subscription_item=row["subscription_item"],
    )
    return Claimed(event, row["period_start"], row["period_end"])


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
        rows = await self.pool.fetch(CLAIM_REPORTS, provider.value, owner, lease, limit)
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
            rows = await conn.fetch(CLAIM_EVENTS, provider.value, limit)
            claimed = [claimed_from_row(r) for r in rows]
            if figures:
                claimed = await _with_figures(conn, provider, claimed, figures)
            new = build(claimed) if claimed else []
            if not new:
                return []
            inserted = await conn.fetch(
                INSERT_REPORTS,
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
            await conn.execute(ASSIGN_EVENTS, [p[0] for p in pairs], [p[1] for p in pairs])
        return [
            Report(r.report_id, provider, r.events, r.value, stated_at=r.stated_at) for r in kept
        ]

    async def save_checkpoint(
        self, report_id: str, owner: str, state: Mapping[str, Any], lease: float
    ) -> bool:
        """Stores the state and holds the lease `lease` seconds from now. False when the lease is
        no longer ours: the caller must not send."""
        found = await self.pool.fetchval(
            SAVE_CHECKPOINT, report_id, owner, json.dumps(state), lease
        )
        return found is not None

    async def retry_later(self, report_id: str, owner: str, delay: float, reason: str) -> None:
        await self.pool.execute(RETRY_LATER, report_id, owner, delay, reason)

    async def delivered(self, report_id: str, rejected: Mapping[str, str] | None = None) -> bool:
        """The provider holds the report, except `rejected` events (parked with their reason).
        False when another worker settled it first."""
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(CLOSE_REPORT, report_id, "delivered", "") is None:
                return False
            await conn.execute(LOCK_REPORT_CUSTOMERS, [report_id])
            if rejected:
                ids = list(rejected)
                parked = await conn.fetch(PARK_EVENTS, report_id, ids, [rejected[i] for i in ids])
                await _adjust(conn, parked, reported=0, failed=1)
            await _adjust(conn, await conn.fetch(MARK_REPORTED, [report_id]), reported=1, failed=0)
        return True

    async def delivered_all(self, report_ids: Sequence[str]) -> set[str]:
        """Settles reports the provider holds in full, in one transaction; returns the ids it
        settled (another worker may have settled some first)."""
        if not report_ids:
            return set()
        async with self.pool.acquire() as conn, conn.transaction():
            closed = [r["report_id"] for r in await conn.fetch(CLOSE_DELIVERED, list(report_ids))]
            if closed:
                await conn.execute(LOCK_REPORT_CUSTOMERS, closed)
                moved = await conn.fetch(MARK_REPORTED, closed)
                await _adjust(conn, moved, reported=1, failed=0)
        return {str(r) for r in closed}

    async def failed(self, report_id: str, reason: str) -> bool:
        """Parks every event of the report with the provider's reason."""
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(CLOSE_REPORT, report_id, "failed", reason) is None:
                return False
            await conn.execute(LOCK_REPORT_CUSTOMERS, [report_id])
            parked = await conn.fetch(PARK_REPORT_EVENTS, report_id, reason)
            await _adjust(conn, parked, reported=0, failed=1)
        return True

    async def requeue(self, provider: str = "", event_ids: Sequence[str] = ()) -> int:
        """Puts parked events back to pending (those billed to no provider: unbilled); returns
        how many."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_PARKED_CUSTOMERS, provider, list(event_ids))
            moved = await conn.fetch(REQUEUE, provider, list(event_ids))
            unbilled = [r for r in moved if r["report_state"] == "unbilled"]
            await _adjust(conn, [r for r in moved if r["report_state"] != "unbilled"], 0, -1)
            await _adjust(conn, unbilled, reported=0, failed=-1, unbilled=1)
        return len(moved)

    async def move_to_current_provider(
        self, provider: str = "", customer_ids: Sequence[str] = (), open_reports: bool = False
    ) -> Moved:
        """Re-attributes events that a customer's earlier provider never accepted (waiting, or
        parked) to the customer's current provider: an operator's decision after a switch.
        Events in open reports were handed to that provider, which may hold them: they move only
        with `open_reports` (their reports are abandoned), and never while a worker holds the
        report or its retry is not due (a send's outcome may still land)."""
        ids = list(customer_ids)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_MOVABLE_CUSTOMERS, provider, ids)
            reports = await conn.fetch(LOCK_MOVABLE_REPORTS, provider, ids) if open_reports else []
            abandoned = [r["report_id"] for r in reports]
            moved = await conn.fetch(MOVE_EVENTS, provider, ids, abandoned)
            if abandoned:
                await conn.execute(RELEASE_EVENTS, abandoned)
                await conn.execute(
                    ABANDON_REPORTS, abandoned, "abandoned: its events moved to another provider"
                )
            for was in ("pending", "failed"):
                for now in ("pending", "unbilled"):
                    part = [r for r in moved if r["was"] == was and r["report_state"] == now]
                    await _adjust(
                        conn,
                        part,
                        reported=0,
                        failed=-1 if was == "failed" else 0,
                        unbilled=1 if now == "unbilled" else 0,
                    )
            left = await conn.fetchval(COUNT_IN_OPEN_REPORTS, provider, ids)
        routes: dict[tuple[str, str], int] = {}
        for r in moved:
            key = (r["was_provider"], r["target"])
            routes[key] = routes.get(key, 0) + 1
        return Moved(
            events=len(moved),
            by_route=tuple((a, b, n) for (a, b), n in sorted(routes.items())),
            from_open_reports=sum(1 for r in moved if r["was_report"] in abandoned),
            left_in_open_reports=int(left or 0),
        )

    async def status(self) -> list[ProviderStatus]:
        async with self.pool.acquire() as conn:
            counts = await conn.fetch(STATUS_EVENTS)
            reasons = await conn.fetch(STATUS_REASONS)
            retrying = {r["provider"]: r for r in await conn.fetch(STATUS_RETRYING)}
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
        PERIOD_FIGURES, provider.value, *(list(column) for column in zip(*periods, strict=True))
    )
    found = {(r["customer_id"], r["meter"], r["period_start"]): r for r in rows}
    out = []
    for c in claimed:
        r = found.get((c.event.customer_id, c.event.meter, c.period_start))
        if r is not None:
            c = dataclasses.replace(c, period_max=r["quantity_max"], period_last=r["last_quantity"])
        out.append(c)
    return out


async def _adjust(
    conn: Conn, moved: Sequence[asyncpg.Record], reported: int, failed: int, unbilled: int = 0
) -> None:
    if not moved:
        return
    args = (
        [r["customer_id"] for r in moved],
        [r["meter"] for r in moved],
        [r["event_time"] for r in moved],
        [r["quantity"] for r in moved],
    )
    await conn.execute(LOCK_TOTALS, *args)
    await conn.execute(ADJUST_TOTALS, *args, reported, failed, unbilled)
