"""Prepaid credits in storage: grants, the plan's grants made on first use in a period, and
burning them in the transaction of the usage they pay for.

Lock order: a burner holds the totals rows its events count in before it locks the grants, as
every writer of usage does, so burners of one customer's feature queue on those rows and never
deadlock; VoidGrant and CreateGrant touch one grant only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence

import asyncpg

from usage_service import domain
from usage_service.domain import credits, ids, periods
from usage_service.domain.credits import Grant, GrantSource, GrantState, balance
from usage_service.domain.errors import GrantKeyConflict
from usage_service.domain.periods import Period
from usage_service.domain.plans import Aggregation, MeteredFeature
from usage_service.storage import changes, queries
from usage_service.storage import credits_queries as q
from usage_service.storage.rows import Conn, totals_from_row

__all__ = [
    "Burner",
    "Grant",
    "Usage",
    "Wanted",
    "balance",
    "burn",
    "burned_by",
    "create",
    "credit",
    "credit_detail",
    "follow_periods",
    "listed",
    "live",
    "lock",
    "log_grant",
    "top_up",
    "void",
]

_SOURCES = {s.value: s for s in GrantSource}


def grant_from_row(row: asyncpg.Record) -> Grant:
    return Grant(
        customer_id=row["customer_id"],
        grant_id=row["grant_id"],
        feature=row["feature"],
        amount=row["amount"],
        priority=row["priority"],
        effective_at=row["effective_at"],
        expires_at=row["expires_at"],
        source=_SOURCES[row["source"]],
        idempotency_key=row["idempotency_key"],
        created_at=row["created_at"],
        burned=row["burned"],
        voided_at=row["voided_at"],
        spent_at=row["spent_at"],
    )


async def create(
    conn: Conn | asyncpg.Pool, grant: Grant, payload_hash: bytes
) -> tuple[Grant, bool]:
    """Stores a grant under its key: (the grant, False); when the key holds the same grant
    already, (that grant, True); with another grant, GrantKeyConflict."""
    row = await conn.fetchrow(
        q.INSERT_GRANT,
        grant.customer_id,
        grant.grant_id,
        grant.feature,
        grant.amount,
        grant.priority,
        grant.effective_at,
        grant.expires_at,
        grant.source.value,
        grant.idempotency_key,
        payload_hash,
        grant.created_at,
    )
    if row is not None:
        return grant_from_row(row), False
    seen = await conn.fetchrow(q.GRANT_BY_KEY, grant.customer_id, grant.idempotency_key)
    assert seen is not None  # grants are never deleted
    if bytes(seen["payload_hash"]) != payload_hash:
        raise GrantKeyConflict(seen["grant_id"])
    return grant_from_row(seen), True


async def top_up(
    pool: asyncpg.Pool,
    grant: Grant,
    payload_hash: bytes,
    logged: tuple[MeteredFeature, Period] | None,
) -> tuple[Grant, bool]:
    """`create`, logging the new grant as a change when `logged` gives the customer's prepaid
    feature and the period containing now."""
    async with pool.acquire() as conn, conn.transaction():
        stored, duplicate = await create(conn, grant, payload_hash)
        if logged is not None and not duplicate:
            await log_grant(conn, stored, logged[0], logged[1], grant.created_at)
        elif not duplicate:  # not prepaid in the plan read: checks still hear of it
            await changes.notify(conn, [grant.customer_id])
    return stored, duplicate


async def void(
    pool: asyncpg.Pool,
    customer_id: str,
    grant_id: str,
    now: dt.datetime,
    logged: Callable[[str], tuple[MeteredFeature, Period] | None] = lambda _: None,
) -> tuple[Grant, int] | None:
    """Voids a grant from `now` on: (the grant, the units that removed); None when there is no
    such grant. A grant voided, spent or expired already is answered as it is, with 0.
    `logged(feature)`: the customer's prepaid feature and the period containing now, to log
    the change."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(q.LOCK_GRANT, customer_id, grant_id)
        if row is None:
            return None
        grant = grant_from_row(row)
        if grant.state(now) not in (GrantState.ACTIVE, GrantState.PENDING):
            return grant, 0  # voided, spent or expired already: nothing left to remove
        removed = grant.amount - grant.burned
        row = await conn.fetchrow(q.VOID_GRANT, customer_id, grant_id, now)
        assert row is not None
        voided = grant_from_row(row)
        where = logged(voided.feature)
        if where is not None:
            await log_grant(conn, voided, where[0], where[1], now)
        else:  # not prepaid in the plan read: checks still hear of it
            await changes.notify(conn, [customer_id])
        return voided, removed


async def burned_by(pool: asyncpg.Pool, customer_id: str, event_id: str) -> int:
    return int(await pool.fetchval(q.BURNED_BY, customer_id, event_id))


