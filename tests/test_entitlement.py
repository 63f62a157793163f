"""CheckEntitlement: every reason, hard and soft limits, and atomic check-and-consume."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from conftest import Service
from helpers import details, lock_waiters, record, wait_for

from usage.v1 import customer_pb2, usage_pb2
from usage_service import domain

R = usage_pb2


def check(
    feature: str = "tokens",
    quantity: int = 0,
    consume: bool = False,
    key: str = "",
    customer_id: str = "cus_1",
) -> usage_pb2.CheckEntitlementRequest:
    return usage_pb2.CheckEntitlementRequest(
        customer_id=customer_id,
        feature=feature,
        quantity=quantity,
        consume=consume,
        idempotency_key=key,
    )


async def test_unknown_customer_is_denied(service: Service) -> None:
    answer = await service.usage.CheckEntitlement(check(customer_id="nobody"))
    assert not answer.allowed
    assert answer.reason == R.ENTITLEMENT_REASON_CUSTOMER_NOT_FOUND


@pytest.mark.parametrize(
    ("status", "allowed"),
    [
        (customer_pb2.SUBSCRIPTION_STATUS_ACTIVE, True),
        (customer_pb2.SUBSCRIPTION_STATUS_TRIALING, True),
        (customer_pb2.SUBSCRIPTION_STATUS_PAST_DUE, False),
        (customer_pb2.SUBSCRIPTION_STATUS_CANCELED, False),
        (customer_pb2.SUBSCRIPTION_STATUS_UNPAID, False),
        (customer_pb2.SUBSCRIPTION_STATUS_INCOMPLETE, False),
        (customer_pb2.SUBSCRIPTION_STATUS_PAUSED, False),
    ],
)
async def test_only_active_and_trialing_subscriptions_are_allowed(
    service: Service, status: int, allowed: bool
) -> None:
    await service.add_customer(status=status)
    answer = await service.usage.CheckEntitlement(check(quantity=1, consume=True, key="k"))
    assert answer.allowed is allowed
    if not allowed:
        assert answer.reason == R.ENTITLEMENT_REASON_SUBSCRIPTION_INACTIVE
        assert await service.count_events() == 0


async def test_boolean_features(service: Service) -> None:
    await service.add_customer()
    on = await service.usage.CheckEntitlement(check(feature="sso"))
    assert on.allowed and on.reason == R.ENTITLEMENT_REASON_FEATURE_ENABLED
    off = await service.usage.CheckEntitlement(check(feature="audit_log"))
    assert not off.allowed and off.reason == R.ENTITLEMENT_REASON_FEATURE_NOT_IN_PLAN


async def test_meter_outside_the_plan_is_denied(service: Service) -> None:
    await service.add_customer(plan_id="metered")
    answer = await service.usage.CheckEntitlement(check(feature="calls", quantity=1))
    assert not answer.allowed and answer.reason == R.ENTITLEMENT_REASON_FEATURE_NOT_IN_PLAN


@pytest.mark.quick
async def test_hard_limit_figures(service: Service) -> None:
    await service.add_customer()
    await service.usage.RecordUsage(record(quantity=990, key="a"))
    ok = await service.usage.CheckEntitlement(check(quantity=10))
    assert ok.allowed and ok.reason == R.ENTITLEMENT_REASON_WITHIN_LIMIT
    assert (ok.used, ok.included, ok.limit, ok.remaining) == (990, 100, 1000, 10)
    assert ok.HasField("period_start_time") and ok.HasField("period_end_time")
    over = await service.usage.CheckEntitlement(check(quantity=11))
    assert not over.allowed and over.reason == R.ENTITLEMENT_REASON_LIMIT_EXCEEDED
    await service.usage.RecordUsage(record(quantity=10, key="b"))
    empty = await service.usage.CheckEntitlement(check(quantity=0))
    assert not empty.allowed and empty.remaining == 0


async def test_soft_limit_allows_and_says_so(service: Service) -> None:
    await service.add_customer()
    requests = [record(meter="calls", quantity=1, key=f"c{i}") for i in range(20)]
    await service.usage.BatchRecordUsage(usage_pb2.BatchRecordUsageRequest(requests=requests))
    answer = await service.usage.CheckEntitlement(check(feature="calls", quantity=1))
    assert answer.allowed and answer.reason == R.ENTITLEMENT_REASON_SOFT_LIMIT_EXCEEDED
    assert (answer.used, answer.limit, answer.remaining) == (20, 20, 0)


async def test_unlimited_feature_has_no_limit_field(service: Service) -> None:
    await service.add_customer(plan_id="metered")
    answer = await service.usage.CheckEntitlement(check(quantity=10**12, consume=True, key="k"))
    assert answer.allowed and answer.reason == R.ENTITLEMENT_REASON_WITHIN_LIMIT
    assert not answer.HasField("limit") and not answer.HasField("remaining")
    assert answer.used == 10**12


@pytest.mark.quick
async def test_consume_records_usage_and_is_idempotent(service: Service) -> None:
    await service.add_customer()
    first = await service.usage.CheckEntitlement(check(quantity=300, consume=True, key="c"))
    assert first.allowed and first.event_id and not first.duplicate
    assert (first.used, first.remaining) == (300, 700)
    again = await service.usage.CheckEntitlement(check(quantity=300, consume=True, key="c"))
    assert again.allowed and again.duplicate and again.event_id == first.event_id
    assert again.used == 300
    assert await service.count_events() == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.CheckEntitlement(check(quantity=301, consume=True, key="c"))
    assert details(caught.value).code == grpc.StatusCode.ALREADY_EXISTS
    denied = await service.usage.CheckEntitlement(check(quantity=701, consume=True, key="d"))
    assert not denied.allowed and not denied.event_id
    assert await service.count_events() == 1


async def test_consume_needs_a_key_and_a_meter(service: Service) -> None:
    await service.add_customer()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.CheckEntitlement(check(feature="sso", quantity=1, consume=True))
    d = details(caught.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(d.fields) == {"idempotency_key", "feature"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.CheckEntitlement(check(quantity=0, consume=True, key="z"))
    assert set(details(caught.value).fields) == {"quantity"}
    assert await service.count_events() == 0


@pytest.mark.parametrize("attempt", range(3))
async def test_concurrent_consumes_never_pass_a_hard_limit(service: Service, attempt: int) -> None:
    """60 callers race for the last 10 units: exactly 10 win, and the total stops at the limit."""
    await service.add_customer()
    await service.usage.RecordUsage(record(quantity=990, key="base"))
    answers = await asyncio.gather(
        *(
            service.usage.CheckEntitlement(check(quantity=1, consume=True, key=f"r{i}"))
            for i in range(60)
        )
    )
    granted = [a for a in answers if a.allowed]
    assert len(granted) == 10
    assert all(a.reason == R.ENTITLEMENT_REASON_LIMIT_EXCEEDED for a in answers if not a.allowed)
    assert sorted(a.used for a in granted) == list(range(991, 1001))
    assert await service.count_events() == 11
    summary = await service.usage.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(customer_id="cus_1", meter="tokens")
    )
    assert summary.meters[0].used == 1000


async def test_concurrent_consumes_of_one_key_record_once(service: Service) -> None:
    await service.add_customer()
    answers = await asyncio.gather(
        *(
            service.usage.CheckEntitlement(check(quantity=5, consume=True, key="one"))
            for _ in range(20)
        )
    )
    assert all(a.allowed for a in answers)
    assert len({a.event_id for a in answers}) == 1
    assert sum(not a.duplicate for a in answers) == 1
    assert await service.count_events() == 1


async def test_retries_of_a_consume_that_took_the_last_units_are_replays(service: Service) -> None:
    """Copies of one consume race for the last 10 units: the one that wins records them, and the
    copies that waited for its lock are answered as replays, not as LIMIT_EXCEEDED."""
    await service.add_customer()
    await service.usage.RecordUsage(record(quantity=990, key="base"))
    answers = await asyncio.gather(
        *(
            service.usage.CheckEntitlement(check(quantity=10, consume=True, key="last"))
            for _ in range(20)
        )
    )
    assert all(a.allowed for a in answers)
    assert len({a.event_id for a in answers}) == 1
    assert sum(not a.duplicate for a in answers) == 1
    assert all(a.used == 1000 for a in answers)
    assert await service.count_events() == 2


@pytest.mark.tampers  # writes the original consume by hand, without its lifetime and `last` figures
async def test_a_consume_that_waited_for_its_own_original_is_a_replay(service: Service) -> None:
    """The original holds the totals row's lock when the retry arrives, and then commits the
    last units: the retry, which read the key before the lock was granted, is still a replay."""
    await service.add_customer()
    await service.usage.RecordUsage(record(quantity=990, key="base"))
    event_id = str(uuid.uuid4())
    async with service.db.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(
            "UPDATE usage_totals SET quantity_sum = quantity_sum + 10,"
            " event_count = event_count + 1 WHERE customer_id = 'cus_1' AND meter = 'tokens'"
        )
        await conn.execute(
            "INSERT INTO usage_events (event_id, customer_id, idempotency_key, meter, quantity,"
            " event_time, properties, payload_hash)"
            " VALUES ($1, 'cus_1', 'last', 'tokens', 10, now(), '{}', $2)",
            event_id,
            domain.payload_hash("tokens", 10, None, {}),
        )
        await conn.execute(  # its key, claimed as every write of an event claims it
            "INSERT INTO usage_keys (customer_id, idempotency_key, payload_hash, event_id)"
            " VALUES ('cus_1', 'last', $2, $1)",
            event_id,
            domain.payload_hash("tokens", 10, None, {}),
        )
        retry = asyncio.ensure_future(
            service.usage.CheckEntitlement(check(quantity=10, consume=True, key="last"))
        )

        async def retry_waits() -> bool:
            return await lock_waiters(service.db) == 1

        await wait_for(retry_waits, "the retry to wait for the totals row")
        assert not retry.done()
        await tx.commit()
    answer = await retry
    assert answer.allowed and answer.duplicate and answer.event_id == event_id
    assert answer.used == 1000


async def test_denied_consumes_leave_no_totals_behind(service: Service) -> None:
    await service.add_customer(status=customer_pb2.SUBSCRIPTION_STATUS_CANCELED)
    await service.add_customer("cus_2", plan_id="metered")
    for customer_id, feature in (("cus_1", "tokens"), ("cus_2", "calls"), ("ghost", "tokens")):
        answer = await service.usage.CheckEntitlement(
            check(feature=feature, quantity=1, consume=True, key="k", customer_id=customer_id)
        )
        assert not answer.allowed and not answer.event_id
    assert await service.count_events() == 0
    assert await service.db.fetchval("SELECT count(*) FROM usage_totals") == 0
