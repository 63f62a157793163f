"""The one server interceptor: access control, overload protection, deadlines, request ids and
RPC metrics, in front of every usage.v1 method. Health and reflection need no token, so the
streams they keep open are capped instead; a method nobody registered is answered UNIMPLEMENTED.

It is on the hot path, so each method's wrapped handler is built once and cached (the server's
own methods only, so the cache cannot grow), and a call costs a metadata scan, a token hash when
tokens are configured, and a counter update.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeAlias

import grpc

from usage.v1 import usage_pb2
from usage_service import logs, metrics
from usage_service.api import auth
from usage_service.api.errors import ApiError

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
Behaviour = Callable[[Any, Context], Awaitable[Any]]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"
# Health Watch and reflection streams open at once, from every caller together; more are
# refused. They need no token, so without this cap they could use up the server's RPC limit.
MAX_OPEN_STREAMS = 32
MAX_WATCHES = 2000  # WatchUsage streams open at once on one server, from every caller together
MAX_WATCHES_PER_CALLER = 500  # ... from one caller (its token's client, or its address)


class _Undecodable:
    """Stands in for a request whose bytes are not the method's message."""


UNDECODABLE = _Undecodable()


def _status(reason: str, message: str) -> grpc.Status:
    return ApiError(reason, message).status()


_MISSING_TOKEN = _status("UNAUTHENTICATED", "missing bearer token (authorization metadata)")
_UNKNOWN_TOKEN = _status("UNAUTHENTICATED", "unknown bearer token")
_OVERLOADED = _status("OVERLOADED", "too many calls in flight; retry with backoff")
_DEADLINE = _status("DEADLINE_EXCEEDED", "the deadline passed before the call was served")
_UNDECODABLE = _status("UNDECODABLE_REQUEST", "the request could not be parsed")
_TOO_MANY_STREAMS = _status(
    "TOO_MANY_STREAMS", "too many health and reflection streams open; retry with backoff"
)
_UNKNOWN_METHOD = _status("UNKNOWN_METHOD", "no such method on this server")
_TOO_MANY_WATCHES = _status(
    "TOO_MANY_WATCHES", "too many WatchUsage streams open; close one or retry with backoff"
)


def _observe_record(response: Any) -> None:
    if not response.duplicate:
        metrics.EVENTS_RECORDED.labels("RecordUsage").inc()


def _observe_batch(response: Any) -> None:
    fresh = sum(1 for r in response.responses if not r.duplicate)
    if fresh:
        metrics.EVENTS_RECORDED.labels("BatchRecordUsage").inc(fresh)


_REASON_NAMES = {
    value: name.removeprefix("ENTITLEMENT_REASON_").lower()
    for name, value in usage_pb2.EntitlementReason.items()
}


def _observe_check(response: Any) -> None:
    reason = _REASON_NAMES.get(response.reason, "unknown")
    metrics.ENTITLEMENT_DECISIONS.labels(reason, "true" if response.allowed else "false").inc()
    if response.event_id and not response.duplicate:
        metrics.EVENTS_RECORDED.labels("CheckEntitlement").inc()


_OBSERVERS: dict[str, Callable[[Any], None]] = {
    "RecordUsage": _observe_record,
    "BatchRecordUsage": _observe_batch,
    "CheckEntitlement": _observe_check,
}


class Interceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(
        self,
        tokens: auth.Tokens,
        max_in_flight: int,
        max_open_streams: int = MAX_OPEN_STREAMS,
        max_watches: int = MAX_WATCHES,
        max_watches_per_caller: int = MAX_WATCHES_PER_CALLER,
    ) -> None:
        self.tokens = tokens
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.max_open_streams = max_open_streams
        self.open_streams = 0
        self.max_watches = max_watches
        self.max_watches_per_caller = max_watches_per_caller
        self.watches: dict[str, int] = {}  # caller -> its open usage.v1 streams
        self.handlers: dict[str, Handler] = {}  # by method path: registered methods only
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()

    async def intercept_service(  # type: ignore[override]
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        method: str = handler_call_details.method
        try:
            return self.handlers[method]
        except KeyError:
            pass
        handler = await continuation(handler_call_details)
        if handler is None:  # not cached: any caller can make up any number of names
            return _UNKNOWN_METHOD_HANDLER
        if method.startswith(auth.OPEN_PREFIXES):
            handler = self._cap_streams(handler)
        else:
            handler = self._wrap(method, handler)
        self.handlers[method] = handler
        return handler

    def _cap_streams(self, handler: Handler) -> Handler:
        """Refuses a health or reflection stream while MAX_OPEN_STREAMS are open."""
        inner: Any  # the stubs know only the synchronous signatures
        if handler.unary_stream is not None:
            inner, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        elif handler.stream_stream is not None:
            inner, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        else:
            return handler  # a unary call (Health/Check) holds nothing open

        async def admit(context: Context) -> None:
            if self.open_streams >= self.max_open_streams:
                await _abort(context, _TOO_MANY_STREAMS)
            self.open_streams += 1

        # gRPC serves a stream handler by its kind: a coroutine that writes to the context
        # (health's Watch) or an async generator (reflection). The wrapper keeps the kind.
        if inspect.isasyncgenfunction(inner):

            async def generator(request: Any, context: Context) -> AsyncIterator[Any]:
                await admit(context)
                try:
                    async for response in inner(request, context):
                        yield response
                finally:
                    self.open_streams -= 1

            behaviour: Any = generator
        else:

            async def coroutine(request: Any, context: Context) -> Any:
                await admit(context)
                try:
                    return await inner(request, context)
                finally:
                    self.open_streams -= 1

            behaviour = coroutine
        return make(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _admit(
        self, authorization: str | None, scope: str | None, forbidden: grpc.Status
    ) -> tuple[str, grpc.Status | None]:
        """The caller's client name, and the status refusing it (None: admitted)."""
        if not self.tokens.clients:
            return "", forbidden if scope is None else None
        found = self.tokens.identify(authorization)
        if found is None:
            return "", _MISSING_TOKEN if authorization is None else _UNKNOWN_TOKEN
        if scope is None or scope not in found.scopes:
            return found.name, forbidden
        return found.name, None

    def _wrap_stream(self, method: str, handler: Handler, scope: str | None) -> Handler:
        """A usage.v1 stream: the token and scope of a call, then a place among the streams
        one caller (its client, or its address without tokens) and the server may hold open."""
        inner: Any = handler.unary_stream
        forbidden = _status("PERMISSION_DENIED", f"this method needs the scope {scope}")
        label = method.lstrip("/")
        decode = handler.request_deserializer

        def deserialize(data: bytes) -> Any:
            try:
                return decode(data) if decode is not None else data
            except Exception:
                return UNDECODABLE

        async def behaviour(request: Any, context: Context) -> None:
            authorization = None
            for key, value in context.invocation_metadata() or ():
                if key == "authorization" and isinstance(value, str):
                    authorization = value
            client, refusal = self._admit(authorization, scope, forbidden)
            if refusal is None and request is UNDECODABLE:
                refusal = _UNDECODABLE
            caller = client or _peer_host(context.peer())
            if refusal is None and (
                sum(self.watches.values()) >= self.max_watches
                or self.watches.get(caller, 0) >= self.max_watches_per_caller
            ):
                refusal = _TOO_MANY_WATCHES
            if refusal is not None:
                metrics.RPC_CALLS.labels(label, refusal.code.name).inc()
                await _abort(context, refusal)
            self.watches[caller] = self.watches.get(caller, 0) + 1
            metrics.WATCHES.inc()
            code = "OK"
            try:
                await inner(request, context)
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                metrics.WATCHES.dec()
                left = self.watches[caller] - 1
                if left:
                    self.watches[caller] = left
                else:
                    del self.watches[caller]
                metrics.RPC_CALLS.labels(label, code).inc()

        return grpc.unary_stream_rpc_method_handler(
            behaviour,
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, method: str, handler: Handler) -> Handler:
        scope = auth.SCOPE_BY_METHOD.get(method)
        if handler.unary_stream is not None:
            return self._wrap_stream(method, handler, scope)
        if handler.unary_unary is None:  # no usage.v1 method streams requests
            return handler
        inner: Behaviour = handler.unary_unary  # type: ignore[assignment]
        name = method.rsplit("/", 1)[-1]
        label = method.lstrip("/")
        observe = _OBSERVERS.get(name)
        forbidden = _status("PERMISSION_DENIED", f"this method needs the scope {scope}")
        tokens = self.tokens if self.tokens.clients else None
        decode = handler.request_deserializer
        # the metrics of a call answered OK, looked up once (a label lookup takes a lock)
        calls_ok = metrics.RPC_CALLS.labels(label, "OK")
        duration_ok = metrics.RPC_DURATION.labels(label, "OK")

        def deserialize(data: bytes) -> Any:
            try:
                return decode(data) if decode is not None else data
            except Exception:
                return UNDECODABLE

        async def behaviour(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            code = "OK"
            authorization: str | None = None
            caller_id: str | None = None
            for key, value in context.invocation_metadata() or ():
                if key == "authorization" and isinstance(value, str):
                    authorization = value
                elif key == logs.REQUEST_ID_HEADER and isinstance(value, str):
                    caller_id = value
            logs.request_id.set(
                logs.clean_request_id(caller_id)
                if caller_id
                else f"{self._id_prefix}-{next(self._ids):x}"
            )
            client = ""
            try:
                if tokens is not None:
                    found = tokens.identify(authorization)
                    if found is None:
                        await _abort(
                            context, _MISSING_TOKEN if authorization is None else _UNKNOWN_TOKEN
                        )
                    assert found is not None
                    client = found.name
                    if scope is None or scope not in found.scopes:
                        await _abort(context, forbidden)
                elif scope is None:
                    await _abort(context, forbidden)
                if request is UNDECODABLE:
                    await _abort(context, _UNDECODABLE)
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    await _abort(context, _DEADLINE)
                if self.in_flight >= self.max_in_flight:
                    await _abort(context, _OVERLOADED)
                self.in_flight += 1
                metrics.RPC_IN_FLIGHT.inc()
                try:
                    response = await inner(request, context)
                finally:
                    self.in_flight -= 1
                    metrics.RPC_IN_FLIGHT.dec()
                if observe is not None:
                    observe(response)
                return response
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except asyncio.CancelledError:  # the caller went away or its deadline passed
                code = "CANCELLED"
                raise
            except Exception:
                code = "UNKNOWN"
                raise
            finally:
                elapsed = time.perf_counter() - started
                if code == "OK":
                    calls_ok.inc()
                    duration_ok.observe(elapsed)
                else:
                    metrics.RPC_CALLS.labels(label, code).inc()
                    metrics.RPC_DURATION.labels(label, code).observe(elapsed)
                if code != "OK" or log.isEnabledFor(logging.DEBUG):
                    log.log(
                        logging.DEBUG if code == "OK" else logging.INFO,
                        "%s %s",
                        name,
                        code,
                        extra={
                            "action": "rpc",
                            "method": label,
                            "code": code,
                            "client": client,
                            "duration_ms": round(elapsed * 1000, 3),
                        },
                    )

        return grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )


async def _unknown_method(requests: Any, context: Context) -> None:
    await _abort(context, _UNKNOWN_METHOD)


# A stream handler answers at once, whatever the caller meant to send (or not send).
_UNKNOWN_METHOD_HANDLER: Handler = grpc.stream_stream_rpc_method_handler(_unknown_method)


async def _abort(context: Context, status: grpc.Status) -> NoReturn:
    await context.abort_with_status(status)  # type: ignore[attr-defined]
    raise AssertionError("abort_with_status returned")


def _peer_host(peer: str) -> str:
    """A caller's address without its port ('ipv4:10.0.0.7:51234' -> 'ipv4:10.0.0.7')."""
    return peer.rsplit(":", 1)[0] if peer.count(":") > 1 else peer


def _code_name(context: Context) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    try:
        return grpc.StatusCode(code).name if code is not None else "UNKNOWN"
    except ValueError:
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
        return "UNKNOWN"
