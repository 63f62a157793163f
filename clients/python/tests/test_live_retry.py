"""Retry safety against the live server: a call that meets a stopped server, or whose answer is
lost after the server committed, is retried with the same idempotency key and recorded once."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from conftest import RetryLog
from server import Server
from support import FAST_RECONNECT, PATIENT, new_customer

import usage_client
from usage_client import idempotency_key

if TYPE_CHECKING:  # generic in the type stubs only
    AioInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    SyncInterceptor = grpc.UnaryUnaryClientInterceptor[Any, Any]
else:
    AioInterceptor = grpc.aio.UnaryUnaryClientInterceptor
    SyncInterceptor = grpc.UnaryUnaryClientInterceptor

FIRST_RETRY_WAIT = 30.0  # seconds; the first attempt fails at once on a closed port
CALL_WAIT = 120.0  # seconds; bounds the whole retried call (PATIENT gives up before)


def key() -> str:
    return idempotency_key("retry-test", uuid.uuid4().hex)


def first_retry(retries: RetryLog, done: Callable[[], bool]) -> bool:
    """Waits (at most FIRST_RETRY_WAIT) until the client logs a retry; False as soon as the call
    ended without one."""
    deadline = time.monotonic() + FIRST_RETRY_WAIT
    while time.monotonic() < deadline:
        if retries.first.wait(0.05):
            return True
        if done():
            return retries.first.is_set()
    return False


def ensure_serving(service: Server) -> None:
    if service.proc.poll() is not None:
        service.start()
    service.wait_serving()


def test_sync_call_made_while_the_server_is_down_is_recorded_once(
    service: Server, client: usage_client.UsageClient, retries: RetryLog
) -> None:
    cid = new_customer(client).customer_id
    k = key()
    service.stop()  # nothing listens on the port now
    try:
        with (
            usage_client.UsageClient(
                service.address, retry=PATIENT, channel_options=FAST_RECONNECT
            ) as patient,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            call = pool.submit(patient.record_usage, cid, "tokens", 77, idempotency_key=k)
            assert first_retry(retries, call.done), "the failed attempt was not retried"
            assert not call.done()
            service.start()
            result = call.result(timeout=CALL_WAIT)
    finally:
        ensure_serving(service)
    assert result.duplicate is False
    assert {(r.method, r.code) for r in retries.retries} >= {("RecordUsage", "UNAVAILABLE")}
    with usage_client.UsageClient(service.address) as fresh:
        assert fresh.record_usage(cid, "tokens", 77, idempotency_key=k) == (
            usage_client.RecordResult(result.event_id, True)
        )
        assert fresh.get_usage_summary(cid).meter("tokens").used == 77


async def test_async_consume_made_while_the_server_is_down_is_counted_once(
    service: Server, client: usage_client.UsageClient, retries: RetryLog
) -> None:
    cid = new_customer(client).customer_id
    client.record_usage(cid, "tokens", 100, idempotency_key=key())
    k = key()
    service.stop()
    try:
        async with usage_client.AsyncUsageClient(
            service.address, retry=PATIENT, channel_options=FAST_RECONNECT
        ) as patient:
            task = asyncio.ensure_future(
                patient.check_entitlement(cid, "tokens", 30, consume=True, idempotency_key=k)
            )
            retried = await asyncio.to_thread(first_retry, retries, task.done)
            if not retried and task.done():
                task.result()  # shows why the call ended
            assert retried, "the failed attempt was not retried"
            assert not task.done()
            await asyncio.to_thread(service.start)
            decision = await asyncio.wait_for(task, CALL_WAIT)
            again = await patient.check_entitlement(
                cid, "tokens", 30, consume=True, idempotency_key=k
            )
    finally:
        await asyncio.to_thread(ensure_serving, service)
    assert decision.allowed and not decision.duplicate and decision.used == 130
    assert again.duplicate and again.event_id == decision.event_id and again.used == 130
    assert any(r.method == "CheckEntitlement" for r in retries.retries)


class LoseFirstAnswer(AioInterceptor):
    """Lets the first call reach the server and commit, then reports DEADLINE_EXCEEDED instead of
    its answer, as when a response is lost on the way back."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.lost: list[Any] = []

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.requests.append(request)
        call = await continuation(details, request)
        if self.lost:
            return call
        self.lost.append(await call)
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            "answer lost after the server committed",
            "",
        )


