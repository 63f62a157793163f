"""Billing periods (domain.periods): the calendar grid of a cadence, month-end and leap-day
clamping, the anchor a period implies, cadence inference, and how confirmed periods, projection,
rewrites and rebuilds fit together; examples with concrete dates, then properties."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usage_service.domain.periods import (
    MAX_INTERVAL_COUNT,
    Cadence,
    Interval,
    Period,
    Source,
    Stored,
    anchor_from_end,
    cadence_for,
    changed,
    fits,
    infer,
    period_at,
    periods_over,
    rewrite,
)

D, W, M, Y = Interval.DAY, Interval.WEEK, Interval.MONTH, Interval.YEAR
C, P = Source.CONFIRMED, Source.PROJECTED
US = dt.timedelta(microseconds=1)
PROPS = settings(max_examples=80, deadline=None, derandomize=True)


def t(iso: str) -> dt.datetime:  # ISO, in UTC
    return dt.datetime.fromisoformat(iso).replace(tzinfo=dt.UTC)


def ts(isos: str) -> list[dt.datetime]:
    return [t(x) for x in isos.split()]


def pair(isos: str) -> tuple[dt.datetime, dt.datetime]:
    start, end = ts(isos)
    return start, end


def cad(i: Interval, n: int, anchor: str) -> Cadence:
    return Cadence(i, n, t(anchor))


def stored(start: str, end: str, i: Interval, n: int, anchor: str) -> Stored:
    return Stored(t(start), t(end), cad(i, n, anchor))


# -- the grid ------------------------------------------------------------------------------------

# the day of month of boundaries 0..23 of a monthly cadence anchored in January on that day
MONTH_ENDS = [
    ("2024-01-31", "31 29 31 30 31 30 31 31 30 31 30 31 31 28 31 30 31 30 31 31 30 31 30 31"),
    ("2024-01-30", "30 29 30 30 30 30 30 30 30 30 30 30 30 28 30 30 30 30 30 30 30 30 30 30"),
    ("2024-01-29", "29 29 29 29 29 29 29 29 29 29 29 29 29 28 29 29 29 29 29 29 29 29 29 29"),
    ("2025-01-31", "31 28 31 30 31 30 31 31 30 31 30 31 31 28 31 30 31 30 31 31 30 31 30 31"),
    ("2027-01-31", "31 28 31 30 31 30 31 31 30 31 30 31 31 29 31 30 31 30 31 31 30 31 30 31"),
]


@pytest.mark.parametrize(("anchor", "days"), MONTH_ENDS)
def test_monthly_boundaries_keep_the_anchor_day_clamped(anchor: str, days: str) -> None:
    cadence = cad(M, 1, anchor + "T13:45")
    for k, day in enumerate(int(x) for x in days.split()):
        year, month = int(anchor[:4]) + k // 12, k % 12 + 1
        assert cadence.boundary(k) == dt.datetime(year, month, day, 13, 45, tzinfo=dt.UTC), k


@pytest.mark.parametrize(
    ("cadence", "ks", "expected"),
    [
        (cad(M, 1, "2025-01-31"), (-1, -11, -23), "2024-12-31 2024-02-29 2023-02-28"),
        (cad(Y, 1, "2024-02-29"), (-1, 1, 3, 4), "2023-02-28 2025-02-28 2027-02-28 2028-02-29"),
        (cad(Y, 1, "2096-02-29"), (4, 8), "2100-02-28 2104-02-29"),  # 2100 is not a leap year
        (cad(Y, 2, "2024-02-29"), (1, 2), "2026-02-28 2028-02-29"),
        (cad(M, 3, "2025-01-31"), range(1, 5), "2025-04-30 2025-07-31 2025-10-31 2026-01-31"),
        (cad(M, 3, "2023-11-30"), (1, 2), "2024-02-29 2024-05-30"),
        (cad(M, 6, "2023-08-31"), range(1, 4), "2024-02-29 2024-08-31 2025-02-28"),
        (cad(W, 1, "2025-01-06T09"), (1, -1, 52), "2025-01-13T09 2024-12-30T09 2026-01-05T09"),
        (cad(W, 2, "2025-01-06"), (1, -1), "2025-01-20 2024-12-23"),
        (cad(D, 1, "2024-02-28T06"), (1, 2, -365), "2024-02-29T06 2024-03-01T06 2023-02-28T06"),
        (cad(D, 3, "2025-01-01"), (2, -1), "2025-01-07 2024-12-29"),
    ],
)
def test_boundaries(cadence: Cadence, ks: range | tuple[int, ...], expected: str) -> None:
    assert [cadence.boundary(k) for k in ks] == ts(expected)


@pytest.mark.parametrize(
    ("cadence", "when", "period"),
    [
        (cad(M, 1, "2025-01-31"), "2025-02-28", "2025-02-28 2025-03-31"),
        (cad(M, 1, "2025-01-31"), "2025-02-27T23:59:59.999999", "2025-01-31 2025-02-28"),
        (cad(Y, 1, "2024-02-29"), "2028-02-28T12", "2027-02-28 2028-02-29"),
        (cad(Y, 1, "2024-02-29"), "2028-02-29", "2028-02-29 2029-02-28"),
        (cad(M, 3, "2025-01-31"), "2025-05-01", "2025-04-30 2025-07-31"),
        (cad(W, 1, "2025-01-06T09"), "2025-01-01", "2024-12-30T09 2025-01-06T09"),
        (cad(D, 1, "2024-02-28T06"), "2024-02-29T05", "2024-02-28T06 2024-02-29T06"),
        (cad(D, 3, "2025-01-01"), "2025-01-07", "2025-01-07 2025-01-10"),
    ],
)
def test_cadence_period_at_examples(cadence: Cadence, when: str, period: str) -> None:
    assert list(cadence.period_at(t(when))) == ts(period)


# -- anchors and inference -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("i", "n", "period", "day", "after"),
    [
        (M, 1, "2025-01-31 2025-02-28", 31, "2025-03-31"),
        (M, 1, "2025-02-28 2025-03-31", 31, "2025-04-30"),
        (M, 1, "2025-01-28 2025-02-28", 28, "2025-03-28"),
        (M, 1, "2025-01-15 2025-02-28", 28, "2025-03-28"),  # a short first period
        (M, 1, "2025-01-30 2025-02-28", 30, "2025-03-30"),
        (M, 3, "2025-03-31 2025-06-30", 31, "2025-09-30"),
        (Y, 1, "2024-02-29 2025-02-28", 29, "2026-02-28"),
        (Y, 1, "2025-02-28 2026-02-28", 29, "2027-02-28"),  # on 29 Feb 2024's grid
        (Y, 1, "2027-02-28 2028-02-29", 29, "2029-02-28"),
        (W, 1, "2025-01-01 2025-01-08", 8, "2025-01-15"),
    ],
)
def test_anchor_from_end(i: Interval, n: int, period: str, day: int, after: str) -> None:
    start, end = pair(period)
    anchor = anchor_from_end(i, n, start, end)
    assert anchor.day == day
    assert Cadence(i, n, anchor).period_at(end - US)[1] == end
    assert Cadence(i, n, anchor).period_at(end) == (end, t(after))


@pytest.mark.parametrize(
    ("period", "previous", "expected"),
    [
        ("2025-02-01 2025-03-01", None, (M, 1)),  # not week x4
        ("2024-02-29 2025-02-28", None, (Y, 1)),
        ("2025-03-03 2025-03-10", None, (W, 1)),
        ("2025-02-22 2025-03-01", None, (W, 1)),
        ("2025-03-03 2025-03-17", None, (M, 1)),  # 14 days: a trial, no fortnight guess
        ("2025-03-03 2025-03-17", cad(W, 2, "2020-01-06"), (W, 2)),
        ("2025-03-03T05 2025-03-04T05", None, (D, 1)),
        ("2025-01-31 2025-04-30", None, (M, 3)),
        ("2024-08-31 2025-02-28", None, (M, 6)),
        ("2025-03-01 2025-03-11", None, (M, 1)),  # a 10-day trial
        ("2025-03-01 2025-03-11", cad(Y, 1, "2020-01-01"), (Y, 1)),
        ("2025-02-01 2025-03-01", cad(W, 4, "2020-01-01"), (W, 4)),
        ("2025-02-01 2025-03-01", cad(W, 3, "2020-01-01"), (M, 1)),
    ],
)
def test_infer(period: str, previous: Cadence | None, expected: tuple[Interval, int]) -> None:
    assert infer(*pair(period), previous) == expected


def test_fits_and_cadence_for() -> None:
    assert fits(W, 4, *pair("2025-02-01 2025-03-01"))
    assert fits(M, 1, *pair("2025-01-31 2025-02-28"))
    assert not fits(M, 1, *pair("2025-01-15 2025-02-28"))
    assert not fits(W, 1, *pair("2025-01-01 2025-01-09"))
    jan = pair("2025-01-31 2025-02-28")
    assert cadence_for(*jan, M, 1, None, None) == cad(M, 1, "2025-01-31")
    assert cadence_for(*jan, M, 1, t("2025-01-20"), None) == cad(M, 1, "2025-01-20")
    week = pair("2025-01-01 2025-01-08")
    assert cadence_for(*week, None, 1, None, None) == cad(W, 1, "2025-01-08")
    # a whole period of the customer's cadence keeps it, anchor included
    monthly, yearly = cad(M, 1, "2024-01-31"), cad(Y, 1, "2025-02-28")
    assert cadence_for(*pair("2025-02-28 2025-03-31"), None, 1, None, monthly) == monthly
    assert cadence_for(*pair("2027-02-28 2028-02-28"), None, 1, None, yearly) == yearly
    # ... also when the webhook names the same cadence without an anchor
    assert cadence_for(*pair("2026-02-28 2027-02-28"), Y, 1, None, yearly) == yearly
    quarterly = cad(M, 3, "2024-11-30")
    assert cadence_for(*pair("2024-11-30 2025-02-28"), M, 3, None, quarterly) == quarterly
    assert cadence_for(*pair("2024-11-30 2025-02-28"), M, 1, None, quarterly) != quarterly
    trial = pair("2025-01-01 2025-01-11")
    assert cadence_for(*trial, None, 1, None, cad(Y, 1, "2020-05-05")) == cad(Y, 1, "2025-01-11")


# -- confirmed and projected periods -------------------------------------------------------------

A = stored("2025-01-31", "2025-02-28", M, 1, "2025-01-31")
B = stored("2025-05-10", "2025-05-17", W, 1, "2025-05-17")


@pytest.mark.parametrize(
    ("history", "when", "expected"),
    [
        ([A, B], "2025-02-10", "2025-01-31 2025-02-28 confirmed"),
        ([A, B], "2025-03-01", "2025-02-28 2025-03-31 projected"),
        ([A, B], "2025-05-05", "2025-04-30 2025-05-10 projected"),  # cut at B's start
        ([A, B], "2025-05-12", "2025-05-10 2025-05-17 confirmed"),
        ([A, B], "2025-06-01", "2025-05-31 2025-06-07 projected"),
        ([A, B], "2030-01-01", "2029-12-29 2030-01-05 projected"),  # for ever after the last
        ([A, B], "2025-01-15", "2024-12-31 2025-01-31 projected"),  # before the first
        ([A, B], "2024-02-29T12", "2024-02-29 2024-03-31 projected"),
    ],
)
def test_period_at(history: list[Stored], when: str, expected: str) -> None:
    start, end, source = expected.split()
    assert period_at(history, t(when)) == Period(t(start), t(end), Source(source))


def test_period_at_cuts_and_clips_projection() -> None:
    short_first = stored("2025-01-15", "2025-02-28", M, 1, "2025-02-28")
    assert period_at([short_first], t("2025-01-10")).bounds == pair("2024-12-28 2025-01-15")
    off_grid = stored("2025-01-01", "2025-01-20", M, 1, "2025-02-01")
    assert period_at([off_grid], t("2025-01-25")).bounds == pair("2025-01-20 2025-02-01")
    with pytest.raises(ValueError):
        period_at([], t("2025-01-01"))


def test_periods_over() -> None:
    got = [p.start for p in periods_over([A, B], t("2025-01-01"), t("2025-07-01"))]
    assert got == ts(
        "2024-12-31 2025-01-31 2025-02-28 2025-03-31 2025-04-30 2025-05-10 2025-05-17 "
        "2025-05-24 2025-05-31 2025-06-07 2025-06-14 2025-06-21 2025-06-28"
    )
    over = list(periods_over([A, B], t("2025-01-01"), t("2025-07-01")))
    assert [p.source for p in over] == [P, C, P, P, P, C, P, P, P, P, P, P, P]
    assert [p.end for p in over] == [*got[1:], t("2025-07-05")]


def test_rewrite() -> None:
    new = stored("2025-02-20", "2025-03-20", M, 1, "2025-03-20")
    assert rewrite([A, B], new) == [Stored(A.start, t("2025-02-20"), A.cadence), new]
    before = stored("2024-06-01", "2024-07-01", M, 1, "2024-07-01")
    assert rewrite([A, B], before) == [before]
    at_end = stored("2025-02-28", "2025-03-28", M, 1, "2025-03-28")
    assert rewrite([A, B], at_end) == [A, at_end]
    at_b = stored("2025-05-10", "2025-06-10", M, 1, "2025-06-10")
    assert rewrite([A, B], at_b) == [A, at_b]


def test_changed() -> None:
    new = rewrite([A], stored("2025-03-15", "2025-04-15", M, 1, "2025-04-15"))
    rows = list(itertools.pairwise(ts("2025-01-31 2025-02-28 2025-03-31 2025-04-30")))
    gone, rebuild = changed(new, rows)
    assert gone == rows[1:]
    assert [p.start for p in rebuild] == ts("2025-02-28 2025-03-15 2025-04-15")
    assert [p.end for p in rebuild] == ts("2025-03-15 2025-04-15 2025-05-15")
    assert [p.source for p in rebuild] == [P, C, P]


# -- properties ----------------------------------------------------------------------------------


def utc_times(first: int, last: int) -> st.SearchStrategy[dt.datetime]:
    limits = dt.datetime(first, 1, 1), dt.datetime(last, 1, 1)
    return st.datetimes(*limits, timezones=st.just(dt.UTC))


def _clamped(y: int, m: int, day: int, hour: int) -> dt.datetime:
    days = (dt.date(y + m // 12, m % 12 + 1, 1) - dt.date(y, m, 1)).days
    return dt.datetime(y, m, min(day, days), hour, tzinfo=dt.UTC)


times = utc_times(1970, 2100)
# anchors on the days that clamp (or the 1st) at a whole hour, or anywhere
anchor_days, hours = st.sampled_from([1, 28, 29, 30, 31]), st.integers(0, 23)
month_ends = st.builds(_clamped, st.integers(1970, 2099), st.integers(1, 12), anchor_days, hours)


@st.composite
def cadences(draw: st.DrawFn, small: bool = False) -> Cadence:
    interval = draw(st.sampled_from(list(Interval)))
    top = {D: 40, W: 6, M: 14, Y: 3}[interval] if small else MAX_INTERVAL_COUNT[interval]
    count = draw(st.sampled_from([1, 2, 3, 6, top]) | st.integers(1, top))
    return Cadence(interval, min(count, top), draw(month_ends | times))


@PROPS
@given(cadences(), times, st.integers(-300, 300), st.floats(0, 1, exclude_max=True))
def test_cadence_period_at(cadence: Cadence, when: dt.datetime, k: int, frac: float) -> None:
    start, end = cadence.period_at(when)
    assert start <= when < end
    assert cadence.period_at(end)[0] == end and cadence.period_at(start - US)[1] == start
    # the period at a time inside [boundary(k), boundary(k + 1)), k up to a century away
    k = k * max(1, {D: 36500, W: 5200, M: 1200, Y: 100}[cadence.interval] // cadence.count) // 300
    start, end = cadence.boundary(k), cadence.boundary(k + 1)
    assert start < end
    assert cadence.period_at(min(start + (end - start) * frac, end - US)) == (start, end)
    # a whole period of a cadence fits it; a webhook giving it without one keeps the cadence
    assert fits(cadence.interval, cadence.count, start, end)
    assert infer(start, end, cadence) == (cadence.interval, cadence.count)
    assert cadence_for(start, end, None, 1, None, cadence) == cadence


@st.composite
def webhook(draw: st.DrawFn, history: list[Stored]) -> Stored:
    """A period a webhook may confirm: near (before, inside or after) one already stored, a whole
    period of a cadence given or inferred, or an irregular one (a trial, a plan change)."""
    ref = draw(st.sampled_from([history[-1].end, *(s.start for s in history), history[0].end]))
    days = draw(st.integers(0, 90) | st.integers(-400, 400))  # mostly forward, to build up
    start = ref + dt.timedelta(days=days, seconds=draw(st.integers(0, 9)))
    cadence = draw(cadences(small=True))
    end = Cadence(cadence.interval, cadence.count, start).boundary(1)
    if draw(st.booleans()):
        end = start + dt.timedelta(days=draw(st.integers(1, 200)), hours=draw(st.integers(0, 23)))
    interval = draw(st.sampled_from([cadence.interval, None]))
    anchor = draw(st.sampled_from([None, None, cadence.anchor]))
    previous = history[-1].cadence
    return Stored(start, end, cadence_for(start, end, interval, cadence.count, anchor, previous))


@st.composite
def histories(draw: st.DrawFn) -> list[Stored]:
    start, c = draw(utc_times(2000, 2060)), draw(cadences(small=True))
    end = Cadence(c.interval, c.count, start).boundary(1)
    out = [Stored(start, end, Cadence(c.interval, c.count, end))]
    for _ in range(draw(st.integers(0, 8))):
        out = rewrite(out, draw(webhook(out)))
    return out


def tiles(history: list[Stored], a: dt.datetime, b: dt.datetime) -> list[Period]:
    """periods_over [a, b), checked to be contiguous periods, each period_at of its start."""
    got = list(periods_over(history, a, b))
    assert got[0].contains(a) and got[-1].end >= b
    assert all(x.end == y.start for x, y in itertools.pairwise(got))
    for p in got:
        assert p.start < p.end and period_at(history, p.start) == p
        assert (p.source is C) == any((s.start, s.end) == p.bounds for s in history)
    return got


@PROPS
@given(histories(), st.data())
def test_rewrites_keep_periods_sorted_and_tiling(hist: list[Stored], data: st.DataObject) -> None:
    assert all(s.start < s.end for s in hist)
    assert all(x.end <= y.start for x, y in itertools.pairwise(hist))
    a = data.draw(st.sampled_from([s.start for s in hist])) + dt.timedelta(
        days=data.draw(st.integers(-500, 500)), seconds=data.draw(st.integers(0, 86399))
    )
    assert period_at(hist, a).contains(a)
    tiles(hist, a, a + dt.timedelta(days=data.draw(st.integers(1, 500))))


@PROPS
@given(histories(), st.data())
def test_rewrite_keeps_what_came_before(hist: list[Stored], data: st.DataObject) -> None:
    new = data.draw(webhook(hist))
    after = rewrite(hist, new)
    assert after[-1] == new
    if not any(s.start < new.start for s in hist):
        assert after == [new]
        return
    for _ in range(10):
        when = new.start - dt.timedelta(seconds=data.draw(st.integers(1, 800 * 86400)))
        old = period_at(hist, when)
        assert period_at(after, when) == Period(old.start, min(old.end, new.start), old.source)


@PROPS
@given(histories(), st.data())
def test_changed_drops_exactly_the_rows_that_moved(hist: list[Stored], data: st.DataObject) -> None:
    a = hist[0].start - dt.timedelta(days=data.draw(st.integers(0, 300)))
    old = periods_over(hist, a, hist[-1].end + dt.timedelta(days=300))
    rows = [p.bounds for p in old if data.draw(st.booleans())]
    new = rewrite(hist, data.draw(webhook(hist)))
    gone, rebuild = changed(new, rows)
    if not rows:
        assert gone == [] and rebuild == []
        return
    now = {p.bounds for p in tiles(new, rows[0][0], rows[-1][1])}
    assert gone == [r for r in rows if r not in now]
    kept = [r for r in rows if r in now]
    assert all(x.end <= y.start for x, y in itertools.pairwise(rebuild))
    for p in rebuild:  # periods of `new`, each over a dropped row and none over a kept one
        assert period_at(new, p.start) == p
        assert any(p.start < e and s < p.end for s, e in gone)
        assert not any(p.start < e and s < p.end for s, e in kept)
    for s, e in gone:  # each dropped row covered by contiguous rebuilt periods
        over = [p for p in rebuild if p.start < e and s < p.end]
        assert over[0].start <= s and over[-1].end >= e
        assert all(x.end == y.start for x, y in itertools.pairwise(over))
