"""The asyncio client."""

from __future__ import annotations

import asyncio
import datetime as dt
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
from usage.v1 import (
    customer_pb2,
    customer_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

from usage_client import _channel, _convert
from usage_client import _errors as errors
from usage_client import _types as records
from usage_client._retry import RetryPolicy, log_retry


def _untyped(interceptors: Sequence[Any]) -> list[Any]:
    """grpc-stubs leaves aio channels' interceptor type open; the channel takes a list."""
    return list(interceptors)


class AsyncUsageClient:
    """An asyncio client of usage.v1's UsageService and CustomerService.

    Every call has a deadline (`timeout` seconds per attempt; the constructor's default or the
    call's own) and is retried on UNAVAILABLE, DEADLINE_EXCEEDED and ABORTED by `retry`, sending
    the very same request, idempotency key included. Failures raise `UsageError` subclasses.
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
        self._customers = customer_pb2_grpc.CustomerServiceStub(self._channel)

    async def close(self, grace: float | None = None) -> None:
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
