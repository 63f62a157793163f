"""Polar event ingestion: `POST /v1/events/ingest`, our event id as `external_id`.

Read against polar-sdk 1.0.2 (`polar/base.py`, `polar/v2026_10/{client,inputs,outputs}.py`).
Every call carries a pinned `Polar-Version` (an unknown version is a 404; without one Polar
answers in its default version, which may change under us). `customer_id` is a Polar customer
UUID; a customer without one is sent by our customer id as `external_customer_id`.

Polar refuses any timestamp after its own clock, failing the whole batch: timestamps are clamped
to our now minus `CLOCK_SKEW`. Polar bills by receipt time, not by the event timestamp, so the
clamp changes no bill; the margin covers a Polar clock behind ours by up to that much. One bad
event gives 422 with `detail[].loc = ["body", "events", i, ...]`, storing nothing. Success is
200 `{"inserted", "duplicates"}`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

from usage_service.plans import Meter
from usage_service.providers import ingest, outcome
from usage_service.providers.config import Endpoint
from usage_service.providers.outcome import ReportEvent

BATCH = 500  # events per call; Polar caps the body (10 MiB), not the count
VERSION = "2026-10"  # the Polar-Version polar-sdk 1.0.2 sends (`polar.v2026_10`)
CLOCK_SKEW = dt.timedelta(seconds=5)
# metadata: at most 50 keys of at most 40 characters, strings of at most 500; keys like `_llm`
# and `_cost` carry structured data, so a leading underscore is Polar's
LIMITS = ingest.Limits(keys=50, key_length=40, value_length=500)
RESERVED_PREFIX = "_"


_UUID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}|[0-9a-fA-F]{32}")


def is_customer_id(text: str) -> bool:
    """Whether `text` is a Polar customer id: a UUID, hyphenated or as 32 hex digits."""
    return _UUID.fullmatch(text) is not None


def encode(event: ReportEvent, meter: Meter, now: dt.datetime) -> ingest.Body | str:
    customer = event.provider_customer_id
    if customer and not is_customer_id(customer):
        return f"provider_customer_id {customer[:60]!r} is not a Polar customer id (a UUID)"
    metadata = ingest.attributes(event, meter.polar.value_key, LIMITS, RESERVED_PREFIX)
    if isinstance(metadata, str):
        return metadata
    body: ingest.Body = {
        "name": meter.polar.event_name,
        "external_id": event.event_id,
        "timestamp": outcome.iso(min(event.event_time, now - CLOCK_SKEW)),
        "metadata": metadata,
    }
    if customer:
        body["customer_id"] = customer
    else:
        body["external_customer_id"] = event.customer_id
    return body


def named(body: Any) -> Mapping[int, str]:
    found: dict[int, str] = {}
    details = body.get("detail") if isinstance(body, dict) else None
    for item in details if isinstance(details, list) else []:
        loc = item.get("loc") if isinstance(item, dict) else None
        if isinstance(loc, list) and len(loc) > 2 and loc[:2] == ["body", "events"]:
            if isinstance(loc[2], int):
                where = ".".join(str(part) for part in loc[3:])
                found.setdefault(loc[2], f"{where}: {item.get('msg', item)}".lstrip(": "))
    return found


def reason(body: Any) -> str:
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:500]
    return str(body)[:500]


def accepted(body: Any, sent: int) -> ingest.Accepted | None:
    inserted = ingest.count(body, "inserted")
    if inserted is None:
        return None
    duplicates = ingest.count(body, "duplicates") if "duplicates" in body else 0
    if duplicates is None:
        return None
    return ingest.Accepted(duplicates=duplicates)


WIRE = ingest.Wire("polar", "/v1/events/ingest", BATCH, encode, named, reason, accepted)


def adapter(endpoint: Endpoint, meters: Mapping[str, Meter], timeout: float) -> ingest.Ingest:
    headers = {"Authorization": f"Bearer {endpoint.api_key}", "Polar-Version": VERSION}
    return ingest.Ingest(WIRE, ingest.client(endpoint.base_url, headers, timeout), meters)
