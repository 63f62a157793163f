"""The one mapping from a failed call to a UsageError, with the google.rpc details decoded."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

import usage_client
from usage_client._errors import STATUS_DETAILS_KEY, from_rpc_error


class FakeError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any = ()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers


def rich(code: grpc.StatusCode, message: str, *details: Any) -> tuple[tuple[str, bytes], ...]:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=packed)
    return (("other-bin", b"\x00"), (STATUS_DETAILS_KEY, status.SerializeToString()))


def test_invalid_argument_carries_every_field_violation() -> None:
    code = grpc.StatusCode.INVALID_ARGUMENT
    trailers = rich(
        code,
        "invalid request",
        error_details_pb2.ErrorInfo(reason="INVALID_REQUEST", domain="usage.v1"),
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="requests[3].quantity", description="must be >= 0"
                ),
                error_details_pb2.BadRequest.FieldViolation(
                    field="requests[3].idempotency_key", description="must not be empty"
                ),
            ]
        ),
    )
    error = from_rpc_error(FakeError(code, "invalid request", trailers))
    assert type(error) is usage_client.InvalidArgument
    assert (error.reason, error.domain, error.code) == ("INVALID_REQUEST", "usage.v1", code)
    assert error.field_violations == (
        usage_client.FieldViolation("requests[3].quantity", "must be >= 0"),
        usage_client.FieldViolation("requests[3].idempotency_key", "must not be empty"),
    )
    assert str(error) == "INVALID_ARGUMENT: invalid request [INVALID_REQUEST]"


def test_error_info_metadata_is_kept() -> None:
    code = grpc.StatusCode.ALREADY_EXISTS
    info = error_details_pb2.ErrorInfo(
        reason="IDEMPOTENCY_KEY_REUSED", domain="usage.v1", metadata={"event_id": "e1"}
    )
    error = from_rpc_error(FakeError(code, "reused", rich(code, "reused", info)), attempts=2)
    assert isinstance(error, usage_client.AlreadyExists)
    assert error.metadata == {"event_id": "e1"}
    assert error.attempts == 2
    assert "after 2 attempts" in str(error)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.UNAVAILABLE, usage_client.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, usage_client.DeadlineExceeded),
        (grpc.StatusCode.ABORTED, usage_client.Aborted),
        (grpc.StatusCode.NOT_FOUND, usage_client.NotFound),
        (grpc.StatusCode.FAILED_PRECONDITION, usage_client.FailedPrecondition),
        (grpc.StatusCode.PERMISSION_DENIED, usage_client.PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, usage_client.Unauthenticated),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, usage_client.ResourceExhausted),
        (grpc.StatusCode.CANCELLED, usage_client.Cancelled),
        (grpc.StatusCode.INTERNAL, usage_client.ServerError),
        (grpc.StatusCode.UNIMPLEMENTED, usage_client.ServerError),
        (grpc.StatusCode.UNKNOWN, usage_client.ServerError),
    ],
)
def test_codes_map_to_their_exception(code: grpc.StatusCode, cls: type[Exception]) -> None:
    error = from_rpc_error(FakeError(code, "plain"))
    assert type(error) is cls
    assert (error.message, error.reason, error.field_violations) == ("plain", "", ())
    transient = code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    )
    assert isinstance(error, usage_client.TransientError) == transient
    assert isinstance(error, usage_client.UsageError)


def test_details_that_contradict_the_call_are_ignored() -> None:
    info = error_details_pb2.ErrorInfo(reason="CUSTOMER_NOT_FOUND", domain="usage.v1")
    trailers = rich(grpc.StatusCode.NOT_FOUND, "no customer", info)
    error = from_rpc_error(FakeError(grpc.StatusCode.UNAVAILABLE, "proxy down", trailers))
    assert isinstance(error, usage_client.Unavailable)
    assert (error.message, error.reason) == ("proxy down", "")


def test_unreadable_details_are_ignored() -> None:
    trailers = ((STATUS_DETAILS_KEY, b"\xff\xff not a status"),)
    error = from_rpc_error(FakeError(grpc.StatusCode.INTERNAL, "boom", trailers))
    assert (type(error), error.message) == (usage_client.ServerError, "boom")


def test_an_error_without_a_code_is_unknown() -> None:
    error = from_rpc_error(grpc.RpcError())
    assert isinstance(error, usage_client.ServerError)
    assert error.code is grpc.StatusCode.UNKNOWN
