"""Every error the API returns, as google.rpc.Status with an ErrorInfo (and a BadRequest for bad
input), and the one place where lower-level failures are mapped to them."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from usage_service.domain.errors import (
    ConcurrencyConflict,
    DatabaseUnavailable,
    GrantKeyConflict,
    KeyConflict,
    PeriodsPruned,
    ValueOutOfRange,
)
from usage_service.storage import errors as storage_errors

DOMAIN = "usage.v1"
log = logging.getLogger(__name__)
# A status travels in trailing metadata, which gRPC clients refuse past 16 KiB, and some at
# random past 8 KiB. The message goes twice (grpc-message, percent-encoded, and inside the
# details, base64-encoded), so both are bounded to keep the whole well under 8 KiB.
MAX_MESSAGE_BYTES = 512  # UTF-8 bytes of the message
MAX_VIOLATIONS_BYTES = 2048  # serialized BadRequest; the violations past it are counted

# The reasons callers may branch on: ErrorInfo.reason -> (status code, meaning).
REASONS: Mapping[str, tuple[grpc.StatusCode, str]] = {
    "INVALID_REQUEST": (grpc.StatusCode.INVALID_ARGUMENT, "a field is malformed; see BadRequest"),
    "IDEMPOTENCY_KEY_REUSED": (
        grpc.StatusCode.ALREADY_EXISTS,
        "the idempotency key already names an event with another payload",
    ),
    "CUSTOMER_NOT_FOUND": (grpc.StatusCode.NOT_FOUND, "no customer with this id"),
    "DECISION_NOT_FOUND": (grpc.StatusCode.NOT_FOUND, "no decision kept with this id"),
    "GRANT_NOT_FOUND": (grpc.StatusCode.NOT_FOUND, "no grant with this id for the customer"),
    "TOTAL_OUT_OF_RANGE": (
        grpc.StatusCode.INVALID_ARGUMENT,
        "the customer's total for the meter would exceed the largest int64",
    ),
    "PERIODS_PRUNED": (
        grpc.StatusCode.FAILED_PRECONDITION,
        "the period starts before the customer's pruned history, whose boundaries are closed",
    ),
    "CONCURRENCY_CONFLICT": (grpc.StatusCode.ABORTED, "a concurrent write conflicted; retry"),
    "DATABASE_UNAVAILABLE": (grpc.StatusCode.UNAVAILABLE, "the database cannot be reached; retry"),
    "UNAUTHENTICATED": (grpc.StatusCode.UNAUTHENTICATED, "no bearer token, or an unknown one"),
    "PERMISSION_DENIED": (grpc.StatusCode.PERMISSION_DENIED, "the token lacks the method's scope"),
    "OVERLOADED": (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls in flight; retry later"),
    "DEADLINE_EXCEEDED": (grpc.StatusCode.DEADLINE_EXCEEDED, "the caller's deadline had passed"),
    "UNDECODABLE_REQUEST": (grpc.StatusCode.INVALID_ARGUMENT, "the request is not valid protobuf"),
    "TOO_MANY_STREAMS": (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "too many health and reflection streams open; retry later",
    ),
    "UNKNOWN_METHOD": (grpc.StatusCode.UNIMPLEMENTED, "no such method on this server"),
    "TOO_MANY_WATCHES": (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "this caller (or the server) has too many WatchUsage streams open; close one first",
    ),
    "SERVER_SHUTTING_DOWN": (
        grpc.StatusCode.UNAVAILABLE,
        "the server is shutting down; resume the stream (WatchUsage) on another replica",
    ),
    "SLOW_CONSUMER": (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "a WatchUsage caller read nothing for too long; resume with resume_after_version",
    ),
    "INTERNAL_ERROR": (grpc.StatusCode.INTERNAL, "an unexpected error; it has been logged"),
}


class ApiError(Exception):
    def __init__(
        self,
        reason: str,
        message: str,
        violations: Sequence[tuple[str, str]] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = REASONS[reason][0]
        self.message = message
        self.violations = list(violations)
        self.metadata = dict(metadata or {})

    def status(self) -> grpc.Status:
        """The status, small enough for any gRPC client to receive: the violations that fit in
        MAX_VIOLATIONS_BYTES are listed, and ErrorInfo's `unlisted_violations` counts the rest."""
        bad = error_details_pb2.BadRequest()
        for field, description in self.violations:
            violation = bad.field_violations.add(
                field=_clip(field, 200), description=_clip(description, 200)
            )
            if bad.ByteSize() > MAX_VIOLATIONS_BYTES:
                bad.field_violations.remove(violation)
                break
        metadata = dict(self.metadata)
        unlisted = len(self.violations) - len(bad.field_violations)
        if unlisted:
            metadata["unlisted_violations"] = str(unlisted)
        details: list[Message] = [
            error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=metadata)
        ]
        if bad.field_violations:
            details.append(bad)
        packed = []
        for detail in details:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        status = status_pb2.Status(
            code=getattr(code_pb2, self.code.name),
            message=_clip(self.message, MAX_MESSAGE_BYTES),
            details=packed,
        )
        return rpc_status.to_status(status)


