"""Dodo Payments event ingestion: `POST /events/ingest`, our event id as `event_id`.

Dodo takes events from the last hour only: older ones are set aside with that reason. A duplicate
event_id inside one call fails the whole call (a report never holds an event twice).
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

BATCH = 100  # events per call (Dodo takes 1..1000, recommends about 100)
WINDOW = dt.timedelta(hours=1)  # Dodo refuses older timestamps
WINDOW_MARGIN = dt.timedelta(seconds=30)  # for the time the call takes
TOO_OLD = "older than Dodo Payments' 1-hour ingestion window; not sent"
METADATA_KEYS = 50
_INDEX = re.compile(r"events\[(\d+)\]")


def encode(event: ReportEvent, meter: Meter, now: dt.datetime) -> ingest.Body | str:
    if event.event_time < now - WINDOW + WINDOW_MARGIN:
        return TOO_OLD
    if not event.provider_customer_id:
        return "the customer has no Dodo Payments customer id (provider_customer_id)"
    return {
        "event_id": event.event_id,
        "customer_id": event.provider_customer_id,
        "event_name": meter.dodo_payments.event_name,
        "timestamp": outcome.iso(ingest.not_future(event.event_time, now)),
        "metadata": ingest.metadata(event, meter.dodo_payments.value_key, METADATA_KEYS),
    }


def named(body: Any) -> Mapping[int, str]:
    text = reason(body)
    match = _INDEX.search(text)
    return {int(match.group(1)): text} if match else {}


def reason(body: Any) -> str:
    if isinstance(body, dict):
        return f"{body.get('code', '')}: {body.get('message', body)}".strip(": ")[:500]
    return str(body)[:500]


WIRE = ingest.Wire("dodo_payments", "/events/ingest", BATCH, encode, named, reason)


def adapter(endpoint: Endpoint, meters: Mapping[str, Meter], timeout: float) -> ingest.Ingest:
    headers = {"Authorization": f"Bearer {endpoint.api_key}"}
    return ingest.Ingest(WIRE, ingest.client(endpoint.base_url, headers, timeout), meters)
