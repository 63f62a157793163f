"""Creem event ingestion: `POST /v1/events/ingest`, header `x-api-key`, our event id as `event_id`.

Read against the official TypeScript SDK `creem` 1.13.0 (`src/funcs/eventsIngestEvents.ts`,
`src/models/components/ingestusageevent{api,sapi}requestdto.ts`,
`ingestusageeventsapiresponsedto.ts`, `ingestusageeventwarningapidto.ts`,
`usagemeteringerrordetailapidto.ts`, `src/models/errors/usagemeteringerrorapiresponsedto.ts`).

Every attribute goes in `properties` (Creem refuses `metadata` since 1.9.0): the value under the
plans file's key, then the event's properties. A customer with a Creem id is sent as
`customer_id`, otherwise our customer id as `external_customer_id` (the id registered on the
Creem customer as `external_id`). One invalid event gives 422
`{"error": {"type", "code", "message", "param": "events[3].customer_id", ...}}`, storing nothing.
Success is 202 `{"accepted", "event_ids", "warnings": [{"index", "code", "message"}]}`: a warned
event is stored but will never bill, so it is answered as rejected with Creem's reason.
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
LIMITS = ingest.Limits(keys=50, key_length=40, value_length=500)  # properties
_INDEX = re.compile(r"events\[(\d+)\]")
_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")  # customer ids, external ones included


def encode(event: ReportEvent, meter: Meter, now: dt.datetime) -> ingest.Body | str:
    properties = ingest.attributes(event, meter.creem.value_key, LIMITS)
    if isinstance(properties, str):
        return properties
    body: ingest.Body = {"name": meter.creem.event_name}
    if event.provider_customer_id:
        body["customer_id"] = event.provider_customer_id
    elif _ID.fullmatch(event.customer_id):
        body["external_customer_id"] = event.customer_id
    else:
        return (
            "no Creem customer id (provider_customer_id), and the customer id is not a valid "
            "Creem external_customer_id (letters, digits, _ and - only)"
        )
    body.update(
        event_id=event.event_id, timestamp=outcome.iso(event.event_time), properties=properties
    )
    return body


def _error(body: Any) -> dict[str, Any]:
    """The error object: `{"error": {...}}`, or a flat object from an older server."""
    if isinstance(body, dict):
        inner = body.get("error")
        return inner if isinstance(inner, dict) else body
    return {}


def named(body: Any) -> Mapping[int, str]:
    param = _error(body).get("param")
    match = _INDEX.search(param) if isinstance(param, str) else None
    return {int(match.group(1)): reason(body)} if match else {}


def reason(body: Any) -> str:
    error = _error(body)
    if not error:
        return str(body)[:500]
    message = error.get("message", body)
    text = "; ".join(map(str, message)) if isinstance(message, list) else str(message)
    code, param = error.get("code"), error.get("param")
    text = f"{code}: {text}" if code else text
    return f"{param}: {text}"[:500] if param else text[:500]


def accepted(body: Any, sent: int) -> ingest.Accepted | None:
    if ingest.count(body, "accepted") is None:
        return None
    warnings = body.get("warnings") or []
    if not isinstance(warnings, list):
        return None
    unbilled: dict[int, str] = {}
    for w in warnings:
        index = w.get("index") if isinstance(w, dict) else None
        if not isinstance(index, int) or not 0 <= index < sent:
            return None
        text = f"{w.get('code')}: {w.get('message')}"[:500]
        unbilled[index] = f"{unbilled[index]}; {text}" if index in unbilled else text
    return ingest.Accepted(unbilled=unbilled)


WIRE = ingest.Wire("creem", "/v1/events/ingest", BATCH, encode, named, reason, accepted)


def adapter(endpoint: Endpoint, meters: Mapping[str, Meter], timeout: float) -> ingest.Ingest:
    headers = {"x-api-key": endpoint.api_key}
    return ingest.Ingest(WIRE, ingest.client(endpoint.base_url, headers, timeout), meters)