async def test_async_retry_after_a_lost_answer_returns_the_original_event(
    target: str, client: usage_client.UsageClient, retries: RetryLog
) -> None:
    cid = new_customer(client).customer_id
    lossy = LoseFirstAnswer()
    k = key()
    async with usage_client.AsyncUsageClient(
        target, retry=usage_client.RetryPolicy(initial_backoff=0.01), interceptors=[lossy]
    ) as c:
        result = await c.record_usage(cid, "tokens", 42, idempotency_key=k)
    assert len(lossy.requests) == 2
    assert lossy.requests[0] == lossy.requests[1]  # the very same request, key included
    original = lossy.lost[0]
    assert original.duplicate is False
    assert result == usage_client.RecordResult(original.event_id, True)
    assert [(r.method, r.code) for r in retries.retries] == [("RecordUsage", "DEADLINE_EXCEEDED")]
    assert client.get_usage_summary(cid).meter("tokens").used == 42


async def test_async_create_grant_retried_after_a_lost_answer_grants_once(
    target: str, client: usage_client.UsageClient, retries: RetryLog
) -> None:
    cid = new_customer(client, plan_id="prepaid").customer_id
    lossy = LoseFirstAnswer()
    async with usage_client.AsyncUsageClient(
        target, retry=usage_client.RetryPolicy(initial_backoff=0.01), interceptors=[lossy]
    ) as c:
        result = await c.create_grant(cid, "tokens", 250, idempotency_key=key())
    assert len(lossy.requests) == 2
    assert lossy.requests[0] == lossy.requests[1]  # the very same request, key included
    assert lossy.lost[0].duplicate is False
    assert result.duplicate is True and result.grant.grant_id == lossy.lost[0].grant.grant_id
    assert [(r.method, r.code) for r in retries.retries] == [("CreateGrant", "DEADLINE_EXCEEDED")]
    top_ups = [
        g for g in client.list_grants(cid, "tokens") if g.source is usage_client.GrantSource.TOP_UP
    ]
    assert [g.grant_id for g in top_ups] == [result.grant.grant_id]
    # The plan's 100 and the 250 granted once.
    assert client.get_usage_summary(cid, "tokens").meter("tokens").balance == 350


class _Failed(grpc.RpcError, grpc.Call):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "connection reset after the server answered"

    def trailing_metadata(self) -> Any:
        return ()


class LoseFirstBatchAnswer(SyncInterceptor):
    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.lost: list[Any] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.requests.append(request)
        outcome = continuation(details, request)
        if self.lost:
            return outcome
        self.lost.append(outcome.result())
        raise _Failed(grpc.StatusCode.UNAVAILABLE)


def test_sync_batch_retry_after_a_lost_answer_records_each_event_once(
    target: str, client: usage_client.UsageClient
) -> None:
    cid = new_customer(client).customer_id
    lossy = LoseFirstBatchAnswer()
    events = [usage_client.UsageEvent(cid, "tokens", n, key()) for n in (5, 6, 7)]
    with usage_client.UsageClient(
        target, retry=usage_client.RetryPolicy(initial_backoff=0.01), interceptors=[lossy]
    ) as c:
        results = c.batch_record_usage(events)
    assert len(lossy.requests) == 2 and lossy.requests[0] == lossy.requests[1]
    first = [r.event_id for r in lossy.lost[0].responses]
    assert [r.event_id for r in results] == first
    assert all(r.duplicate for r in results)
    assert client.get_usage_summary(cid).meter("tokens").used == 18


def test_calls_cut_short_by_their_deadline_never_double_record(
    target: str, client: usage_client.UsageClient
) -> None:
    cid = new_customer(client).customer_id
    k = key()
    hasty = usage_client.RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.001)
    recorded: list[usage_client.RecordResult] = []
    with usage_client.UsageClient(target, retry=hasty) as c:
        # Deadlines from 1 us to ~10 ms: some attempts die before sending, some after the
        # server committed, some succeed; whichever, the key must count once.
        for n in range(30):
            try:
                recorded.append(
                    c.record_usage(cid, "tokens", 9, idempotency_key=k, timeout=1e-6 * 1.5**n)
                )
            except usage_client.DeadlineExceeded as exc:
                assert exc.attempts == 3
        final = c.record_usage(cid, "tokens", 9, idempotency_key=k)
    assert final.duplicate
    assert {r.event_id for r in [*recorded, final]} == {final.event_id}
    assert [r.duplicate for r in recorded].count(False) <= 1
    assert client.get_usage_summary(cid).meter("tokens").used == 9
