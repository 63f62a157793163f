"""The month partitions of usage_events (by recorded_at, in UTC; see migration 0010): making
them ahead, and moving rows the DEFAULT partition caught into their month's own partition."""

from __future__ import annotations

import datetime as dt
import re
from typing import TypeAlias

import asyncpg

from usage_service.storage import partitions_queries as q
from usage_service.storage.rows import Conn

AnyConn: TypeAlias = "Conn | asyncpg.Connection"  # a pool's or migrate's

AHEAD = 2  # months made ahead of the current one
_NAME = re.compile(r"usage_events_(\d{4})_(\d{2})")


def month_of(when: dt.datetime) -> dt.date:
    """The first day of the month (UTC) holding `when`."""
    return when.astimezone(dt.UTC).date().replace(day=1)


def next_month(month: dt.date) -> dt.date:
    return dt.date(month.year + month.month // 12, month.month % 12 + 1, 1)


def name(month: dt.date) -> str:
    return f"usage_events_{month.year:04d}_{month.month:02d}"


def month_named(relname: str) -> dt.date | None:
    """The month of a month partition's name; None for any other (the DEFAULT partition)."""
    match = _NAME.fullmatch(relname)
    return dt.date(int(match[1]), int(match[2]), 1) if match else None


def bounds(month: dt.date) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime(month.year, month.month, 1, tzinfo=dt.UTC)
    end_month = next_month(month)
    return start, dt.datetime(end_month.year, end_month.month, 1, tzinfo=dt.UTC)


def sql(template: str, month: dt.date) -> str:
    """A partitions_queries template for a month: its table's name and bounds."""
    start, end = bounds(month)
    return template.format(name=name(month), start=start.isoformat(), end=end.isoformat())


async def months(conn: AnyConn) -> list[dt.date]:
    """The months that have their own partition, oldest first."""
    found = [month_named(r["relname"]) for r in await conn.fetch(q.PARTITIONS)]
    return sorted(m for m in found if m is not None)


async def ensure(conn: AnyConn, now: dt.datetime, ahead: int = AHEAD) -> list[dt.date]:
    """Makes the partitions of the month of `now` and the `ahead` months after it, and of every
    month the DEFAULT partition holds rows of (moving them in); returns the months made."""
    wanted = [month_of(now)]
    for _ in range(ahead):
        wanted.append(next_month(wanted[-1]))
    made: list[dt.date] = []
    async with conn.transaction():
        await conn.execute(q.PARTITIONS_LOCK)
        have = set(await months(conn))
        caught = [month_of(r["month"]) for r in await conn.fetch(q.DEFAULT_MONTHS)]
    for month in sorted(set(wanted) | set(caught)):
        if month in have:
            continue
        async with conn.transaction():
            await conn.execute(q.PARTITIONS_LOCK)
            if month in set(await months(conn)):
                continue
            await conn.execute(q.LOCK_DEFAULT)
            await conn.execute(sql(q.NEW_MONTH, month))
            await conn.execute(sql(q.MOVE_FROM_DEFAULT, month))
            await conn.execute(sql(q.ATTACH_MONTH, month))
        made.append(month)
    return made
