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

Read-back: `GET /v1/events/` (polar-sdk `events.list`: `customer_id` or `external_customer_id`,
`name`, `start_timestamp`, `end_timestamp`, `source`, `sorting`, `page`, `limit` <= 100; answer
`ListResourceEvent {items: [UserEvent], pagination: {total_count, max_page}}`), one call per 100
events held in the period. A `UserEvent` carries its `timestamp` and `metadata`, but not the
`external_id` we sent, so a held event is told apart by its value and timestamp: it is the sent
event of that value whose timestamp it carries, or (clamped) lies at most `CLOCK_SKEW` before.
Sent events of one value within `CLOCK_SKEW` of each other are interchangeable. The period is
asked with `MARGIN` either side and cut here (a named event by its own time), whichever way Polar
bounds it. Polar bills
by receipt time; the read-back counts by event timestamp, like `GET /v1/meters/{id}/quantities`.
"""

from __future__ import annotations

import bisect
import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from usage_service.domain.plans import Meter
from usage_service.domain.reports import ReportEvent, Sent
from usage_service.providers import ingest, outcome
from usage_service.providers.config import Endpoint
from usage_service.providers.readback import Query

BATCH = 500  # events per call; Polar caps the body (10 MiB), not the count
VERSION = "2026-10"  # the Polar-Version polar-sdk 1.0.2 sends (`polar.v2026_10`)
CLOCK_SKEW = dt.timedelta(seconds=5)
PAGE = 100  # events per page: Polar's maximum
MAX_PAGES = 1000
# asked either side of the period: a timestamp clamped for clock skew is up to CLOCK_SKEW early
MARGIN = CLOCK_SKEW + dt.timedelta(seconds=1)
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


async def read(http: httpx.AsyncClient, query: Query) -> list[ingest.Row]:
    naming = query.meter.polar
    params: dict[str, str | int] = {
        "name": naming.event_name,
        "start_timestamp": outcome.iso(query.start - MARGIN),
        "end_timestamp": outcome.iso(query.end + MARGIN),
        "source": "user",
        "sorting": "timestamp",
        "limit": PAGE,
    }
    if query.provider_customer_id:
        params["customer_id"] = query.provider_customer_id
    else:
        params["external_customer_id"] = query.customer_id
    held: list[tuple[dt.datetime, int]] = []
    for page in range(1, MAX_PAGES + 1):
        body = await ingest.get(http, "/v1/events/", {**params, "page": page}, reason)
        for item in body["items"]:
            held.append(
                (
                    ingest.moment(item["timestamp"]),
                    ingest.number(item["metadata"][naming.value_key]),
                )
            )
        if page >= int(body["pagination"]["max_page"]):
            return identify(held, query.sent)
    raise ingest.ReadError(f"more than {MAX_PAGES} pages of events")


def identify(held: Sequence[tuple[dt.datetime, int]], sent: Sequence[Sent]) -> list[ingest.Row]:
    """Rows for the held (timestamp, value) pairs, each named by the sent event it is, if any: of
    the same value, sent with that timestamp or one at most `CLOCK_SKEW` later (the earliest).
    A named row takes its event's own time, which its clamped timestamp may precede."""
    times = {s.event_id: s.event_time for s in sent}
    free: dict[int, list[tuple[dt.datetime, str]]] = {}
    for s in sorted(sent, key=lambda s: s.event_time):
        free.setdefault(s.quantity, []).append((_ms(s.event_time), s.event_id))
    rows = []
    for when, value in sorted(held):
        candidates = free.get(value, [])
        at = bisect.bisect_left(candidates, (when, ""))
        fits = at < len(candidates) and candidates[at][0] - when <= CLOCK_SKEW
        name = candidates.pop(at)[1] if fits else ""
        rows.append(ingest.Row(name, times.get(name, when), value))
    return rows


def _ms(when: dt.datetime) -> dt.datetime:
    """A time as sent: to the millisecond."""
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


WIRE = ingest.Wire("polar", "/v1/events/ingest", BATCH, encode, named, reason, accepted, read=read)


def adapter(
    endpoint: Endpoint,
    meters: Mapping[str, Meter],
    timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ingest.Ingest:
    headers = {"Authorization": f"Bearer {endpoint.api_key}", "Polar-Version": VERSION}
    http = ingest.client(endpoint.base_url, headers, timeout, transport)
    return ingest.Ingest(WIRE, http, meters)
