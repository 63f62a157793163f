"""GetUsageSummary: aggregations, periods, and the figures per meter."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from conftest import Service
from helpers import details, record

from usage.v1 import usage_pb2


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def summary(service: Service, customer_id: str = "cus_1") -> dict[str, usage_pb2.MeterUsage]:
    answer = await service.usage.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(customer_id=customer_id)
    )
    return {m.meter: m for m in answer.meters}


@pytest.mark.quick
async def test_each_aggregation(service: Service) -> None:
    await service.add_customer()
    t = now() - dt.timedelta(hours=3)
    events = [
        record(meter="tokens", quantity=5, key="t1"),
        record(meter="tokens", quantity=7, key="t2"),
        record(meter="calls", quantity=100, key="c1"),
        record(meter="calls", quantity=0, key="c2"),
        record(meter="storage", quantity=300, key="s1"),
        record(meter="storage", quantity=900, key="s2"),
        record(meter="storage", quantity=200, key="s3"),
        record(meter="seats", quantity=3, key="a1", when=t + dt.timedelta(minutes=2)),
        record(meter="seats", quantity=8, key="a2", when=t),  # older: does not win
        record(meter="seats", quantity=4, key="a3", when=t + dt.timedelta(minutes=1)),
    ]
    await service.usage.BatchRecordUsage(usage_pb2.BatchRecordUsageRequest(requests=events[:5]))
    for e in events[5:]:  # and across calls
        await service.usage.RecordUsage(e)
    meters = await summary(service)
    assert {m: meters[m].used for m in meters} == {
        "tokens": 12,
        "calls": 2,
        "storage": 900,
        "seats": 3,
    }
    assert [m.aggregation for m in meters.values()] == ["sum", "count", "last", "max"]


async def test_figures_for_a_metered_feature(service: Service) -> None:
    await service.add_customer()
    await service.usage.RecordUsage(record(quantity=250, key="a"))
    m = (await summary(service))["tokens"]
    assert (m.used, m.included, m.limit, m.remaining, m.overage) == (250, 100, 1000, 750, 150)
    # No provider: nothing is pending, all of it is unbilled.
    assert (m.reported, m.pending, m.failed, m.unbilled) == (0, 0, 0, 250)
    assert m.unit == "tokens"
    storage = (await summary(service))["storage"]
    assert not storage.HasField("limit") and not storage.HasField("remaining")


async def test_answer_names_the_customer_plan_and_period(service: Service) -> None:
    start = now() - dt.timedelta(days=3)
    end = now() + dt.timedelta(days=27)
    await service.add_customer(start=start, end=end)
    answer = await service.usage.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(customer_id="cus_1", meter="seats")
    )
    assert answer.plan_id == "basic" and answer.customer_id == "cus_1"
    assert answer.period_start_time.ToDatetime(dt.UTC) == start.replace(
        microsecond=start.microsecond
    )
    assert answer.period_end_time.ToDatetime(dt.UTC) == end
    assert [m.meter for m in answer.meters] == ["seats"]


async def test_an_event_before_the_period_does_not_count(service: Service) -> None:
    start = now() - dt.timedelta(hours=1)
    await service.add_customer(start=start)
    await service.usage.RecordUsage(
        record(quantity=50, key="old", when=start - dt.timedelta(seconds=1))
    )
    await service.usage.RecordUsage(record(quantity=7, key="new", when=start))
    assert (await summary(service))["tokens"].used == 7
    assert await service.count_events() == 2


async def test_a_new_period_starts_from_the_events_inside_it(service: Service) -> None:
    """When the webhook moves the period on, the totals are those of the events in the new one."""
    old_start = now() - dt.timedelta(days=30)
    boundary = now() - dt.timedelta(minutes=10)
    await service.add_customer(start=old_start, end=boundary)
    await service.usage.RecordUsage(
        record(quantity=100, key="before", when=boundary - dt.timedelta(minutes=1))
    )
    await service.usage.RecordUsage(
        record(quantity=5, key="after", when=boundary + dt.timedelta(minutes=1))
    )
    # Past the confirmed period, the projected one counts, before any webhook.
    assert (await summary(service))["tokens"].used == 5
    await service.add_customer(start=boundary, end=boundary + dt.timedelta(days=30))
    assert (await summary(service))["tokens"].used == 5
    await service.usage.RecordUsage(record(quantity=1, key="later"))
    assert (await summary(service))["tokens"].used == 6


async def test_usage_of_a_meter_outside_the_plan_is_still_shown(service: Service) -> None:
    await service.add_customer(plan_id="metered")
    await service.usage.RecordUsage(record(meter="calls", key="x"))
    meters = await summary(service)
    assert list(meters) == ["tokens", "calls"]
    assert meters["calls"].used == 1 and meters["calls"].included == 0


async def test_unknown_customer_is_not_found(service: Service) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.GetUsageSummary(usage_pb2.GetUsageSummaryRequest(customer_id="nope"))
    d = details(caught.value)
    assert d.code == grpc.StatusCode.NOT_FOUND and d.reason == "CUSTOMER_NOT_FOUND"
