"""Billing periods: cadences on a calendar grid, the periods a customer's webhooks confirmed, the
ones projected past (and before) them, and how a webhook rewrites them. Pure; everything in UTC.

For each customer every instant belongs to exactly one period:
- inside a confirmed (stored) period: that period;
- after a confirmed period and before the next one (or for ever, after the last): the periods of
  the earlier one's cadence, the first starting where it ends and the last cut at the next start;
- before the first confirmed period: the periods of its cadence, the last cut at its start.
"""

from __future__ import annotations

import bisect
import calendar
import dataclasses
import datetime as dt
import enum
from collections.abc import Iterator, Sequence

# Times a customer's periods and events may take: far from datetime's own limits, so that
# stepping a cadence from any of them never leaves the calendar.
EARLIEST = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
LATEST = dt.datetime(9000, 1, 1, tzinfo=dt.UTC)
MAX_INTERVAL_COUNT = {  # at most about ten years a period
    "day": 3660,
    "week": 520,
    "month": 120,
    "year": 10,
}


class Interval(enum.StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"


class Source(enum.StrEnum):
    CONFIRMED = "confirmed"
    PROJECTED = "projected"


@dataclasses.dataclass(frozen=True)
class Period:
    start: dt.datetime
    end: dt.datetime
    source: Source = Source.CONFIRMED

    @property
    def bounds(self) -> tuple[dt.datetime, dt.datetime]:
        return self.start, self.end

    def contains(self, when: dt.datetime) -> bool:
        return self.start <= when < self.end


def _add_months(when: dt.datetime, months: int) -> dt.datetime:
    """`when` moved by whole months, its day clamped to the target month's length."""
    years, month0 = divmod(when.month - 1 + months, 12)
    year, month = when.year + years, month0 + 1
    return when.replace(year=year, month=month, day=min(when.day, _month_days(year, month)))


def _month_days(year: int, month: int) -> int:
    return calendar.monthrange(year, month)[1]


@dataclasses.dataclass(frozen=True)
class Cadence:
    """Periods `count` `interval`s long whose boundaries are the anchor moved by whole periods.
    Month and year boundaries keep the anchor's day, clamped in shorter months (an anchor on the
    31st gives the 30th, then the 31st again, as Stripe's billing cycle anchor does)."""

    interval: Interval
    count: int
    anchor: dt.datetime

    def boundary(self, k: int) -> dt.datetime:
        """The k-th boundary after the anchor (before it when k < 0)."""
        if self.interval is Interval.DAY:
            return self.anchor + dt.timedelta(days=k * self.count)
        if self.interval is Interval.WEEK:
            return self.anchor + dt.timedelta(weeks=k * self.count)
        months = 12 if self.interval is Interval.YEAR else 1
        return _add_months(self.anchor, k * self.count * months)

    def _index(self, when: dt.datetime) -> int:
        """k such that boundary(k) <= when < boundary(k + 1)."""
        a = self.anchor
        if self.interval in (Interval.DAY, Interval.WEEK):
            step = dt.timedelta(days=self.count * (7 if self.interval is Interval.WEEK else 1))
            return (when - a) // step
        months = self.count * (12 if self.interval is Interval.YEAR else 1)
        k = ((when.year - a.year) * 12 + when.month - a.month) // months
        while self.boundary(k) > when:
            k -= 1
        while self.boundary(k + 1) <= when:
            k += 1
        return k

    def period_at(self, when: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
        k = self._index(when)
        return self.boundary(k), self.boundary(k + 1)


def anchor_from_end(
    interval: Interval, count: int, start: dt.datetime, end: dt.datetime
) -> dt.datetime:
    """The anchor implied by a period: its end, with the day of month the period shows. A
    month-end (Feb 28) may stand for a later day (the 29th to 31st): the latest day that also
    gives the period's start is taken, so [31 Jan, 28 Feb) keeps the 31st."""
    if interval in (Interval.DAY, Interval.WEEK):
        return end
    last_day = _month_days(end.year, end.month)
    if end.day < last_day:
        return end
    months = count * (12 if interval is Interval.YEAR else 1)
    for day in range(31, end.day, -1):
        # a boundary of the same grid on which `day` exists: walk back whole periods
        for j in range(1, 49):
            earlier = _add_months(end, -j * months)
            if _month_days(earlier.year, earlier.month) >= day:
                anchor = earlier.replace(day=day)
                if Cadence(interval, count, anchor).boundary(j - 1) == start:
                    return anchor
                break
    return end


def fits(interval: Interval, count: int, start: dt.datetime, end: dt.datetime) -> bool:
    """Whether [start, end) is one whole period of this cadence."""
    cadence = Cadence(interval, count, anchor_from_end(interval, count, start, end))
    return cadence.period_at(start) == (start, end)


# Cadences tried, in order, when a webhook gives a period without one.
_GUESSES = (
    (Interval.MONTH, 1),
    (Interval.YEAR, 1),
    (Interval.WEEK, 1),
    (Interval.DAY, 1),
    (Interval.MONTH, 3),
    (Interval.MONTH, 6),
)


def infer(
    start: dt.datetime, end: dt.datetime, previous: Cadence | None = None
) -> tuple[Interval, int]:
    """The cadence of a period given without one: the customer's own cadence when the period is
    one whole period of it; else the first of month, year, week, day, quarter and half-year
    that fits; else (a short or long first period, a trial) the customer's cadence, or monthly
    for a new customer."""
    guesses = list(_GUESSES)
    if previous is not None:
        guesses.insert(0, (previous.interval, previous.count))
    for interval, count in guesses:
        if fits(interval, count, start, end):
            return interval, count
    if previous is not None:
        return previous.interval, previous.count
    return Interval.MONTH, 1


@dataclasses.dataclass(frozen=True)
class Stored:
    """A confirmed period as stored, with the cadence that follows it."""

    start: dt.datetime
    end: dt.datetime
    cadence: Cadence


def period_at(stored: Sequence[Stored], when: dt.datetime) -> Period:
    """The period containing `when`. `stored`: a customer's confirmed periods, sorted by start
    and not overlapping; it may leave out periods that end at or before `when`'s neighbour (the
    hot paths pass only the last one for times at or after its start)."""
    if not stored:
        raise ValueError("a customer without periods has none to find")
    i = bisect.bisect_right([p.start for p in stored], when) - 1
    if i < 0:  # before the first confirmed period
        first = stored[0]
        start, end = first.cadence.period_at(when)
        return Period(start, min(end, first.start), Source.PROJECTED)
    p = stored[i]
    if when < p.end:
        return Period(p.start, p.end, Source.CONFIRMED)
    start, end = p.cadence.period_at(when)
    start = max(start, p.end)
    if i + 1 < len(stored):
        end = min(end, stored[i + 1].start)
    return Period(start, end, Source.PROJECTED)


def periods_over(
    stored: Sequence[Stored], start: dt.datetime, end: dt.datetime
) -> Iterator[Period]:
    """Every period that overlaps [start, end), in order."""
    when = start
    while when < end:
        p = period_at(stored, when)
        yield p
        when = p.end


def rewrite(stored: Sequence[Stored], new: Stored) -> list[Stored]:
    """The confirmed periods after a webhook confirms `new`: those before its start stay (one
    that holds its start is cut there), those from its start on are replaced by it."""
    out = [p for p in stored if p.start < new.start]
    if out and out[-1].end > new.start:
        out[-1] = dataclasses.replace(out[-1], end=new.start)
    out.append(new)
    return out


def changed(
    new: Sequence[Stored], rows: Sequence[tuple[dt.datetime, dt.datetime]]
) -> tuple[list[tuple[dt.datetime, dt.datetime]], list[Period]]:
    """Which of `rows` (the bounds of a customer's totals, each a period before the change) are
    no longer periods of `new`, and the periods of `new` that cover them: exactly the totals to
    drop and the ones to rebuild from events."""
    gone = [r for r in rows if period_at(new, r[0]).bounds != r]
    rebuild: dict[tuple[dt.datetime, dt.datetime], Period] = {}
    for start, end in gone:
        for p in periods_over(new, start, end):
            rebuild[p.bounds] = p
    return gone, sorted(rebuild.values(), key=lambda p: p.start)


def cadence_for(
    start: dt.datetime,
    end: dt.datetime,
    interval: Interval | None,
    count: int,
    anchor: dt.datetime | None,
    previous: Cadence | None,
) -> Cadence:
    """The cadence a webhook's period [start, end) sets: the one given, else inferred (`infer`);
    anchored where given, else on the period's end. A period that is a whole period of the
    customer's cadence keeps it, anchor included, unless the webhook names another cadence or
    an anchor."""
    if (
        previous is not None
        and anchor is None
        and interval in (None, previous.interval)
        and (interval is None or count == previous.count)
        and previous.period_at(start) == (start, end)
    ):
        return previous
    if interval is None:
        interval, count = infer(start, end, previous)
    return Cadence(interval, count, anchor or anchor_from_end(interval, count, start, end))