async def listed(pool: asyncpg.Pool, customer_id: str, feature: str) -> list[Grant]:
    return credits.in_burn_order(
        grant_from_row(r) for r in await pool.fetch(q.LIST_GRANTS, customer_id, feature)
    )


async def live(conn: Conn | asyncpg.Pool, customer_id: str, since: dt.datetime) -> list[Grant]:
    """All the customer's grants usage may still burn, or that expired at or after `since`."""
    return [grant_from_row(r) for r in await conn.fetch(q.CUSTOMER_GRANTS, customer_id, since)]


async def credit(
    conn: Conn | asyncpg.Pool,
    customer_id: str,
    features: dict[str, MeteredFeature],
    period: Period,
    now: dt.datetime,
) -> dict[str, domain.Credit]:
    """Per prepaid feature, its grants as usage timed `now` sees them, the plan's grants of
    `period` counted whether made yet or not. A read."""
    grants = await live(conn, customer_id, min(period.start, now))
    return {
        name: credits.credit_of(customer_id, feature, grants, period, now)
        for name, feature in features.items()
    }


@dataclasses.dataclass(frozen=True)
class Wanted:
    """A customer's prepaid feature whose grants a burner needs, and the periods its usage
    falls in."""

    customer_id: str
    feature: MeteredFeature
    spans: Sequence[Period]

    @property
    def key(self) -> tuple[str, str]:
        return self.customer_id, self.feature.meter


async def lock(
    conn: Conn,
    wanted: Sequence[Wanted],
    now: dt.datetime,
    clock: Callable[[], dt.datetime],
) -> tuple[dict[tuple[str, str], list[Grant]], dt.datetime]:
    """Inside a transaction that holds the totals rows the burns count in: the grants of each
    wanted customer and feature, locked (in one statement, in customer order), after making the
    plan's grants of those of its periods that have not ended (their keys make this safe to
    race); and the time to burn them at: `now`, or the clock once the grants are locked if
    later, so that no grant is burned after the lock-holder before it saw it expire (and made
    the next period's rollover from it)."""
    ordered = sorted(wanted, key=lambda w: w.key)
    (customer_id,) = {w.customer_id for w in ordered}  # every statement names one customer
    sinces = [min([now, *(p.start for p in w.spans)]) for w in ordered]
    rows = await conn.fetch(
        q.LOCK_GRANTS_OF,
        [w.customer_id for w in ordered],
        [w.feature.meter for w in ordered],
        sinces,
        customer_id,
    )
    now = max(now, clock())
    grants: dict[tuple[str, str], list[Grant]] = {w.key: [] for w in ordered}
    for r in rows:
        grants[(r["customer_id"], r["feature"])].append(grant_from_row(r))
    missing = [
        dataclasses.replace(g, grant_id=ids.new_event_id())
        for w in ordered
        if w.feature.grant is not None
        for p in w.spans
        if p.end > now
        for g in credits.period_grants(
            w.customer_id, w.feature.meter, w.feature.grant, p, grants[w.key], now
        )
    ]
    if not missing:
        return grants, now
    made = await conn.fetch(
        q.INSERT_PLAN_GRANTS,
        [g.customer_id for g in missing],
        [g.grant_id for g in missing],
        [g.feature for g in missing],
        [g.amount for g in missing],
        [g.priority for g in missing],
        [g.effective_at for g in missing],
        [g.expires_at for g in missing],
        [g.source.value for g in missing],
        [g.idempotency_key for g in missing],
        now,
    )
    if len(made) < len(missing):  # another burner made some first: lock them, newest last
        mine = {(r["customer_id"], r["idempotency_key"]) for r in made}
        theirs = [g for g in missing if (g.customer_id, g.idempotency_key) not in mine]
        made = [
            *made,
            *await conn.fetch(
                q.LOCK_GRANTS_BY_KEY,
                [g.customer_id for g in theirs],
                [g.idempotency_key for g in theirs],
                customer_id,
            ),
        ]
    for r in made:
        grants[(r["customer_id"], r["feature"])].append(grant_from_row(r))
    return grants, now


async def follow_periods(
    conn: Conn,
    customer_id: str,
    schedule: Sequence[periods.Stored],
    start: dt.datetime,
    now: dt.datetime,
) -> None:
    """A webhook confirmed a period starting at `start` (`schedule`: the customer's periods
    now): the plan's grants follow the boundaries. Each plan (and rollover) grant it moves ends
    with the period that contains its start (the start of the period it was made for); when two
    land in one period, the earlier keeps it and the later is voided (what it paid for stays
    paid)."""
    claimed: set[tuple[str, GrantSource, dt.datetime]] = set()
    moved = [grant_from_row(r) for r in await conn.fetch(q.PLAN_GRANTS_FROM, customer_id, start)]
    for g in sorted(moved, key=lambda g: (g.feature, g.source, g.effective_at, g.grant_id)):
        period = periods.period_at(schedule, g.effective_at)
        key = (g.feature, g.source, period.start)
        if key in claimed:
            if g.voided_at is None:
                await conn.execute(q.VOID_GRANT, customer_id, g.grant_id, now)
            continue
        claimed.add(key)
        if g.expires_at != period.end:
            await conn.execute(q.SET_GRANT_EXPIRY, customer_id, g.grant_id, period.end)


