"""watch_usage's resume loop against an in-process fake server that ends its streams as told:
which ends are resumed, from which version, how often, and what is raised."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from usage.v1 import usage_pb2, usage_pb2_grpc

import usage_client
from usage_client import _watch
from usage_client._errors import STATUS_DETAILS_KEY

QUICK = usage_client.RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.01)
OK = None  # an attempt that ends the stream with OK
WAIT = 30.0  # seconds a test waits at most


@dataclasses.dataclass(frozen=True)
class Attempt:
    """What the fake does with one call: send these versions, then end with `code`."""

    versions: Sequence[int]
    code: grpc.StatusCode | None
    reason: str = ""
    hold: bool = False  # keep the stream open after the versions, until the client ends it


class Scripted(usage_pb2_grpc.UsageServiceServicer):  # type: ignore[misc]
    """Plays one Attempt per WatchUsage call; past the script, every call fails UNAVAILABLE."""

    def __init__(self) -> None:
        self.script: list[Attempt] = []
        self.requests: list[usage_pb2.WatchUsageRequest] = []
        self.deadlines: list[float | None] = []
        self.metadata: list[dict[str, str | bytes]] = []
        self.lock = threading.Lock()

    def WatchUsage(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with self.lock:
            self.requests.append(request)
            self.deadlines.append(context.time_remaining())
            self.metadata.append(dict(context.invocation_metadata()))
            attempt = (
                self.script.pop(0) if self.script else Attempt((), grpc.StatusCode.UNAVAILABLE)
            )
        for version in attempt.versions:
            yield usage_pb2.WatchUsageResponse(
                version=version,
                kind=usage_pb2.USAGE_CHANGE_KIND_USAGE,
                meters=[usage_pb2.MeterUsage(meter="tokens", used=version * 10)],
            )
        if attempt.hold:
            ended = threading.Event()
            context.add_callback(ended.set)
            ended.wait(WAIT)
            return
        if attempt.code is not None:
            info = any_pb2.Any()
            info.Pack(error_details_pb2.ErrorInfo(reason=attempt.reason, domain="usage.v1"))
            status = status_pb2.Status(
                code=getattr(code_pb2, attempt.code.name), message="ended", details=[info]
            )
            context.set_trailing_metadata(((STATUS_DETAILS_KEY, status.SerializeToString()),))
            context.abort(attempt.code, "ended")


@pytest.fixture
def fake() -> Iterator[tuple[Scripted, str]]:
    servicer = Scripted()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    usage_pb2_grpc.add_UsageServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def resumed_from(servicer: Scripted) -> list[int | None]:
    return [
        r.resume_after_version if r.HasField("resume_after_version") else None
        for r in servicer.requests
    ]


def endless(time_remaining: float | None) -> bool:
    """Whether a call had no deadline (gRPC reports its time left as None or about 292 years)."""
    return time_remaining is None or time_remaining > 1e9


RESUMED = [
    Attempt((1, 2, 3), grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN"),
    Attempt((4, 6), grpc.StatusCode.RESOURCE_EXHAUSTED, "SLOW_CONSUMER"),
    Attempt((), grpc.StatusCode.UNAVAILABLE),  # a connection refused: nothing received
    Attempt((9,), grpc.StatusCode.DEADLINE_EXCEEDED),
    Attempt((10,), grpc.StatusCode.ABORTED),
    Attempt((11,), OK),
]


async def test_async_resumes_each_retryable_end_after_the_last_version(
    fake: tuple[Scripted, str],
) -> None:
    servicer, address = fake
    servicer.script = list(RESUMED)
    auth = [("authorization", "Bearer t0ken")]
    async with usage_client.AsyncUsageClient(address, retry=QUICK, metadata=auth) as c:
        changes = [change async for change in c.watch_usage("cus_1", meters=["tokens"])]
    assert [ch.version for ch in changes] == [1, 2, 3, 4, 6, 9, 10, 11]
    assert [ch.meter("tokens").used for ch in changes] == [10, 20, 30, 40, 60, 90, 100, 110]
    assert changes[0].kind is usage_client.UsageChangeKind.USAGE
    assert resumed_from(servicer) == [None, 3, 6, 6, 9, 10]
    assert all(list(r.meters) == ["tokens"] and r.customer_id == "cus_1" for r in servicer.requests)
    assert len(servicer.deadlines) == 6 and all(map(endless, servicer.deadlines))
    assert [m.get("authorization") for m in servicer.metadata] == ["Bearer t0ken"] * 6


def test_sync_resumes_each_retryable_end_after_the_last_version(
    fake: tuple[Scripted, str],
) -> None:
    servicer, address = fake
    servicer.script = list(RESUMED)
    with usage_client.UsageClient(address, retry=QUICK) as c:
        changes = list(c.watch_usage("cus_1", resume_after_version=0))
    assert [ch.version for ch in changes] == [1, 2, 3, 4, 6, 9, 10, 11]
    assert resumed_from(servicer) == [0, 3, 6, 6, 9, 10]
    assert len(servicer.deadlines) == 6 and all(map(endless, servicer.deadlines))


@pytest.mark.parametrize(
    ("code", "reason", "raised"),
    [
        (grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND", usage_client.NotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", usage_client.InvalidArgument),
        (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", usage_client.PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", usage_client.Unauthenticated),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WATCHES", usage_client.ResourceExhausted),
        (grpc.StatusCode.INTERNAL, "INTERNAL_ERROR", usage_client.ServerError),
    ],
)
async def test_other_ends_raise_at_once_after_what_came_before(
    fake: tuple[Scripted, str],
    code: grpc.StatusCode,
    reason: str,
    raised: type[usage_client.UsageError],
) -> None:
    servicer, address = fake
    servicer.script = [Attempt((5,), grpc.StatusCode.UNAVAILABLE), Attempt((6,), code, reason)]
    seen = []
    async with usage_client.AsyncUsageClient(address, retry=QUICK) as c:
        with pytest.raises(raised) as caught:
            async for change in c.watch_usage("cus_1"):
                seen.append(change.version)
    assert seen == [5, 6]
    assert (caught.value.code, caught.value.reason, caught.value.attempts) == (code, reason, 1)
    assert len(servicer.requests) == 2


def test_attempts_in_a_row_without_a_message_are_bounded(fake: tuple[Scripted, str]) -> None:
    servicer, address = fake
    with usage_client.UsageClient(address, retry=QUICK) as c:
        with pytest.raises(usage_client.Unavailable) as caught:
            next(c.watch_usage("cus_1"))
    assert caught.value.attempts == QUICK.max_attempts
    assert len(servicer.requests) == QUICK.max_attempts


async def test_a_message_starts_the_count_anew(fake: tuple[Scripted, str]) -> None:
    servicer, address = fake
    unavailable = Attempt((), grpc.StatusCode.UNAVAILABLE)
    # Three failures in a row (one short of QUICK's four), a message, three more, then an end.
    servicer.script = [unavailable] * 3 + [Attempt((1,), grpc.StatusCode.UNAVAILABLE)]
    servicer.script += [unavailable] * 2 + [Attempt((2,), OK)]
    async with usage_client.AsyncUsageClient(address, retry=QUICK) as c:
        versions = [change.version async for change in c.watch_usage("cus_1")]
    assert versions == [1, 2]
    assert resumed_from(servicer) == [None] * 4 + [1, 1, 1]


async def test_retries_off_raise_the_first_end(fake: tuple[Scripted, str]) -> None:
    servicer, address = fake
    servicer.script = [Attempt((1,), grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN")]
    async with usage_client.AsyncUsageClient(address) as c:
        watch = c.watch_usage("cus_1", retry=usage_client.RetryPolicy.disabled())
        assert (await anext(watch)).version == 1
        with pytest.raises(usage_client.Unavailable) as caught:
            await anext(watch)
    assert caught.value.reason == "SERVER_SHUTTING_DOWN"


class Ended(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def test_a_stream_that_stayed_open_starts_the_count_anew() -> None:
    watch = _watch.Watch.start("cus_1", (), None, QUICK)
    for _ in range(QUICK.max_attempts - 1):
        watch.ended(Ended(grpc.StatusCode.UNAVAILABLE), 0.0)
    # Open for a while, so it had connected: its end is the first of a new count.
    watch.ended(Ended(grpc.StatusCode.UNAVAILABLE), _watch.STEADY)
    assert watch.failures == 1
    for _ in range(QUICK.max_attempts - 2):
        watch.ended(Ended(grpc.StatusCode.UNAVAILABLE), 0.0)
    with pytest.raises(usage_client.Unavailable):
        watch.ended(Ended(grpc.StatusCode.UNAVAILABLE), 0.0)


def test_meters_must_be_names_not_one_string() -> None:
    with pytest.raises(TypeError):
        _watch.Watch.start("cus_1", "tokens", None, QUICK)


async def test_closing_the_async_client_ends_the_iteration(fake: tuple[Scripted, str]) -> None:
    servicer, address = fake
    servicer.script = [Attempt((1,), OK, hold=True)]
    c = usage_client.AsyncUsageClient(address, retry=QUICK)
    watch = c.watch_usage("cus_1")
    assert (await anext(watch)).version == 1
    pending = asyncio.ensure_future(anext(watch))
    await c.close()
    async with asyncio.timeout(WAIT):
        with pytest.raises(StopAsyncIteration):
            await pending
    assert len(servicer.requests) == 1


def test_closing_the_blocking_client_ends_the_iteration(fake: tuple[Scripted, str]) -> None:
    servicer, address = fake
    servicer.script = [Attempt((1,), OK, hold=True)]
    c = usage_client.UsageClient(address, retry=QUICK)
    watch = c.watch_usage("cus_1")
    assert next(watch).version == 1
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        rest = pool.submit(list, watch)
        c.close()
        assert rest.result(WAIT) == []
    assert len(servicer.requests) == 1
