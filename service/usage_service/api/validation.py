"""Request validation: every field violation is collected, then reported together."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping

from google.protobuf import timestamp_pb2

from usage.v1 import usage_pb2
from usage_service import domain
from usage_service.api.errors import invalid
from usage_service.domain import periods
from usage_service.domain.ids import new_event_id
from usage_service.domain.plans import Meter, Plans
from usage_service.providers import creem, dodo_payments, ingest, polar

MAX_ID_LENGTH = 255  # characters, for customer ids, idempotency keys and provider ids
MAX_BATCH = 1000  # events per BatchRecordUsage
# Properties must reach every provider that keeps them (Polar and Dodo metadata, Creem
# properties) whole, so they take the strictest of their limits; the meter's value travels in
# the same object and takes one of its keys.
_KEPT = (polar.LIMITS, dodo_payments.LIMITS, creem.LIMITS)
MAX_PROPERTIES = min(k.keys for k in _KEPT) - 1  # 49
MAX_PROPERTY_KEY = min(k.key_length for k in _KEPT)  # 40 characters (Polar, Creem)
MAX_PROPERTY_VALUE = min(k.value_length for k in _KEPT)  # 500 characters
RESERVED_PREFIX = polar.RESERVED_PREFIX  # Polar's structured metadata (`_llm`, `_cost`)
MAX_FUTURE = dt.timedelta(minutes=5)  # how far ahead an event_time may be
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


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


def uuid(v: Violations, field: str, value: str) -> None:
    """A required UUID, as the service gives them (8-4-4-4-12 hex digits)."""
    if not value:
        v.add(field, "must not be empty")
    elif not _UUID.fullmatch(value):
        v.add(field, "must be a UUID (8-4-4-4-12 hex digits)")


def properties(
    v: Violations, field: str, props: Mapping[str, str], meter: Meter | None = None
) -> None:
    """Properties every provider keeps whole; with `meter`, none named like its value key."""
    if len(props) > MAX_PROPERTIES:
        v.add(field, f"at most {MAX_PROPERTIES} properties, not {len(props)}")
        return
    taken = (
        {meter.polar.value_key, meter.dodo_payments.value_key, meter.creem.value_key}
        if meter
        else set()
    )
    for key, value in props.items():
        if not key or ingest.js_length(key) > MAX_PROPERTY_KEY or "\x00" in key:
            v.add(
                f"{field}[{key!r}]", f"keys must be 1..{MAX_PROPERTY_KEY} UTF-16 code units, no NUL"
            )
        elif key.startswith(RESERVED_PREFIX):
            v.add(f"{field}[{key!r}]", f"keys must not start with {RESERVED_PREFIX!r} (reserved)")
        elif meter and key in taken:
            v.add(f"{field}[{key!r}]", f"is the key carrying the value of meter {meter.name!r}")
        if ingest.js_length(value) > MAX_PROPERTY_VALUE or "\x00" in value:
            v.add(
                f"{field}[{key!r}]",
                f"values must be at most {MAX_PROPERTY_VALUE} UTF-16 code units, no NUL",
            )


def provider_customer_id(
    v: Violations, field: str, provider: domain.Provider | None, value: str
) -> None:
    """The customer's id at its provider, in the form that provider takes (may be empty)."""
    problem = text_problem(value, required=False)
    if problem:
        v.add(field, problem)
    elif value and provider is domain.Provider.POLAR and not polar.is_customer_id(value):
        v.add(
            field,
            "must be a Polar customer id (a UUID); empty sends customer_id as external_customer_id",
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
        properties(v, prefix + "properties", props, plans.meters.get(meter))
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
