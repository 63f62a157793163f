"""A customer's billing periods in the database: confirming a webhook's period (rewriting the
confirmed periods from its start on and rebuilding exactly the totals whose periods changed), and
verifying that every totals row equals what the events say."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence

import asyncpg

from usage_service import domain
from usage_service.domain import periods
from usage_service.domain.errors import PeriodsPruned
from usage_service.storage import changes, credits_queries, queries
from usage_service.storage.rows import Conn, customer_from_row, stored_periods

_TICK = dt.timedelta(microseconds=1)  # PostgreSQL's resolution: [first, last + tick) holds last
_FIGURES = (
    "event_count",
    "quantity_sum",
    "quantity_max",
    "last_quantity",
    "last_event_time",
    "last_seq",
    "reported_count",
    "reported_sum",
    "failed_count",
    "failed_sum",
    "unbilled_count",
    "unbilled_sum",
    "covered_count",
    "covered_sum",
)


@dataclasses.dataclass(frozen=True)
class CadenceRequest:
    """The cadence a webhook gave: interval None means infer it from the period."""

    interval: periods.Interval | None = None
    count: int = 1
    anchor: dt.datetime | None = None


async def confirm(
    conn: Conn,
    c: domain.Customer,
    asked: CadenceRequest,
    now: dt.datetime,
    unbilled_meters: Sequence[str] = (),
) -> domain.Customer:
    """Inside a transaction: locks the customer (waiting for recorders counting on its periods),
    confirms [c.period_start, c.period_end) with its cadence and writes the customer. The usage
    of a customer known only by its usage is attributed to its provider, and never billed for
    `unbilled_meters` (its plan's meters paid by credits alone)."""
    await conn.execute(queries.INSERT_PLACEHOLDER, c.customer_id)
    before_row = await conn.fetchrow(queries.GET_CUSTOMER_FOR_UPDATE, c.customer_id)
    assert before_row is not None
    before = customer_from_row(before_row)
    old = (await stored_periods(conn, [c.customer_id]))[c.customer_id] if before else []
    cadence = periods.cadence_for(
        c.period_start,
        c.period_end,
        asked.interval,
        asked.count,
        asked.anchor,
        before.cadence if before else None,
    )
    confirmed = periods.Stored(c.period_start, c.period_end, cadence)
    pruned_before = before_row["pruned_before"]
    if pruned_before is not None and confirmed.start < pruned_before:
        raise PeriodsPruned(pruned_before)
    if before is None:  # its usage so far is billed to the provider it starts with
        await conn.execute(
            queries.ATTRIBUTE_EVENTS, c.customer_id, c.provider.value, list(unbilled_meters)
        )
    if c.provider is not domain.Provider.NONE:
        await conn.execute(
            queries.SAVE_CUSTOMER_PROVIDER,
            c.customer_id,
            c.provider.value,
            c.provider_customer_id,
            dict(c.subscription_items),
            now,
        )
    new = periods.rewrite(old, confirmed)
    if new != old:
        await conn.execute(queries.DROP_PERIODS_FROM, c.customer_id, confirmed.start)
        await conn.execute(queries.CUT_PERIOD_AT, c.customer_id, confirmed.start)
        await conn.execute(
            queries.INSERT_PERIOD,
            c.customer_id,
            confirmed.start,
            confirmed.end,
            cadence.interval.value,
            cadence.count,
            cadence.anchor,
            now,
        )
        await _rebuild(conn, c.customer_id, new, counted=before is not None)
    row = await conn.fetchrow(
        queries.UPDATE_CUSTOMER,
        c.customer_id,
        c.plan_id,
        c.subscription_status.value,
        c.period_start,
        c.period_end,
        c.provider.value,
        c.provider_customer_id,
        dict(c.subscription_items),
        cadence.interval.value,
        cadence.count,
        cadence.anchor,
        now,
    )
    assert row is not None
    saved = customer_from_row(row)
    assert saved is not None
    return saved


async def _rebuild(
    conn: Conn, customer_id: str, new: Sequence[periods.Stored], counted: bool
) -> None:
    """Drops the totals rows that are no longer periods of `new` and rebuilds the periods that
    cover them from events. `counted` False: the customer had no periods, so none of its events
    counts in a period yet and all are bucketed."""
    rows = await conn.fetch(queries.TOTALS_BOUNDS, customer_id)
    bounds = [(r["period_start"], r["period_end"]) for r in rows]
    gone, rebuild = periods.changed(new, bounds)
    if not counted:
        span = await conn.fetchrow(queries.EVENTS_SPAN, customer_id)
        if span is not None and span["first"] is not None:
            rebuild = list(periods.periods_over(new, span["first"], span["last"] + _TICK))
    if gone:
        await conn.execute(queries.DROP_TOTALS, customer_id, [g[0] for g in gone])
    if rebuild:
        await conn.execute(
            queries.REBUILD_TOTALS,
            customer_id,
            [p.start for p in rebuild],
            [p.end for p in rebuild],
        )


@dataclasses.dataclass(frozen=True)
class Difference:
    customer_id: str
    meter: str
    period: tuple[dt.datetime, dt.datetime] | None  # None: the lifetime totals
    what: str

    def __str__(self) -> str:
        where = (
            "lifetime"
            if self.period is None
            else "{} .. {}".format(*(t.isoformat() for t in self.period))
        )
        return f"{self.customer_id} {self.meter} {where}: {self.what}"


async def verify_customer(conn: Conn, customer_id: str) -> list[Difference]:
    """Recomputes a customer's totals from its events (call inside a repeatable-read
    transaction, so both are read at one instant); returns every difference."""
    out: list[Difference] = []
    life = {r["meter"]: r for r in await conn.fetch(queries.CUSTOMER_LIFETIME, customer_id)}
    for r in await conn.fetch(queries.EVENT_LIFETIME, customer_id):
        kept = life.pop(r["meter"], None)
        kept_figures = (kept["event_count"], kept["quantity_sum"]) if kept else (0, 0)
        if kept_figures != (r["event_count"], r["quantity_sum"]):
            out.append(
                Difference(
                    customer_id,
                    r["meter"],
                    None,
                    f"lifetime (events, sum) kept {kept_figures}, "
                    f"events say {(r['event_count'], r['quantity_sum'])}",
                )
            )
    for meter, kept in life.items():
        if kept["event_count"] or kept["quantity_sum"]:
            out.append(Difference(customer_id, meter, None, "lifetime totals with no events"))
    out.extend(await _verify_burns(conn, customer_id))
    row = await conn.fetchrow(queries.GET_CUSTOMER, customer_id)
    customer = customer_from_row(row) if row else None
    rows = await conn.fetch(queries.CUSTOMER_TOTALS, customer_id)
    if customer is None:
        for r in rows:
            out.append(
                Difference(
                    customer_id,
                    r["meter"],
                    (r["period_start"], r["period_end"]),
                    "totals of a customer without periods",
                )
            )
        return out
    unattributed = await conn.fetchval(queries.UNATTRIBUTED_EVENTS, customer_id)
    if unattributed:
        what = f"{unattributed} events billed to no provider, neither decided nor unbilled"
        out.append(Difference(customer_id, "*", None, what))
    stored = (await stored_periods(conn, [customer_id]))[customer_id]
    pruned_before = await conn.fetchval(queries.PRUNED_BEFORE, customer_id)
    expected: dict[tuple[str, dt.datetime], asyncpg.Record] = {}
    span = await conn.fetchrow(queries.EVENTS_SPAN, customer_id)
    if span is not None and span["first"] is not None:
        over = list(periods.periods_over(stored, span["first"], span["last"] + _TICK))
        for r in await conn.fetch(
            queries.EVENT_TOTALS, customer_id, [p.start for p in over], [p.end for p in over]
        ):
            expected[(r["meter"], r["period_start"])] = r
    for r in rows:
        bounds = (r["period_start"], r["period_end"])
        if periods.period_at(stored, bounds[0]).bounds != bounds:
            out.append(Difference(customer_id, r["meter"], bounds, "totals row is not a period"))
        want = expected.pop((r["meter"], bounds[0]), None)
        if pruned_before is not None and bounds[1] <= pruned_before:
            continue  # some of its events were pruned: its totals outlive them
        for name in _FIGURES:
            have = r[name]
            should = want[name] if want is not None else (None if name == "last_event_time" else 0)
            if name in ("last_quantity", "last_seq") and want is None:
                continue
            if have != should:
                what = f"{name} {have}, events say {should}"
                out.append(Difference(customer_id, r["meter"], bounds, what))
    for (meter, _), want in expected.items():
        if pruned_before is not None and want["period_end"] <= pruned_before:
            continue
        out.append(
            Difference(
                customer_id,
                meter,
                (want["period_start"], want["period_end"]),
                f"{want['event_count']} events counted in no totals row",
            )
        )
    return out


async def _verify_burns(conn: Conn, customer_id: str) -> list[Difference]:
    """Every grant's burned units are the burns recorded against it, and every event's covered
    part is what its burns took (a count meter's event: one unit covers it whole)."""
    out = []
    for r in await conn.fetch(credits_queries.GRANT_BURNS, customer_id):
        if r["burned"] != r["burns"]:
            what = f"grant {r['grant_id']} burned {r['burned']}, its burns say {r['burns']}"
            out.append(Difference(customer_id, "*", None, what))
    for r in await conn.fetch(credits_queries.EVENT_BURNS, customer_id):
        whole = r["report_state"] == "covered"
        fits = r["covered"] == r["burns"] or (whole and r["burns"] == 1)
        if not fits or (whole and r["covered"] != r["quantity"]):
            what = (
                f"event {r['event_id']} ({r['report_state']}) covered {r['covered']} of "
                f"{r['quantity']}, its burns say {r['burns']}"
            )
            out.append(Difference(customer_id, r["meter"], None, what))
    return out


async def repair(conn: Conn, customer_id: str) -> None:
    """Inside a transaction: rebuilds all of a customer's totals (those after its pruned
    history) and its lifetime totals from its events, under the customer's row lock."""
    row = await conn.fetchrow(queries.GET_CUSTOMER_FOR_UPDATE, customer_id)
    customer = customer_from_row(row) if row else None
    pruned_before = row["pruned_before"] if row else None
    await conn.execute(queries.FOLD_PRUNED, customer_id)
    await changes.notify(conn, [customer_id])  # at commit: figures changed, no change logged
    await conn.execute(queries.RECOUNT_LIFETIME, customer_id)
    await conn.execute(queries.DROP_TOTALS_AFTER, customer_id, pruned_before)
    if customer is None:
        return
    stored = (await stored_periods(conn, [customer_id]))[customer_id]
    span = await conn.fetchrow(queries.EVENTS_SPAN, customer_id)
    if span is None or span["first"] is None:
        return
    first = max(span["first"], pruned_before) if pruned_before else span["first"]
    over = list(periods.periods_over(stored, first, span["last"] + _TICK))
    if pruned_before is not None:
        over = [p for p in over if p.end > pruned_before]
    await conn.execute(
        queries.REBUILD_TOTALS, customer_id, [p.start for p in over], [p.end for p in over]
    )


async def verify(
    pool: asyncpg.Pool,
    customer_ids: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
    fix: bool = False,
) -> list[Difference]:
    """`verify_customer` for the customers given, else for every customer with a row or
    events, in order; `progress(done, total)` after each. With `fix`, a customer with
    differences is repaired (`repair`) and verified again; the differences found first are
    returned."""
    ids = list(customer_ids)
    if not ids:
        ids = [r["customer_id"] for r in await pool.fetch(queries.ALL_CUSTOMER_IDS)]
    out: list[Difference] = []
    for done, customer_id in enumerate(ids, 1):
        async with (
            pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            found = await verify_customer(conn, customer_id)
        out.extend(found)
        if found and fix:
            async with pool.acquire() as conn, conn.transaction():
                await repair(conn, customer_id)
        if progress is not None:
            progress(done, len(ids))
    return out
