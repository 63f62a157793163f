"""The exceptions a call can raise, and the one place a failed RPC is mapped to them.

    UsageError                  any failed call; .code, .message, .reason, .domain, .metadata,
    |                           .field_violations, .attempts (the gRPC error is the __cause__)
    +-- TransientError          may succeed later; retried automatically, and safe to retry
    |   |                       yourself with the same idempotency key
    |   +-- Unavailable         UNAVAILABLE (server down, database unreachable)
    |   +-- DeadlineExceeded    DEADLINE_EXCEEDED (the outcome is unknown: retry with the same key)
    |   +-- Aborted             ABORTED (a concurrent write conflicted)
    +-- InvalidArgument         INVALID_ARGUMENT (or OUT_OF_RANGE); .field_violations names
    |                           each bad field; nothing was stored
    +-- AlreadyExists           ALREADY_EXISTS (an idempotency key reused with another payload)
    +-- NotFound                NOT_FOUND
    +-- FailedPrecondition      FAILED_PRECONDITION
    +-- PermissionDenied        PERMISSION_DENIED
    +-- Unauthenticated         UNAUTHENTICATED
    +-- ResourceExhausted       RESOURCE_EXHAUSTED
    +-- Cancelled               CANCELLED
    +-- ServerError             INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED and anything else

The details come from the call's `grpc-status-details-bin` trailer (a google.rpc.Status):
`ErrorInfo` gives reason (UPPER_SNAKE, e.g. "IDEMPOTENCY_KEY_REUSED"), domain ("usage.v1") and
metadata; `BadRequest` gives the field violations (e.g. "requests[3].quantity").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    field: str  # a path into the request, e.g. "requests[3].quantity"
    description: str


class UsageError(Exception):
    """A call failed. Subclasses say how; see the module docstring for the tree."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
        attempts: int = 1,
    ) -> None:
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: Mapping[str, str] = dict(metadata or {})
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)
        self.attempts = attempts
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.reason:
            text += f" [{self.reason}]"
        if self.attempts > 1:
            text += f" (after {self.attempts} attempts)"
        return text


class TransientError(UsageError):
    """The call may succeed later; retry it with the same idempotency key."""


class Unavailable(TransientError):
    pass


class DeadlineExceeded(TransientError):
    """The deadline passed; the call may or may not have taken effect."""


class Aborted(TransientError):
    pass


class InvalidArgument(UsageError):
    """The request is malformed and changed nothing; see field_violations."""


class AlreadyExists(UsageError):
    """The idempotency key already names an event with another payload; the first one stays."""


class NotFound(UsageError):
    pass


class FailedPrecondition(UsageError):
    pass


class PermissionDenied(UsageError):
    pass


class Unauthenticated(UsageError):
    pass


class ResourceExhausted(UsageError):
    pass


class Cancelled(UsageError):
    pass


class ServerError(UsageError):
    """The server failed in a way the caller cannot fix (or answered with an unexpected code)."""


_BY_CODE: Mapping[grpc.StatusCode, type[UsageError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def status_code(error: grpc.RpcError) -> grpc.StatusCode:
    """The code of a failed call; UNKNOWN for an RpcError that carries none."""
    code = getattr(error, "code", None)
    value = code() if callable(code) else None
    return value if isinstance(value, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _details(error: grpc.RpcError) -> str:
    details = getattr(error, "details", None)
    value = details() if callable(details) else None
    return value if isinstance(value, str) else ""


def rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status the server attached to a failed call (sync or asyncio), or None
    when it is absent, unreadable, or names another code than the call's."""
    trailing = getattr(error, "trailing_metadata", None)
    trailers: Iterable[tuple[str, Any]] = (trailing() if callable(trailing) else None) or ()
    for key, value in trailers:
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except DecodeError:
            return None
        return status if status.code == status_code(error).value[0] else None
    return None


def from_rpc_error(error: grpc.RpcError, attempts: int = 1) -> UsageError:
    """Maps a failed call to the matching UsageError, with its decoded details."""
    code = status_code(error)
    message = _details(error)
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    status = rich_status(error)
    if status is not None:
        message = str(status.message) or message
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain = str(info.reason), str(info.domain)
                metadata = {str(k): str(v) for k, v in info.metadata.items()}
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend(
                    FieldViolation(str(v.field), str(v.description)) for v in bad.field_violations
                )
    cls = _BY_CODE.get(code, ServerError)
    return cls(
        code,
        message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=violations,
        attempts=attempts,
    )
