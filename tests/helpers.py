"""Small helpers shared by the tests."""

from __future__ import annotations

import dataclasses
import datetime as dt

import grpc
from google.rpc import error_details_pb2, status_pb2

from usage.v1 import usage_pb2


@dataclasses.dataclass
class Details:
    code: grpc.StatusCode
    reason: str
    domain: str
    metadata: dict[str, str]
    fields: dict[str, str]  # field -> description, from google.rpc.BadRequest


def details(error: grpc.aio.AioRpcError) -> Details:
    """The rich error details of a failed call, read from its trailers."""
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw, f"no rich status on {error.code()}: {error.details()}"
    status = status_pb2.Status.FromString(raw)
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    for item in status.details:
        if item.Is(info.DESCRIPTOR):
            item.Unpack(info)
        elif item.Is(bad.DESCRIPTOR):
            item.Unpack(bad)
    return Details(
        code=error.code(),
        reason=info.reason,
        domain=info.domain,
        metadata=dict(info.metadata),
        fields={v.field: v.description for v in bad.field_violations},
    )


def record(
    customer_id: str = "cus_1",
    meter: str = "tokens",
    quantity: int = 1,
    key: str = "k1",
    when: dt.datetime | None = None,
    **properties: str,
) -> usage_pb2.RecordUsageRequest:
    req = usage_pb2.RecordUsageRequest(
        customer_id=customer_id,
        meter=meter,
        quantity=quantity,
        idempotency_key=key,
        properties=properties,
    )
    if when is not None:
        req.event_time.FromDatetime(when)
    return req
