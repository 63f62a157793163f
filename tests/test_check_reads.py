"""Checks without consume: concurrent checks share one read of customers and totals, every
answer is each caller's own, and no replica ever answers from a stale customer."""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
from conftest import Service
from helpers import logged_store, record

from usage.v1 import customer_pb2, usage_pb2, usage_pb2_grpc
from usage_service.api.server import start_server
from usage_service.domain import plans as plans_mod
from usage_service.storage import connections, store

R = usage_pb2


def check(
    customer_id: str, feature: str = "tokens", quantity: int = 0
) -> usage_pb2.CheckEntitlementRequest:
    return usage_pb2.CheckEntitlementRequest(
        customer_id=customer_id, feature=feature, quantity=quantity
    )


async def test_concurrent_checks_get_their_own_customer_and_totals(service: Service) -> None:
    for i in range(20):
        await service.add_customer(f"c{i}", plan_id="basic")
        if i:
            await service.usage.RecordUsage(record(customer_id=f"c{i}", quantity=i * 10, key="k"))
    await service.add_customer("off", status=customer_pb2.SUBSCRIPTION_STATUS_CANCELED)
    requests = [check(f"c{i}") for i in range(20)] * 5
    requests += [check("nobody"), check("off"), check("c1", feature="sso")]
    answers = await asyncio.gather(*(service.usage.CheckEntitlement(r) for r in requests))
    for r, a in zip(requests[:100], answers[:100], strict=True):
        i = int(r.customer_id[1:])
        assert a.allowed and a.reason == R.ENTITLEMENT_REASON_WITHIN_LIMIT
        assert (a.used, a.limit, a.remaining) == (i * 10, 1000, 1000 - i * 10)
    assert answers[100].reason == R.ENTITLEMENT_REASON_CUSTOMER_NOT_FOUND
    assert answers[101].reason == R.ENTITLEMENT_REASON_SUBSCRIPTION_INACTIVE
    assert answers[102].reason == R.ENTITLEMENT_REASON_FEATURE_ENABLED


async def test_concurrent_checks_of_a_customer_are_read_by_few_statements(dsn: str) -> None:
    statements: list[str] = []

    st = await logged_store(dsn, statements)
    try:
        now = dt.datetime.now(dt.UTC)
        await st.check_read("warm-up", "tokens", now)
        statements.clear()
        meters = ["tokens", "calls", "storage", "seats"]
        found = await asyncio.gather(
            *(st.check_read("c1", meters[i % 4], now) for i in range(200)),
            st.check_read("c2", "tokens", now),
        )
        assert all(read.customer is None for read in found)
        reads = [s for s in statements if "FROM unnest" in s]
        # one customer's checks share reads; another customer's are read on their own
        assert 2 <= len(reads) <= 5, len(reads)
    finally:
        await st.close()


async def test_another_replicas_upsert_is_seen_by_the_very_next_check(
    service: Service, dsn: str, plans: plans_mod.Plans
) -> None:
    """A replica with the read model off reads customers fresh with the totals: staleness is
    zero (with it on, test_read_model bounds it)."""
    other_store = store.Store(await connections.create_pool(dsn))
    other = await start_server(other_store, plans, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as channel:
            replica = usage_pb2_grpc.UsageServiceStub(channel)
            for round_ in range(20):
                await service.add_customer("cus_1", status=customer_pb2.SUBSCRIPTION_STATUS_ACTIVE)
                answer = await replica.CheckEntitlement(check("cus_1"))
                assert answer.allowed, round_
                await service.add_customer(
                    "cus_1", status=customer_pb2.SUBSCRIPTION_STATUS_CANCELED
                )
                answer = await replica.CheckEntitlement(check("cus_1"))
                assert answer.reason == R.ENTITLEMENT_REASON_SUBSCRIPTION_INACTIVE, round_
                await service.add_customer("cus_1", plan_id="metered")
                answer = await replica.CheckEntitlement(check("cus_1", feature="sso"))
                assert answer.reason == R.ENTITLEMENT_REASON_FEATURE_NOT_IN_PLAN, round_
    finally:
        await other.stop(1)
        await other_store.close()
