"""The change log that WatchUsage streams: each committed change of a customer's figures, with a
version strictly increasing per customer in commit order, and a NOTIFY at commit.

A writing transaction appends its changes last, after every other lock it takes (customers,
events, totals rows), so the head row's lock, held to the commit, orders commits and versions
the same way and never deadlocks with the core's lock order. Statements: changes_queries.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import asyncpg

from usage_service import domain
from usage_service.storage import changes_queries as q
from usage_service.storage.rows import Conn

KINDS = ("usage", "rollover", "customer", "drain", "threshold", "credit")
# The totals columns a change keeps per meter, in this order.
FIGURES = (
    "event_count",
    "quantity_sum",
    "quantity_max",
    "last_quantity",
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
class Change:
    """One committed change of a customer's figures in one period (None: outside every known
    period, a customer known only by its usage)."""

    customer_id: str
    kind: str
    period_start: dt.datetime | None
    period_end: dt.datetime | None
    figures: Mapping[str, domain.Totals]  # meter -> the period's totals after the change
    detail: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # a crossing's alert


@dataclasses.dataclass(frozen=True)
class Logged:
    """A change as the log keeps it."""

    change: Change
    version: int
    committed_at: dt.datetime


def notified(payload: object) -> list[str] | None:
    """The customers a NOTIFY of the log names; None: any customer (too many to name)."""
    text = str(payload)
    if text == "*":
        return None
    try:
        named = json.loads(text)
    except ValueError:
        return None
    return [c for c in named if isinstance(c, str)] if isinstance(named, list) else None


def figures_json(figures: Mapping[str, domain.Totals]) -> dict[str, list[int]]:
    return {m: [getattr(t, f) for f in FIGURES] for m, t in figures.items()}


def figures_from_json(raw: Mapping[str, Sequence[int]]) -> dict[str, domain.Totals]:
    # changes logged before the covered counters were kept have none: 0
    return {m: _totals(dict(zip(FIGURES, values, strict=False))) for m, values in raw.items()}


def _totals(values: Mapping[str, int]) -> domain.Totals:
    v = values
    return domain.Totals(
        event_count=v["event_count"],
        quantity_sum=v["quantity_sum"],
        quantity_max=v["quantity_max"],
        last_quantity=v["last_quantity"],
        reported_count=v["reported_count"],
        reported_sum=v["reported_sum"],
        failed_count=v["failed_count"],
        failed_sum=v["failed_sum"],
        unbilled_count=v["unbilled_count"],
        unbilled_sum=v["unbilled_sum"],
        covered_count=v.get("covered_count", 0),
        covered_sum=v.get("covered_sum", 0),
    )


class _Entry(NamedTuple):
    """A change as ADD_CHANGES takes it."""

    kind: str
    period_start: dt.datetime | None
    period_end: dt.datetime | None
    figures: str  # JSON text
    detail: str  # JSON text


async def append_totals(
    conn: Conn,
    kind: str,
    rows: Iterable[asyncpg.Record],
    now: dt.datetime,
    details: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, int]:
    """`append` of one change per customer and period of usage_totals rows (as RETURNING
    gives them, CHANGED_TOTALS), their figures written straight from the rows; `details`: a
    customer's detail, on each of its changes."""
    grouped: dict[tuple[str, dt.datetime, dt.datetime], list[str]] = {}
    for r in rows:
        figures = ",".join([str(r[f]) for f in FIGURES])
        key = (r["customer_id"], r["period_start"], r["period_end"])
        grouped.setdefault(key, []).append(f"{json.dumps(r['meter'])}:[{figures}]")
    entries: dict[str, list[_Entry]] = {}
    for c, start, end in sorted(grouped):
        detail = json.dumps(details.get(c, {})) if details else "{}"
        figures = "{" + ",".join(grouped[(c, start, end)]) + "}"
        entries.setdefault(c, []).append(_Entry(kind, start, end, figures, detail))
    return await _append(conn, entries, now)


async def append(conn: Conn, changes: Sequence[Change], now: dt.datetime) -> dict[str, int]:
    """Appends changes inside the writing transaction, as its last statements; returns each
    customer's latest version. Watchers are notified when the transaction commits."""
    entries: dict[str, list[_Entry]] = {}
    for c in changes:  # a customer's changes keep their order
        entries.setdefault(c.customer_id, []).append(
            _Entry(
                c.kind,
                c.period_start,
                c.period_end,
                json.dumps(figures_json(c.figures)),
                json.dumps(dict(c.detail)),
            )
        )
    return await _append(conn, entries, now)


