"""RecordUsage and BatchRecordUsage: durable, idempotent, all-or-nothing."""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
import pytest
from conftest import Service
from helpers import details, record

from usage.v1 import usage_pb2


@pytest.mark.quick
async def test_record_is_committed_and_answers_the_event_id(service: Service) -> None:
    await service.add_customer()
    answer = await service.usage.RecordUsage(record(quantity=7, key="a", model="gpt"))
    assert not answer.duplicate
    row = await service.db.fetchrow(
        "SELECT customer_id, meter, quantity, properties::text FROM usage_events "
        "WHERE event_id = $1::uuid",
        answer.event_id,
    )
    assert row is not None
    assert (row["customer_id"], row["meter"], row["quantity"]) == ("cus_1", "tokens", 7)
    assert row["properties"] == '{"model": "gpt"}'


async def test_repeated_key_answers_duplicate_with_the_original_event(service: Service) -> None:
    first = await service.usage.RecordUsage(record(quantity=5, key="same"))
    again = await service.usage.RecordUsage(record(quantity=5, key="same"))
    assert again.duplicate and again.event_id == first.event_id
    assert await service.count_events() == 1


async def test_retry_without_event_time_matches_the_original(service: Service) -> None:
    """A default time is not part of the payload: a later retry is still the same event."""
    first = await service.usage.RecordUsage(record(key="t"))
    again = await service.usage.RecordUsage(record(key="t"))
    assert again.duplicate and again.event_id == first.event_id


@pytest.mark.quick
async def test_same_key_other_payload_is_already_exists_and_keeps_the_first(
    service: Service,
) -> None:
    await service.add_customer()
    first = await service.usage.RecordUsage(record(quantity=5, key="k"))
    for changed in (
        record(quantity=6, key="k"),
        record(meter="calls", quantity=5, key="k"),
        record(quantity=5, key="k", region="eu"),
        record(quantity=5, key="k", when=dt.datetime.now(dt.UTC)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.usage.RecordUsage(changed)
        d = details(caught.value)
        assert d.code == grpc.StatusCode.ALREADY_EXISTS
        assert d.reason == "IDEMPOTENCY_KEY_REUSED" and d.domain == "usage.v1"
        assert d.metadata["event_id"] == first.event_id
    assert await service.count_events() == 1
    summary = await service.usage.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(customer_id="cus_1", meter="tokens")
    )
    assert summary.meters[0].used == 5


async def test_keys_are_per_customer(service: Service) -> None:
    a = await service.usage.RecordUsage(record(customer_id="a", key="k"))
    b = await service.usage.RecordUsage(record(customer_id="b", key="k"))
    assert a.event_id != b.event_id and not b.duplicate


@pytest.mark.parametrize("attempt", range(3))
async def test_concurrent_retries_of_one_key_store_one_event(
    service: Service, attempt: int
) -> None:
    await service.add_customer()
    answers = await asyncio.gather(
        *(service.usage.RecordUsage(record(quantity=3, key="race")) for _ in range(20))
    )
    assert len({a.event_id for a in answers}) == 1
    assert sum(not a.duplicate for a in answers) == 1
    assert await service.count_events() == 1
    summary = await service.usage.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(customer_id="cus_1", meter="tokens")
    )
    assert summary.meters[0].used == 3


async def test_batch_keeps_order_and_flags_duplicates_per_item(service: Service) -> None:
    await service.add_customer()
    earlier = await service.usage.RecordUsage(record(quantity=1, key="old"))
    batch = usage_pb2.BatchRecordUsageRequest(
        requests=[
            record(quantity=2, key="n1"),
            record(quantity=1, key="old"),  # duplicate of an earlier call
            record(quantity=4, key="n2"),
            record(quantity=2, key="n1"),  # duplicate inside the batch
            record(customer_id="cus_2", quantity=9, key="n1"),  # same key, other customer
        ]
    )
    answer = await service.usage.BatchRecordUsage(batch)
    flags = [r.duplicate for r in answer.responses]
    assert flags == [False, True, False, True, False]
    ids = [r.event_id for r in answer.responses]
    assert ids[1] == earlier.event_id and ids[3] == ids[0]
    assert len(set(ids)) == 4
    assert await service.count_events() == 4
    summary = await service.usage.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(customer_id="cus_1", meter="tokens")
    )
    assert summary.meters[0].used == 1 + 2 + 4


async def test_batch_with_one_bad_item_stores_nothing(service: Service) -> None:
    await service.add_customer()
    requests = [record(quantity=1, key=f"ok{i}") for i in range(5)]
    requests.insert(3, record(quantity=-1, key="bad"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.BatchRecordUsage(usage_pb2.BatchRecordUsageRequest(requests=requests))
    d = details(caught.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT and d.reason == "INVALID_REQUEST"
    assert list(d.fields) == ["requests[3].quantity"]
    assert await service.count_events() == 0


async def test_batch_with_a_conflicting_key_stores_nothing(service: Service) -> None:
    await service.usage.RecordUsage(record(quantity=1, key="taken"))
    requests = [record(quantity=1, key="fresh"), record(quantity=2, key="taken")]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.BatchRecordUsage(usage_pb2.BatchRecordUsageRequest(requests=requests))
    d = details(caught.value)
    assert d.code == grpc.StatusCode.ALREADY_EXISTS and d.metadata["index"] == "1"
    assert await service.count_events() == 1


@pytest.mark.parametrize("size", [0, 1001])
async def test_batch_size_is_bounded(service: Service, size: int) -> None:
    requests = [record(key=f"k{i}") for i in range(size)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.BatchRecordUsage(usage_pb2.BatchRecordUsageRequest(requests=requests))
    assert details(caught.value).fields.keys() == {"requests"}
    assert await service.count_events() == 0


async def test_usage_before_the_customer_exists_counts_once_it_does(service: Service) -> None:
    await service.usage.RecordUsage(record(customer_id="late", quantity=40, key="x"))
    await service.add_customer("late")
    summary = await service.usage.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(customer_id="late", meter="tokens")
    )
    assert summary.meters[0].used == 40
