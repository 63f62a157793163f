"""The retry loop against an in-process fake server: the same request every attempt, a deadline
on every attempt, bounded attempts, and no retry of an answer."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from usage.v1 import usage_pb2, usage_pb2_grpc

import usage_client

QUICK = usage_client.RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.01)


class Flaky(usage_pb2_grpc.UsageServiceServicer):  # type: ignore[misc]
    """Fails the first `failures` calls with `code`, then records the event."""

    def __init__(self) -> None:
        self.failures = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.requests: list[bytes] = []
        self.deadlines: list[float | None] = []
        self.metadata: list[dict[str, str | bytes]] = []
        self.lock = threading.Lock()

    def RecordUsage(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.requests.append(request.SerializeToString(deterministic=True))
            self.deadlines.append(context.time_remaining())
            self.metadata.append(dict(context.invocation_metadata()))
            failing = len(self.requests) <= self.failures
        if failing:
            context.abort(self.code, "try again")
        return usage_pb2.RecordUsageResponse(event_id="ev-1", duplicate=False)


@pytest.fixture
def fake() -> Iterator[tuple[Flaky, str]]:
    servicer = Flaky()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    usage_pb2_grpc.add_UsageServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.fixture
def sync_client(fake: tuple[Flaky, str]) -> Iterator[usage_client.UsageClient]:
    with usage_client.UsageClient(fake[1], retry=QUICK, timeout=3.0) as c:
        yield c


@pytest.fixture
async def async_client(fake: tuple[Flaky, str]) -> AsyncIterator[usage_client.AsyncUsageClient]:
    async with usage_client.AsyncUsageClient(fake[1], retry=QUICK, timeout=3.0) as c:
        yield c


def test_sync_retries_send_the_same_request_with_a_deadline_each(
    fake: tuple[Flaky, str], sync_client: usage_client.UsageClient
) -> None:
    servicer, _ = fake
    servicer.failures = 2
    result = sync_client.record_usage("c", "tokens", 5, idempotency_key="k-1")
    assert result == usage_client.RecordResult("ev-1", False)
    assert len(servicer.requests) == 3
    assert len(set(servicer.requests)) == 1  # same key, same payload, byte for byte
    assert usage_pb2.RecordUsageRequest.FromString(servicer.requests[0]).idempotency_key == "k-1"
    assert all(d is not None and 0 < d <= 3.05 for d in servicer.deadlines), servicer.deadlines


async def test_async_retries_send_the_same_request(
    fake: tuple[Flaky, str], async_client: usage_client.AsyncUsageClient
) -> None:
    servicer, _ = fake
    servicer.failures = 3
    result = await async_client.record_usage("c", "tokens", 5, idempotency_key="k-2")
    assert result.event_id == "ev-1"
    assert len(servicer.requests) == 4
    assert len(set(servicer.requests)) == 1


def test_sync_gives_up_after_max_attempts(
    fake: tuple[Flaky, str], sync_client: usage_client.UsageClient
) -> None:
    servicer, _ = fake
    servicer.failures = 100
    with pytest.raises(usage_client.Unavailable) as caught:
        sync_client.record_usage("c", "tokens", 5, idempotency_key="k-3")
    assert caught.value.attempts == 4
    assert len(servicer.requests) == 4
    assert isinstance(caught.value.__cause__, grpc.RpcError)


async def test_async_does_not_retry_an_answer(
    fake: tuple[Flaky, str], async_client: usage_client.AsyncUsageClient
) -> None:
    servicer, _ = fake
    servicer.failures = 100
    servicer.code = grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(usage_client.InvalidArgument) as caught:
        await async_client.record_usage("c", "tokens", 5, idempotency_key="k-4")
    assert caught.value.attempts == 1
    assert len(servicer.requests) == 1


async def test_a_call_timeout_overrides_the_default(
    fake: tuple[Flaky, str], async_client: usage_client.AsyncUsageClient
) -> None:
    servicer, _ = fake
    await async_client.record_usage("c", "tokens", 1, idempotency_key="k-5", timeout=0.5)
    assert servicer.deadlines[-1] is not None and servicer.deadlines[-1] <= 0.55
    with pytest.raises(ValueError):
        await async_client.record_usage("c", "tokens", 1, idempotency_key="k-5", timeout=0)


def test_unimplemented_rpcs_are_server_errors(sync_client: usage_client.UsageClient) -> None:
    # The fake implements RecordUsage only.
    with pytest.raises(usage_client.ServerError) as caught:
        sync_client.get_usage_summary("c")
    assert caught.value.code is grpc.StatusCode.UNIMPLEMENTED


def test_naive_datetimes_are_refused_before_sending(
    fake: tuple[Flaky, str], sync_client: usage_client.UsageClient
) -> None:
    import datetime as dt

    with pytest.raises(ValueError, match="naive"):
        sync_client.record_usage(
            "c", "tokens", 1, idempotency_key="k-6", event_time=dt.datetime(2026, 1, 1)
        )
    assert fake[0].requests == []


def test_client_metadata_goes_with_every_attempt(fake: tuple[Flaky, str]) -> None:
    servicer, address = fake
    servicer.failures = 1
    auth = [("authorization", "Bearer t0ken")]
    with usage_client.UsageClient(address, retry=QUICK, metadata=auth) as c:
        c.record_usage("c", "tokens", 1, idempotency_key="k-7")
    assert [m.get("authorization") for m in servicer.metadata] == ["Bearer t0ken"] * 2
