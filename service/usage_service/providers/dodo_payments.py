"""Dodo Payments event ingestion: `POST /events/ingest`, our event id as `event_id`.

Read against dodopayments 1.123.0 (`resources/usage_events.py`, `types/event_input_param.py`,
`types/usage_event_ingest_response.py`, `_base_client.py`). Dodo takes events from the last hour
only: older ones are set aside with that reason. A duplicate event_id inside one call fails the
whole call (a report never holds an event twice). Success is 200 `{"ingested_count"}`: events of
the call it did not count were already held (deduplicated).

Like the official client: `x-should-retry: true` / `false` on an error answer decides whether to
send again, whatever the status; the wait comes from `retry-after-ms` (milliseconds), else
`Retry-After`. Unlike that client (which waits at most 60 s, then falls back to its own short
backoff), the drain honours a longer wait up to `outcome.MAX_RETRY_AFTER`.

Read-back: `GET /events` (dodopayments `usage_events.list`: `customer_id`, `event_name`, `start`,
`end`, `page_number` from 0, `page_size`; answer `{"items": [Event]}`, an `Event` carrying
`event_id`, `timestamp` and `metadata`), one call per 100 events held, plus one. `start` / `end`
bound the events "created" in that range: whether that is the ingestion time or the timestamp is
not said, and an event is ingested within an hour of its timestamp, so the period is asked with an
hour of margin either side and cut here by timestamp. Events are compared by `event_id`.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from typing import Any

import httpx

from usage_service.domain.plans import Meter
from usage_service.domain.reports import ReportEvent
from usage_service.providers import ingest, outcome
from usage_service.providers.config import Endpoint
from usage_service.providers.readback import Query

BATCH = 100  # events per call (Dodo takes 1..1000, recommends about 100)
WINDOW = dt.timedelta(hours=1)  # Dodo refuses older timestamps
WINDOW_MARGIN = dt.timedelta(seconds=30)  # for the time the call takes
TOO_OLD = "older than Dodo Payments' 1-hour ingestion window; not sent"
LIMITS = ingest.Limits(keys=50, key_length=100, value_length=500)  # metadata
_INDEX = re.compile(r"events\[(\d+)\]")
PAGE = 100  # events per page
MAX_PAGES = 1000


def encode(event: ReportEvent, meter: Meter, now: dt.datetime) -> ingest.Body | str:
    if event.event_time < now - WINDOW + WINDOW_MARGIN:
        return TOO_OLD
    if not event.provider_customer_id:
        return "the customer has no Dodo Payments customer id (provider_customer_id)"
    metadata = ingest.attributes(event, meter.dodo_payments.value_key, LIMITS)
    if isinstance(metadata, str):
        return metadata
    return {
        "event_id": event.event_id,
        "customer_id": event.provider_customer_id,
        "event_name": meter.dodo_payments.event_name,
        "timestamp": outcome.iso(min(event.event_time, now)),
        "metadata": metadata,
    }


def named(body: Any) -> Mapping[int, str]:
    text = reason(body)
    match = _INDEX.search(text)
    return {int(match.group(1)): text} if match else {}


def reason(body: Any) -> str:
    if isinstance(body, dict):
        return f"{body.get('code', '')}: {body.get('message', body)}".strip(": ")[:500]
    return str(body)[:500]


def accepted(body: Any, sent: int) -> ingest.Accepted | None:
    ingested = ingest.count(body, "ingested_count")
    if ingested is None or ingested > sent:
        return None
    return ingest.Accepted(duplicates=sent - ingested)


def should_retry(status: int, headers: httpx.Headers) -> bool:
    said = headers.get("x-should-retry")
    if said in ("true", "false"):
        return str(said) == "true"
    return outcome.retryable(status)


def delay(headers: httpx.Headers) -> float | None:
    try:
        seconds = float(headers.get("retry-after-ms", "")) / 1000
    except ValueError:
        return outcome.retry_after(headers)
    if not math.isfinite(seconds) or seconds <= 0:
        return None  # the drain's own backoff
    return min(seconds, outcome.MAX_RETRY_AFTER)


async def read(http: httpx.AsyncClient, query: Query) -> list[ingest.Row]:
    if not query.provider_customer_id:
        raise ingest.ReadError("the customer has no Dodo Payments customer id")
    naming = query.meter.dodo_payments
    params: dict[str, str | int] = {
        "customer_id": query.provider_customer_id,
        "event_name": naming.event_name,
        "start": outcome.iso(query.start - WINDOW),
        "end": outcome.iso(query.end + WINDOW),
        "page_size": PAGE,
    }
    rows: list[ingest.Row] = []
    for page in range(MAX_PAGES):
        body = await ingest.get(http, "/events", {**params, "page_number": page}, reason)
        items = body["items"]
        for item in items:
            value = ingest.number((item["metadata"] or {})[naming.value_key])
            rows.append(ingest.Row(str(item["event_id"]), ingest.moment(item["timestamp"]), value))
        if len(items) < PAGE:
            return rows
    raise ingest.ReadError(f"more than {MAX_PAGES} pages of events")


WIRE = ingest.Wire(
    "dodo_payments",
    "/events/ingest",
    BATCH,
    encode,
    named,
    reason,
    accepted,
    should_retry,
    delay,
    read,
)


def adapter(
    endpoint: Endpoint,
    meters: Mapping[str, Meter],
    timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ingest.Ingest:
    headers = {"Authorization": f"Bearer {endpoint.api_key}"}
    http = ingest.client(endpoint.base_url, headers, timeout, transport)
    return ingest.Ingest(WIRE, http, meters)
