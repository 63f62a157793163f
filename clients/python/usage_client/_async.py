"""The asyncio client."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import types
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any

import grpc
from usage.v1 import (
    credit_pb2,
    credit_pb2_grpc,
    customer_pb2,
    customer_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

from usage_client import _channel, _convert, _watch
from usage_client import _errors as errors
from usage_client import _types as records
from usage_client._retry import RetryPolicy, log_retry


def _cancelling() -> bool:
    """Whether the current task is being cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _untyped(interceptors: Sequence[Any]) -> list[Any]:
    """grpc-stubs leaves aio channels' interceptor type open; the channel takes a list."""
    return list(interceptors)


class AsyncUsageClient:
    """An asyncio client of usage.v1's UsageService, CustomerService and CreditService.

    Every call but `watch_usage` has a deadline (`timeout` seconds per attempt; the default or the
    call's own) and is retried on UNAVAILABLE, DEADLINE_EXCEEDED and ABORTED by `retry`, sending
    the very same request, idempotency key included. Failures raise `UsageError` subclasses.
    `watch_usage` is a stream without a deadline that resumes by itself where it ended.
    Create it inside the event loop that uses it; close it when done, or use `async with`.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = _channel.DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: _channel.ChannelOptions = (),
        metadata: _channel.Metadata = (),
        interceptors: Sequence[grpc.aio.UnaryUnaryClientInterceptor[Any, Any]] = (),
    ) -> None:
        """`target` is host:port (or any gRPC target); `credentials` switches TLS on;
        `metadata` is sent with every call (e.g. an authorization header)."""
        self._timeout = _channel.check_timeout(timeout)
        self._retry = retry if retry is not None else RetryPolicy()
        self._metadata = tuple(metadata) or None
        options = _channel.channel_options(channel_options)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(
                target, options=options, interceptors=_untyped(interceptors)
            )
        else:
            self._channel = grpc.aio.secure_channel(
                target, credentials, options=options, interceptors=_untyped(interceptors)
            )
        self._usage = usage_pb2_grpc.UsageServiceStub(self._channel)
        self._credits = credit_pb2_grpc.CreditServiceStub(self._channel)
        self._customers = customer_pb2_grpc.CustomerServiceStub(self._channel)
        self._closed = False

    async def close(self, grace: float | None = None) -> None:
        """Closes the channel; watches under way end (their iteration stops)."""
        self._closed = True
        await self._channel.close(grace)

    async def __aenter__(self) -> AsyncUsageClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        await self.close()

    async def record_usage(
        self,
        customer_id: str,
        meter: str,
        quantity: int,
        *,
        idempotency_key: str,
        event_time: dt.datetime | None = None,
        properties: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> records.RecordResult:
        """Records one usage event; returns once it is committed.

        `idempotency_key` names the event for ever (see `idempotency_key()`): recording it again
        returns the original event with duplicate=True; the same key with another payload raises
        AlreadyExists.
        """
        request = _convert.record_request(
            customer_id, meter, quantity, idempotency_key, event_time, properties
        )
        response: usage_pb2.RecordUsageResponse = await self._call(
            "RecordUsage", self._usage.RecordUsage, request, timeout
        )
        return _convert.record_result(response)

    async def batch_record_usage(
        self, events: Sequence[records.UsageEvent], *, timeout: float | None = None
    ) -> list[records.RecordResult]:
        """Records 1..1000 events atomically; results come in the same order.

        One bad event raises InvalidArgument naming its index and stores nothing; duplicates are
        reported per event.
        """
        request = _convert.batch_request(events)
        response: usage_pb2.BatchRecordUsageResponse = await self._call(
            "BatchRecordUsage", self._usage.BatchRecordUsage, request, timeout
        )
        return _convert.batch_results(response)

    async def check_entitlement(
        self,
        customer_id: str,
        feature: str,
        quantity: int = 0,
        *,
        consume: bool = False,
        idempotency_key: str | None = None,
        properties: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> records.Entitlement:
        """May the customer use `quantity` of `feature` now? (0 asks "is any left?")

        With consume=True (which needs an idempotency key) an allowed quantity is recorded as
        usage atomically with the decision, so racing callers never pass a hard limit.
        """
        request = _convert.check_request(
            customer_id, feature, quantity, consume, idempotency_key, properties
        )
        response: usage_pb2.CheckEntitlementResponse = await self._call(
            "CheckEntitlement", self._usage.CheckEntitlement, request, timeout
        )
        return _convert.entitlement(response)

    async def get_usage_summary(
        self, customer_id: str, meter: str | None = None, *, timeout: float | None = None
    ) -> records.UsageSummary:
        """The customer's usage in the current billing period, per meter (or only `meter`)."""
        request = _convert.summary_request(customer_id, meter)
        response: usage_pb2.GetUsageSummaryResponse = await self._call(
            "GetUsageSummary", self._usage.GetUsageSummary, request, timeout
        )
        return _convert.summary(response)

    async def watch_usage(
        self,
        customer_id: str,
        meters: Sequence[str] = (),
        resume_after_version: int | None = None,
        *,
        retry: RetryPolicy | None = None,
    ) -> AsyncGenerator[records.UsageChange, None]:
        """The customer's usage as it changes: a SNAPSHOT, then one `UsageChange` per committed
        change, in order (`async for change in client.watch_usage(...)`); only `meters` when
        given; after `resume_after_version` when given (a SNAPSHOT with reason RESUME_TOO_OLD when
        the service no longer keeps the changes after it).

        The stream has no deadline. When it ends with UNAVAILABLE (a dropped connection, a
        server shutting down), a retryable code of `retry` (default the client's) or
        RESOURCE_EXHAUSTED SLOW_CONSUMER, it is resumed after the last version yielded, with
        backoff: nothing is missed or repeated. Other ends raise their `UsageError` (NotFound
        for an unknown customer); so does a stream that cannot be resumed within `max_attempts`
        attempts in a row. Closing the client ends the iteration. Or leave the loop: the stream is
        cancelled when the generator is closed (at once with `contextlib.aclosing`, else when it
        is collected).
        """
        watch = _watch.Watch.start(
            customer_id, meters, resume_after_version, self._retry if retry is None else retry
        )
        while not self._closed:
            call = self._usage.WatchUsage(watch.request(), metadata=self._metadata)
            started = time.monotonic()
            try:
                async for message in call:
                    yield watch.received(message)
                return  # the server ended the stream: the watch is over
            except asyncio.CancelledError:
                if self._closed and not _cancelling():
                    return  # the channel was closed under the stream, not the task cancelled
                raise
            except grpc.RpcError as exc:
                if self._closed:
                    return
                delay = watch.ended(exc, time.monotonic() - started)
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def get_decision(
        self, decision_id: str, *, timeout: float | None = None
    ) -> records.Decision:
        """A kept decision (an Entitlement's `decision_id`): the request as it was checked and
        the answer exactly as it was given. NotFound when no decision is kept under the id."""
        request = _convert.decision_request(decision_id)
        response: usage_pb2.GetDecisionResponse = await self._call(
            "GetDecision", self._usage.GetDecision, request, timeout
        )
        return _convert.decision(response)

    async def upsert_customer(
        self, customer: records.Customer, *, timeout: float | None = None
    ) -> records.Customer:
        """Creates or replaces a customer; returns it as stored."""
        request = _convert.upsert_request(customer)
        response: customer_pb2.UpsertCustomerResponse = await self._call(
            "UpsertCustomer", self._customers.UpsertCustomer, request, timeout
        )
        return _convert.customer(response.customer)

    async def get_customer(
        self, customer_id: str, *, timeout: float | None = None
    ) -> records.Customer:
        """The customer; NotFound for an unknown id."""
        request = _convert.get_customer_request(customer_id)
        response: customer_pb2.GetCustomerResponse = await self._call(
            "GetCustomer", self._customers.GetCustomer, request, timeout
        )
        return _convert.customer(response.customer)

    async def create_grant(
        self,
        customer_id: str,
        feature: str,
        amount: int,
        *,
        idempotency_key: str,
        priority: int = 0,
        effective_time: dt.datetime | None = None,
        expire_time: dt.datetime | None = None,
        timeout: float | None = None,
    ) -> records.CreateGrantResult:
        """Grants `amount` prepaid units of `feature` (a top-up, e.g. a credit-pack purchase).

        Lower `priority` burns first; `effective_time` defaults to now (at most 5 minutes in the
        past); `expire_time` None never expires. `idempotency_key` names the grant for ever:
        creating it again returns the original grant with duplicate=True; the same key with
        another grant raises AlreadyExists.
        """
        request = _convert.create_grant_request(
            customer_id, feature, amount, idempotency_key, priority, effective_time, expire_time
        )
        response: credit_pb2.CreateGrantResponse = await self._call(
            "CreateGrant", self._credits.CreateGrant, request, timeout
        )
        return _convert.create_grant_result(response)

    async def void_grant(
        self, customer_id: str, grant_id: str, *, timeout: float | None = None
    ) -> records.VoidGrantResult:
        """Voids a grant: its remaining units are removed from now on. Voiding it again changes
        nothing (voided=0), so a retried call answers 0 when an earlier attempt took effect.
        NotFound for an unknown grant."""
        request = _convert.void_grant_request(customer_id, grant_id)
        response: credit_pb2.VoidGrantResponse = await self._call(
            "VoidGrant", self._credits.VoidGrant, request, timeout
        )
        return _convert.void_grant_result(response)

    async def list_grants(
        self,
        customer_id: str,
        feature: str | None = None,
        *,
        include_inactive: bool = False,
        timeout: float | None = None,
    ) -> list[records.Grant]:
        """The customer's grants (only of `feature` when given) in burn order, with what each
        has left; active and pending ones only, unless `include_inactive` (spent, expired and
        voided ones too)."""
        request = _convert.list_grants_request(customer_id, feature, include_inactive)
        response: credit_pb2.ListGrantsResponse = await self._call(
            "ListGrants", self._credits.ListGrants, request, timeout
        )
        return _convert.grants(response)

    async def _call(
        self, name: str, method: Callable[..., Any], request: Any, timeout: float | None
    ) -> Any:
        deadline = self._timeout if timeout is None else _channel.check_timeout(timeout)
        attempt = 1
        while True:
            try:
                return await method(request, timeout=deadline, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = errors.status_code(exc)
                if not self._retry.should_retry(code, attempt):
                    raise errors.from_rpc_error(exc, attempt) from exc
                delay = self._retry.backoff(attempt)
                log_retry(name, attempt, code, delay)
                await asyncio.sleep(delay)
                attempt += 1