async def _append(
    conn: Conn, entries: Mapping[str, Sequence[_Entry]], now: dt.datetime
) -> dict[str, int]:
    """Each customer's changes, customers in order, in two statements per customer (each sent
    for every customer at once): the heads move first; a customer's first usage change in a
    later period than its head had is a rollover."""
    customers = sorted(entries)
    if not customers:
        return {}
    heads = await conn.fetchmany(
        q.ADVANCE_HEAD,
        [
            (c, len(entries[c]), max(starts, default=None))
            for c in customers
            for starts in [[e.period_start for e in entries[c] if e.period_start is not None]]
        ],
    )
    args: list[tuple[object, ...]] = []
    for c, head in zip(customers, heads, strict=True):
        mine = entries[c]
        kinds = [e.kind for e in mine]
        if head["rolled"]:
            at = next(i for i, e in enumerate(mine) if e.period_start == head["period_start"])
            if kinds[at] == "usage":
                kinds[at] = "rollover"
        first = head["version"] - len(mine) + 1
        args.append(
            (
                c,
                list(range(first, first + len(mine))),
                kinds,
                [e.period_start for e in mine],
                [e.period_end for e in mine],
                [e.figures for e in mine],
                now,
                [e.detail for e in mine],
            )
        )
    added = await conn.fetchmany(q.ADD_CHANGES, args)
    return {c: int(r["version"]) for c, r in zip(customers, added, strict=True)}


async def notify(conn: Conn | asyncpg.Connection, customer_ids: Sequence[str] | None) -> None:
    """Inside a writing transaction that changed figures checks read without appending a
    change: its listeners hear of these customers (None: of any) at commit."""
    payload = "*" if customer_ids is None else json.dumps(sorted(set(customer_ids)))
    await conn.execute(q.NOTIFY, payload if len(payload) <= q.MAX_PAYLOAD else "*")


async def rollover(
    conn: Conn,
    customer_id: str,
    start: dt.datetime,
    end: dt.datetime,
    figures: Mapping[str, domain.Totals],
    now: dt.datetime,
) -> int | None:
    """Records that the period [start, end) began, unless a change in it (or later) already
    did; returns its version, or None."""
    version = await conn.fetchval(q.ROLLOVER_HEAD, customer_id, start)
    if version is None:
        return None
    figures_text = json.dumps(figures_json(figures))
    await conn.execute(
        q.ADD_CHANGES,
        customer_id,
        [version],
        ["rollover"],
        [start],
        [end],
        [figures_text],
        now,
        ["{}"],
    )
    return int(version)


async def head(conn: Conn | asyncpg.Pool, customer_id: str) -> int:
    """The customer's latest version (0 before any change)."""
    row = await conn.fetchrow(q.HEAD, customer_id)
    return 0 if row is None else int(row["version"])


async def since(
    conn: Conn | asyncpg.Pool, customer_id: str, version: int, limit: int
) -> list[Logged]:
    """The customer's changes after `version`, oldest first, at most `limit`."""
    rows = await conn.fetch(q.SINCE, customer_id, version, limit)
    return [
        Logged(
            Change(
                customer_id,
                r["kind"],
                r["period_start"],
                r["period_end"],
                figures_from_json(_json(r["figures"])),
                _json(r["detail"]),
            ),
            r["version"],
            r["committed_at"],
        )
        for r in rows
    ]


async def oldest(conn: Conn | asyncpg.Pool, customer_id: str) -> int | None:
    """The oldest version still kept, None when none is."""
    value = await conn.fetchval(q.OLDEST, customer_id)
    return None if value is None else int(value)


async def forget(pool: asyncpg.Pool, before: dt.datetime, batch: int) -> int:
    """Deletes changes committed before `before`, a batch at a time, one customer at a time;
    returns how many."""
    deleted = 0
    while True:
        rows = await pool.fetch(q.FORGETTABLE, before, batch)
        versions: dict[str, list[int]] = {}
        for r in rows:
            versions.setdefault(r["customer_id"], []).append(r["version"])
        for customer_id, mine in versions.items():
            await pool.execute(q.FORGET, customer_id, mine)
        deleted += len(rows)
        if len(rows) < batch:
            return deleted


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value
