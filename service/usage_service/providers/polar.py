"""Polar event ingestion: `POST /v1/events/ingest`, our event id as `external_id`.

Polar refuses timestamps in the future (clamped to now) and answers 422 with
`detail[].loc = ["body", "events", i, ...]` when one event is bad, storing nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from usage_service.plans import Meter
from usage_service.providers import ingest, outcome
from usage_service.providers.config import Endpoint
from usage_service.providers.outcome import ReportEvent

BATCH = 500  # events per call; Polar caps the body (10 MiB), not the count
METADATA_KEYS = 50


def encode(event: ReportEvent, meter: Meter, now: dt.datetime) -> ingest.Body:
    body: ingest.Body = {
        "name": meter.polar.event_name,
        "external_id": event.event_id,
        "timestamp": outcome.iso(ingest.not_future(event.event_time, now)),
        "metadata": ingest.metadata(event, meter.polar.value_key, METADATA_KEYS),
    }
    if event.provider_customer_id:
        body["customer_id"] = event.provider_customer_id
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


WIRE = ingest.Wire("polar", "/v1/events/ingest", BATCH, encode, named, reason)


def adapter(endpoint: Endpoint, meters: Mapping[str, Meter], timeout: float) -> ingest.Ingest:
    headers = {"Authorization": f"Bearer {endpoint.api_key}"}
    return ingest.Ingest(WIRE, ingest.client(endpoint.base_url, headers, timeout), meters)