def _clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes (on a character boundary)."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "..."


def invalid(violations: Sequence[tuple[str, str]]) -> ApiError:
    summary = "; ".join(_clip(f"{f}: {d}", 90) for f, d in violations[:5])
    more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
    return ApiError("INVALID_REQUEST", f"invalid request: {summary}{more}", violations)


def out_of_range(field: str) -> ApiError:
    return ApiError(
        "TOTAL_OUT_OF_RANGE",
        f"{field}: would take the total of this customer and meter past the largest int64",
        [(field, "would take the total of this customer and meter past the largest int64")],
    )


def customer_not_found(customer_id: str) -> ApiError:
    return ApiError(
        "CUSTOMER_NOT_FOUND",
        f"no customer {customer_id[:100]!r}",
        metadata={"customer_id": customer_id},
    )


def decision_not_found(decision_id: str) -> ApiError:
    return ApiError(
        "DECISION_NOT_FOUND",
        f"no decision {decision_id!r} is kept",
        metadata={"decision_id": decision_id},
    )


def grant_not_found(customer_id: str, grant_id: str) -> ApiError:
    return ApiError(
        "GRANT_NOT_FOUND",
        f"no grant {grant_id!r} for customer {customer_id[:100]!r}",
        metadata={"customer_id": customer_id, "grant_id": grant_id},
    )


def to_api_error(exc: BaseException, method: str) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    exc = storage_errors.translate(exc)
    if isinstance(exc, GrantKeyConflict):
        return ApiError(
            "IDEMPOTENCY_KEY_REUSED",
            "idempotency key already used for another grant; the first grant stays",
            metadata={"grant_id": exc.grant_id},
        )
    if isinstance(exc, KeyConflict):
        return ApiError(
            "IDEMPOTENCY_KEY_REUSED",
            f"idempotency key already used with another payload (item {exc.index}); "
            "the first event stays",
            metadata={"event_id": exc.event_id, "index": str(exc.index)},
        )
    if isinstance(exc, PeriodsPruned):
        return ApiError(
            "PERIODS_PRUNED",
            f"events before {exc.horizon.isoformat()} were pruned: no period may start before it",
            [
                (
                    "customer.current_period_start_time",
                    f"must not be before {exc.horizon.isoformat()}",
                )
            ],
            metadata={"pruned_before": exc.horizon.isoformat()},
        )
    if isinstance(exc, ValueOutOfRange):
        return ApiError("TOTAL_OUT_OF_RANGE", "quantity would overflow the period's total")
    if isinstance(exc, ConcurrencyConflict):
        return ApiError("CONCURRENCY_CONFLICT", "a concurrent write conflicted; retry")
    if isinstance(exc, DatabaseUnavailable):
        log.warning("%s: database unavailable: %r", method, exc, extra={"action": "rpc"})
        return ApiError("DATABASE_UNAVAILABLE", "the database is unavailable; retry")
    log.exception("%s failed", method, exc_info=exc, extra={"action": "rpc"})
    return ApiError("INTERNAL_ERROR", "internal error")


Servicer = TypeVar("Servicer")
Handler = Callable[[Servicer, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


def rpc(handler: Handler[Servicer]) -> Handler[Servicer]:
    """Answers every failure of a handler with a rich status; no stack trace reaches callers."""

    @functools.wraps(handler)
    async def wrapper(
        self: Servicer, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        try:
            return await handler(self, request, context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the one place lower-level failures become API errors
            error = to_api_error(exc, handler.__name__)
        await context.abort_with_status(error.status())  # type: ignore[attr-defined]

    return wrapper