@dataclasses.dataclass(frozen=True)
class Usage:
    """One stored event of a prepaid feature, to burn grants: its period's totals row and the
    state it was stored in ('pending', or 'unbilled' when the customer has no provider)."""

    event_id: str
    quantity: int
    event_time: dt.datetime
    period_start: dt.datetime
    state: str


@dataclasses.dataclass(frozen=True)
class Burner:
    """A customer's prepaid feature, its grants (locked) and its events to burn them, in order."""

    customer_id: str
    feature: MeteredFeature
    aggregation: Aggregation
    grants: Sequence[Grant]
    events: Sequence[Usage]


async def burn(
    conn: Conn, burners: Sequence[Burner], now: dt.datetime
) -> tuple[list[asyncpg.Record], list[list[Grant]]]:
    """Burns each burner's grants for its events, in order, and stores in one statement what
    each event burned, the part of it grants paid for and the state that leaves it in, and the
    totals rows' counters. Returns the totals rows changed, and each burner's grants as the
    burns left them."""
    spent_rows: list[tuple[str, str, int]] = []
    burn_rows: list[tuple[str, str, str, int]] = []
    event_rows: list[tuple[str, str, int, str]] = []
    deltas: dict[tuple[str, str, dt.datetime], list[int]] = {}
    afters = []
    for b in burners:
        burns, after = credits.burn(
            b.grants, b.aggregation, [(e.quantity, e.event_time) for e in b.events], now
        )
        afters.append(after)
        for g, before in zip(after, b.grants, strict=True):
            if g.burned != before.burned:
                spent_rows.append((b.customer_id, g.grant_id, g.burned - before.burned))
        for e, burned in zip(b.events, burns, strict=True):
            cover = credits.covering(b.feature, b.aggregation, e.quantity, burned, e.state)
            burn_rows.extend((b.customer_id, e.event_id, g, n) for g, n in burned.taken)
            if cover.state == e.state and cover.covered == 0:
                continue
            event_rows.append((b.customer_id, e.event_id, cover.covered, cover.state))
            d = deltas.setdefault((b.customer_id, b.feature.meter, e.period_start), [0, 0, 0, 0])
            for n, change in enumerate(cover.counts(e.state, e.quantity)):
                d[n] += change
    if not event_rows and not burn_rows:
        return [], afters
    (customer_id,) = {b.customer_id for b in burners}  # every statement names one customer
    rows = sorted(deltas)
    changed = await conn.fetch(
        q.APPLY_BURNS,
        [r[0] for r in spent_rows],
        [r[1] for r in spent_rows],
        [r[2] for r in spent_rows],
        [r[0] for r in burn_rows],
        [r[1] for r in burn_rows],
        [r[2] for r in burn_rows],
        [r[3] for r in burn_rows],
        [r[0] for r in event_rows],
        [r[1] for r in event_rows],
        [r[2] for r in event_rows],
        [r[3] for r in event_rows],
        [k[0] for k in rows],
        [k[1] for k in rows],
        [k[2] for k in rows],
        [deltas[k][0] for k in rows],
        [deltas[k][1] for k in rows],
        [deltas[k][2] for k in rows],
        [deltas[k][3] for k in rows],
        now,
        customer_id,
    )
    return changed, afters


def credit_detail(
    customer_id: str,
    feature: MeteredFeature,
    grants: Sequence[Grant],
    period: Period,
    now: dt.datetime,
) -> dict[str, list[object]]:
    """The change-log detail of a feature's credit: {feature: Credit as JSON}."""
    return {feature.meter: credits.credit_of(customer_id, feature, grants, period, now).to_json()}


async def log_grant(
    conn: Conn,
    grant: Grant,
    feature: MeteredFeature,
    period: Period,
    now: dt.datetime,
) -> None:
    """Logs a grant created or voided as a change of the customer's figures: the feature's
    totals in `period` (the one containing now), and its credit."""
    grants = await live(conn, grant.customer_id, min(now, period.start))
    row = await conn.fetchrow(queries.METER_TOTALS, grant.customer_id, feature.meter, period.start)
    totals = totals_from_row(row) if row and row["event_count"] is not None else domain.Totals()
    detail = {
        "credit": credit_detail(grant.customer_id, feature, grants, period, now),
        "grant_id": grant.grant_id,
    }
    change = changes.Change(
        grant.customer_id, "credit", period.start, period.end, {feature.meter: totals}, detail
    )
    await changes.append(conn, [change], now)
