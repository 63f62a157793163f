"""Protection from overload and bad input: bounded in-flight calls, deadlines that stop the
work, message size and undecodable requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from helpers import active_customer, details, lock_waiters, record, wait_for

from usage.v1 import customer_pb2, customer_pb2_grpc, usage_pb2, usage_pb2_grpc
from usage_service.api.server import Running, start_server
from usage_service.domain import plans as plans_mod
from usage_service.storage import connections
from usage_service.storage.store import Store


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture
async def limited(dsn: str, plans: plans_mod.Plans) -> AsyncIterator[Running]:
    st = Store(await connections.create_pool(dsn, size=10))
    running = await start_server(
        st, plans, "127.0.0.1:0", max_in_flight=2, max_message_bytes=64 * 1024
    )
    yield running
    await running.stop(1)
    await st.close()


async def _add_customer(channel: grpc.aio.Channel) -> None:
    customer = active_customer()
    await customer_pb2_grpc.CustomerServiceStub(channel).UpsertCustomer(
        customer_pb2.UpsertCustomerRequest(customer=customer)
    )


def _consume(key: str, feature: str = "tokens") -> usage_pb2.CheckEntitlementRequest:
    return usage_pb2.CheckEntitlementRequest(
        customer_id="cus_1", feature=feature, quantity=1, consume=True, idempotency_key=key
    )


async def test_calls_past_the_in_flight_limit_are_refused_not_queued(
    limited: Running, db: asyncpg.Pool
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as channel:
        await _add_customer(channel)
        usage = usage_pb2_grpc.UsageServiceStub(channel)
        async with db.acquire() as blocker, blocker.transaction():
            await blocker.execute("SELECT 1 FROM customers WHERE customer_id = 'cus_1' FOR UPDATE")
            # two features: consumes of one feature would wait as one group on one lock
            held = [
                asyncio.ensure_future(usage.CheckEntitlement(_consume(f"k{i}", feature)))
                for i, feature in ((1, "tokens"), (2, "calls"))
            ]

            async def both_waiting() -> bool:
                return limited.interceptor.in_flight == 2 and await lock_waiters(db) == 2

            await wait_for(both_waiting, "two calls waiting on the lock")
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await usage.CheckEntitlement(_consume("k3"), timeout=5)
            found = details(error.value)
            # refused, not queued: a queued call would wait for the lock and miss its deadline
            assert (found.code, found.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED")
            assert not any(h.done() for h in held)
        answers = await asyncio.gather(*held)
        assert all(a.allowed and a.event_id for a in answers)
        assert limited.interceptor.in_flight == 0
        keys = {r[0] for r in await db.fetch("SELECT idempotency_key FROM usage_events")}
        assert keys == {"k1", "k2"}


async def test_a_caller_whose_deadline_passes_stops_the_work(
    limited: Running, db: asyncpg.Pool
) -> None:
    """The caller gives up while its call waits on a lock: the server abandons the query (it
    leaves pg_stat_activity), stores nothing, and a retry with the same key settles it."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as channel:
        await _add_customer(channel)
        usage = usage_pb2_grpc.UsageServiceStub(channel)
        async with db.acquire() as blocker:
            async with blocker.transaction():
                await blocker.execute(
                    "SELECT 1 FROM customers WHERE customer_id = 'cus_1' FOR UPDATE"
                )
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await usage.CheckEntitlement(_consume("slow"), timeout=0.5)
                assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

                async def abandoned() -> bool:
                    return limited.interceptor.in_flight == 0 and await lock_waiters(db) == 0

                await wait_for(abandoned, "the server to abandon the call")
        assert await db.fetchval("SELECT count(*) FROM usage_events") == 0
        retry = await usage.CheckEntitlement(_consume("slow"), timeout=5)
        again = await usage.CheckEntitlement(_consume("slow"), timeout=5)
        assert retry.allowed and not retry.duplicate
        assert again.duplicate and again.event_id == retry.event_id
        assert await db.fetchval("SELECT count(*) FROM usage_events") == 1


async def test_oversized_and_undecodable_requests(limited: Running, db: asyncpg.Pool) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as channel:
        usage = usage_pb2_grpc.UsageServiceStub(channel)
        big = usage_pb2.BatchRecordUsageRequest(
            requests=[record(key=f"k{i}", note="x" * 400) for i in range(200)]
        )
        assert big.ByteSize() > 64 * 1024
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await usage.BatchRecordUsage(big, timeout=5)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        raw = channel.unary_unary(
            "/usage.v1.UsageService/RecordUsage",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await raw(b"\xff\xff\xff\xff", timeout=5)
        found = details(error.value)
        assert (found.code, found.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNDECODABLE_REQUEST",
        )
        assert await db.fetchval("SELECT count(*) FROM usage_events") == 0


async def test_made_up_method_names_do_not_grow_the_handler_cache(limited: Running) -> None:
    """The interceptor remembers the server's own methods only: calls to names nobody
    registered are answered UNIMPLEMENTED and leave nothing behind."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as channel:
        usage = usage_pb2_grpc.UsageServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await usage.GetUsageSummary(usage_pb2.GetUsageSummaryRequest(customer_id="nobody"))
        cached = len(limited.interceptor.handlers)
        assert cached >= 1
        for i in range(1000):
            made_up = channel.unary_unary(
                f"/made.up.Service{i}/Method{i}",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await made_up(b"", timeout=5)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert len(limited.interceptor.handlers) == cached
