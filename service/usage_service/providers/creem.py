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

Read-back: `GET /v1/events?reference=<event_id>` per sent event (`events.listEvents`:
`customer_id`, `meter_id`, `reference`, `limit`, `starting_after`; answer `{"object", "data":
[{id, customer_id, event_id, name, properties, timestamp, created_at, matched_meters}],
"has_more"}`), at most `CONCURRENCY` at a time: one call per sent event. The list has no time
filter (it pages a customer's whole history, oldest first) and `GET /v1/meters/{id}/consumed`
counts by Creem's own billing period and needs Creem's meter id, so neither answers for a period
of ours. An event Creem holds counts when it carries the meter's event name and matches a meter
(`matched_meters` not empty); events never sent by us are not seen.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

import httpx

from usage_service.domain.plans import Meter
from usage_service.domain.reports import ReportEvent
from usage_service.providers import ingest, outcome
from usage_service.providers.config import Endpoint
from usage_service.providers.readback import Query

BATCH = 100  # events per call: Creem's cap
LIMITS = ingest.Limits(keys=50, key_length=40, value_length=500)  # properties
_INDEX = re.compile(r"events\[(\d+)\]")
CONCURRENCY = 8  # read-back calls in flight
REFERENCE_PAGE = 10  # events asked per reference (the SDK's default); a double shows as two
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


async def read(http: httpx.AsyncClient, query: Query) -> list[ingest.Row]:
    gate = asyncio.Semaphore(CONCURRENCY)
    name, key = query.meter.creem.event_name, query.meter.creem.value_key

    async def one(event_id: str) -> list[ingest.Row]:
        params: dict[str, str | int] = {"reference": event_id, "limit": REFERENCE_PAGE}
        async with gate:
            body = await ingest.get(http, "/v1/events", params, reason)
        return [
            ingest.Row(
                str(item["event_id"]),
                ingest.moment(item["timestamp"]),
                ingest.number(item["properties"][key]),
            )
            for item in body["data"]
            if item["name"] == name and item["matched_meters"]
        ]

    found = await asyncio.gather(*(one(s.event_id) for s in query.sent), return_exceptions=True)
    rows: list[ingest.Row] = []
    for answer in found:
        if isinstance(answer, BaseException):
            raise answer
        rows.extend(answer)
    return rows


WIRE = ingest.Wire("creem", "/v1/events/ingest", BATCH, encode, named, reason, accepted, read=read)


def adapter(
    endpoint: Endpoint,
    meters: Mapping[str, Meter],
    timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ingest.Ingest:
    headers = {"x-api-key": endpoint.api_key}
    http = ingest.client(endpoint.base_url, headers, timeout, transport)
    return ingest.Ingest(WIRE, http, meters)
