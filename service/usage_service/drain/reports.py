"""Report building: claimed events grouped into reports, as each adapter declares."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from usage_service import domain
from usage_service.domain import ids
from usage_service.domain.plans import Aggregation, Meter
from usage_service.domain.reports import lane
from usage_service.providers.outcome import Reporting
from usage_service.storage.drain_store import Claimed, NewReport, batches


def build_reports(
    provider: domain.Provider,
    reporting: Reporting,
    meters: Mapping[str, Meter],
    claimed: list[Claimed],
    now: dt.datetime | None = None,
) -> list[NewReport]:
    """Groups claimed events (oldest first) into reports, as the provider's adapter declares.
    Lane providers: one report per customer and meter, of one period only (the rest waits for
    that report to settle). Batch providers: one customer's events per report, at most one
    provider call's worth (the drain sends several customers' reports in one call).

    A sum report takes events while their sum fits the adapter's largest value, so one
    customer's huge usage can never fail the claim of every customer. Where the adapter states
    figures at a time, a sum report is stated at its newest event and a max / last report now,
    each clamped into the period by the adapter."""
    if not reporting.lanes:
        return batches(claimed, reporting.batch)
    now = now or dt.datetime.now(dt.UTC)
    lanes: dict[tuple[str, str], list[Claimed]] = {}
    for c in claimed:
        lanes.setdefault((c.event.customer_id, c.event.meter), []).append(c)
    reports = []
    for (customer_id, meter_name), items in lanes.items():
        period = items[0].period_start
        same = [c for c in items if c.period_start == period]
        meter = meters.get(meter_name)
        aggregation = meter.aggregation if meter else Aggregation.SUM
        when = now
        if aggregation is Aggregation.COUNT and reporting.count_batch is not None:
            same = same[: reporting.count_batch]
        elif aggregation is Aggregation.SUM:
            same = _fitting(same, reporting.max_value)
            when = max(c.event.event_time for c in same)
        stated_at = None
        if reporting.stated is not None and aggregation is not Aggregation.COUNT:
            stated_at = _stated_at(reporting, same, when)
        reports.append(
            NewReport(
                ids.new_report_id(),
                lane(provider, customer_id, meter_name),
                tuple(c.event for c in same),
                _value(aggregation, same),
                stated_at,
            )
        )
    return reports


def _fitting(items: list[Claimed], limit: int) -> list[Claimed]:
    """The first items whose quantities sum to at most `limit` (at least one item)."""
    total = 0
    for i, c in enumerate(items):
        total += c.event.quantity
        if total > limit:
            return items[: max(i, 1)]
    return items


def _stated_at(reporting: Reporting, items: list[Claimed], when: dt.datetime) -> dt.datetime | None:
    """The time a report is stated at: `when` clamped into the period by the adapter. For max /
    last reports `when` is now, so the figure is the latest this lane has sent for the period.
    None outside every known period: the newest event's time is used."""
    first = items[0]
    if first.period_start is None or first.period_end is None or reporting.stated is None:
        return None
    return reporting.stated(when, first.period_start, first.period_end)


def _value(aggregation: Aggregation, items: list[Claimed]) -> int:
    """What a collapsed record carries. Max and last meters carry the period's figure, so a
    later report never lowers what an earlier one set."""
    last = items[-1]  # claimed oldest first
    if aggregation is Aggregation.SUM:
        return sum(c.event.quantity for c in items)
    if aggregation is Aggregation.COUNT:
        return len(items)
    if aggregation is Aggregation.MAX:
        own = max(c.event.quantity for c in items)
        return max(own, last.period_max) if last.period_max is not None else own
    if last.period_last is not None:
        return last.period_last
    return max(items, key=lambda c: (c.event.event_time, c.event.event_id)).event.quantity
