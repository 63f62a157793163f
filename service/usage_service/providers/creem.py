"""Creem event ingestion: `POST /v1/events/ingest`, header `x-api-key`, our event id as `event_id`.

Creem meters read numeric `properties`: the value goes there under the plans file's key, the
event's own properties go in `metadata`. One invalid event gives 422 with `param` such as
`events[3].customer_id` and nothing stored.
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

BATCH = 100  # events per call: Creem's cap
_INDEX = re.compile(r"events\[(\d+)\]")


def encode(event: ReportEvent, meter: Meter, now: dt.datetime) -> ingest.Body | str:
    if not event.provider_customer_id:
        return "the customer has no Creem customer id (provider_customer_id)"
    return {
        "name": meter.creem.event_name,
        "customer_id": event.provider_customer_id,
        "event_id": event.event_id,
        "timestamp": outcome.iso(event.event_time),
        "properties": {meter.creem.value_key: event.quantity},
        "metadata": dict(sorted(event.properties.items())),
    }


def named(body: Any) -> Mapping[int, str]:
    param = body.get("param") if isinstance(body, dict) else None
    match = _INDEX.search(param) if isinstance(param, str) else None
    return {int(match.group(1)): reason(body)} if match else {}


def reason(body: Any) -> str:
    if isinstance(body, dict):
        message = body.get("message", body)
        param = body.get("param")
        text = "; ".join(map(str, message)) if isinstance(message, list) else str(message)
        return f"{param}: {text}"[:500] if param else text[:500]
    return str(body)[:500]


WIRE = ingest.Wire("creem", "/v1/events/ingest", BATCH, encode, named, reason)


def adapter(endpoint: Endpoint, meters: Mapping[str, Meter], timeout: float) -> ingest.Ingest:
    headers = {"x-api-key": endpoint.api_key}
    return ingest.Ingest(WIRE, ingest.client(endpoint.base_url, headers, timeout), meters)
