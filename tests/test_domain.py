"""The pure domain: aggregation and decisions, without I/O."""

from __future__ import annotations

import datetime as dt

from usage_service import domain
from usage_service.plans import Aggregation, Enforcement, MeteredFeature

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def event(q: int, minutes: int) -> domain.UsageEvent:
    return domain.UsageEvent("e", "c", "m", q, "k", T0 + dt.timedelta(minutes=minutes), {}, b"")


def test_fold_keeps_every_aggregation_and_the_last_of_equal_times() -> None:
    totals = domain.fold([event(5, 2), event(9, 1), event(3, 2)])
    assert (totals.event_count, totals.quantity_sum, totals.quantity_max) == (3, 17, 9)
    assert (totals.last_quantity, totals.last_event_time) == (3, T0 + dt.timedelta(minutes=2))


def test_decide_hard_soft_and_is_any_left() -> None:
    hard = MeteredFeature("m", included=5, limit=10, enforcement=Enforcement.HARD)
    soft = MeteredFeature("m", included=5, limit=10, enforcement=Enforcement.SOFT)
    at_9 = domain.Totals(event_count=3, quantity_sum=9)
    assert domain.decide(hard, Aggregation.SUM, at_9, 1).allowed
    assert domain.decide(hard, Aggregation.SUM, at_9, 2).reason is domain.Reason.LIMIT_EXCEEDED
    assert domain.decide(soft, Aggregation.SUM, at_9, 2).reason is domain.Reason.SOFT_LIMIT_EXCEEDED
    assert domain.decide(hard, Aggregation.SUM, at_9, 0).allowed  # one left
    at_10 = domain.Totals(quantity_sum=10)
    assert not domain.decide(hard, Aggregation.SUM, at_10, 0).allowed  # none left
    # A count meter counts the event, whatever its quantity.
    assert domain.decide(hard, Aggregation.COUNT, at_9, 500).allowed


def test_progress_is_in_quantities_for_sum_and_events_otherwise() -> None:
    t = domain.Totals(
        event_count=4,
        quantity_sum=40,
        reported_count=1,
        reported_sum=15,
        failed_count=1,
        failed_sum=5,
    )
    assert t.progress(Aggregation.SUM) == (15, 20, 5)
    assert t.progress(Aggregation.LAST) == (1, 2, 1)


def test_payload_hash_ignores_a_defaulted_time_but_not_a_given_one() -> None:
    base = domain.payload_hash("m", 1, None, {"a": "1"})
    assert base == domain.payload_hash("m", 1, None, {"a": "1"})
    assert base != domain.payload_hash("m", 1, T0, {"a": "1"})
    assert base != domain.payload_hash("m", 2, None, {"a": "1"})
    assert base != domain.payload_hash("m", 1, None, {"a": "2"})
