"""Request validation: every field violation is collected, then reported together."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from google.protobuf import timestamp_pb2

from usage.v1 import usage_pb2
from usage_service import domain
from usage_service.api.errors import invalid
from usage_service.plans import Plans
from usage_service.storage.store import new_event_id

MAX_ID_LENGTH = 255  # characters, for customer ids, idempotency keys and provider ids
MAX_BATCH = 1000  # events per BatchRecordUsage
MAX_PROPERTIES = 50  # keys per event (Polar's metadata cap)
MAX_PROPERTY_KEY = 40  # characters
MAX_PROPERTY_VALUE = 500  # characters
MAX_FUTURE = dt.timedelta(minutes=5)  # how far ahead an event_time may be


class Violations(list[tuple[str, str]]):
    def add(self, field: str, description: str) -> None:
        self.append((field, description))

    def check(self) -> None:
        if self:
            raise invalid(self)


def text(v: Violations, field: str, value: str, required: bool = True) -> None:
    if not value:
        if required:
            v.add(field, "must not be empty")
    elif len(value) > MAX_ID_LENGTH:
        v.add(field, f"must be at most {MAX_ID_LENGTH} characters, not {len(value)}")
    elif "\x00" in value:
        v.add(field, "must not contain NUL characters")


def properties(v: Violations, field: str, props: Mapping[str, str]) -> None:
    if len(props) > MAX_PROPERTIES:
        v.add(field, f"at most {MAX_PROPERTIES} properties, not {len(props)}")
        return
    for key, value in props.items():
        if not key or len(key) > MAX_PROPERTY_KEY or "\x00" in key:
            v.add(f"{field}[{key!r}]", f"keys must be 1..{MAX_PROPERTY_KEY} characters, no NUL")
        if len(value) > MAX_PROPERTY_VALUE or "\x00" in value:
            v.add(
                f"{field}[{key!r}]",
                f"values must be at most {MAX_PROPERTY_VALUE} characters, no NUL",
            )


def timestamp(v: Violations, field: str, ts: timestamp_pb2.Timestamp) -> dt.datetime | None:
    try:
        return ts.ToDatetime(tzinfo=dt.UTC)
    except (ValueError, OverflowError):
        v.add(field, "is not a valid timestamp")
        return None


def usage_event(
    v: Violations,
    prefix: str,
    req: usage_pb2.RecordUsageRequest,
    plans: Plans,
    now: dt.datetime,
) -> domain.UsageEvent | None:
    """Checks one RecordUsageRequest; returns the event to store, or None when invalid."""
    before = len(v)
    text(v, f"{prefix}customer_id", req.customer_id)
    if not req.meter:
        v.add(f"{prefix}meter", "must not be empty")
    elif req.meter not in plans.meters:
        v.add(f"{prefix}meter", f"unknown meter {req.meter[:100]!r}")
    if req.quantity < 0:
        v.add(f"{prefix}quantity", f"must be >= 0, not {req.quantity}")
    text(v, f"{prefix}idempotency_key", req.idempotency_key)
    properties(v, f"{prefix}properties", req.properties)
    given: dt.datetime | None = None
    if req.HasField("event_time"):
        given = timestamp(v, f"{prefix}event_time", req.event_time)
        if given is not None and given > now + MAX_FUTURE:
            v.add(f"{prefix}event_time", "must not be more than 5 minutes in the future")
    if len(v) > before:
        return None
    return domain.UsageEvent(
        event_id=new_event_id(),
        customer_id=req.customer_id,
        meter=req.meter,
        quantity=req.quantity,
        idempotency_key=req.idempotency_key,
        event_time=given or now,
        properties=dict(req.properties),
        payload_hash=domain.payload_hash(req.meter, req.quantity, given, req.properties),
    )
