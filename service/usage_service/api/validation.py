"""Request validation: every field violation is collected, then reported together."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from google.protobuf import timestamp_pb2

from usage.v1 import usage_pb2
from usage_service import domain, periods
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
    problem = text_problem(value, required)
    if problem:
        v.add(field, problem)


def text_problem(value: str, required: bool = True) -> str:
    """What is wrong with an id or key ('' when nothing is)."""
    if not value:
        return "must not be empty" if required else ""
    if len(value) > MAX_ID_LENGTH:
        return f"must be at most {MAX_ID_LENGTH} characters, not {len(value)}"
    if "\x00" in value:
        return "must not contain NUL characters"
    return ""


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


def bounded_time(v: Violations, field: str, ts: timestamp_pb2.Timestamp) -> dt.datetime | None:
    """A timestamp within the times periods and events may take."""
    when = timestamp(v, field, ts)
    if when is not None and not periods.EARLIEST <= when < periods.LATEST:
        v.add(
            field,
            f"must be from {periods.EARLIEST.date().isoformat()} "
            f"to before {periods.LATEST.date().isoformat()}",
        )
        return None
    return when


def usage_event(
    v: Violations,
    prefix: str,
    req: usage_pb2.RecordUsageRequest,
    plans: Plans,
    now: dt.datetime,
    event_id: str = "",
) -> domain.UsageEvent | None:
    """Checks one RecordUsageRequest; returns the event to store, or None when invalid.
    Field names are only built for violations: a batch checks up to 1000 of these."""
    before = len(v)
    customer_id, meter, quantity = req.customer_id, req.meter, req.quantity
    key, props = req.idempotency_key, req.properties
    problem = text_problem(customer_id)
    if problem:
        v.add(prefix + "customer_id", problem)
    if meter not in plans.meters:
        v.add(prefix + "meter", f"unknown meter {meter[:100]!r}" if meter else "must not be empty")
    if quantity < 0:
        v.add(prefix + "quantity", f"must be >= 0, not {quantity}")
    problem = text_problem(key)
    if problem:
        v.add(prefix + "idempotency_key", problem)
    if props:
        properties(v, prefix + "properties", props)
    given: dt.datetime | None = None
    if req.HasField("event_time"):
        given = bounded_time(v, prefix + "event_time", req.event_time)
        if given is not None and given > now + MAX_FUTURE:
            v.add(prefix + "event_time", "must not be more than 5 minutes in the future")
    if len(v) > before:
        return None
    return domain.UsageEvent(
        event_id=event_id or new_event_id(),
        customer_id=customer_id,
        meter=meter,
        quantity=quantity,
        idempotency_key=key,
        event_time=given or now,
        properties=dict(props) if props else {},
        payload_hash=domain.payload_hash(meter, quantity, given, props),
    )
