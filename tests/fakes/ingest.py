"""Event ingestion fakes: Polar, Dodo Payments and Creem. Each keeps accepted events by their
dedupe id, rejects a whole call for one bad event (nothing stored), and checks its wire rules."""

from __future__ import annotations

import collections
import datetime as dt
from collections.abc import Mapping
from typing import Any

from fakes.base import Answer, FakeProvider, bearer, parse_json

POLAR_KEY = "polar_oat_fake"
DODO_KEY = "dodo_test_fake"
CREEM_KEY = "creem_test_fake"
POLAR_BODY_CAP = 10 * 1024 * 1024  # bytes


def _time(text: Any) -> dt.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else None


class FakeIngest(FakeProvider):
    id_field = ""  # the dedupe key's field
    customer_fields: tuple[str, ...] = ("customer_id",)
    value_field = "metadata"  # where the value lives
    max_events = 0  # per call; 0: no count cap

    def __init__(self, customers: set[str] | None = None) -> None:
        super().__init__()
        self.customers = set(customers or ())  # known provider customer ids
        self.accepted: dict[str, dict[str, Any]] = {}
        self.batch_sizes: list[int] = []

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        if f"{method} {path}" != self.write_route:
            self.violation(f"unexpected call {method} {path}")
            return Answer(404, {"detail": "Not found"})
        if not self.authorised(headers):
            self.violation("missing or wrong credentials")
            return Answer(401, {"detail": "unauthorised"})
        if not headers.get("content-type", "").startswith("application/json"):
            self.violation(f"content-type {headers.get('content-type')!r}")
        too_big = self.too_big(body)
        if too_big:
            return too_big
        doc = parse_json(self, body)
        events = doc.get("events") if isinstance(doc, dict) else None
        if not isinstance(events, list) or set(doc) != {"events"}:
            self.violation(f"body shape: {str(doc)[:200]}")
            return Answer(400, {"detail": "bad body"})
        if not events or (self.max_events and len(events) > self.max_events):
            self.violation(f"{len(events)} events in one call")
            return self.invalid(None, f"1..{self.max_events} events per call")
        ids = [e.get(self.id_field) if isinstance(e, dict) else None for e in events]
        if len(set(ids)) != len(ids):
            self.violation("the same event id twice in one call")
            return self.invalid(None, "duplicate event id in request")
        now = dt.datetime.now(dt.UTC)
        for i, event in enumerate(events):
            problem = self.check(event, now)
            if problem:
                return problem if isinstance(problem, Answer) else self.invalid(i, problem)
        for i, event in enumerate(events):
            customer = event.get("customer_id")
            if customer is not None and customer not in self.customers:
                return self.unknown_customer(i, customer)
        with self.lock:
            self.batch_sizes.append(len(events))
            fresh = [e for e in events if e[self.id_field] not in self.accepted]
            for e in fresh:
                self.accepted[e[self.id_field]] = e
        return self.ok(len(fresh), len(events) - len(fresh))

    def totals(self, value_key: str = "value") -> dict[tuple[str, str], int]:
        """Sum of the value per (customer, event name)."""
        out: collections.Counter[tuple[str, str]] = collections.Counter()
        with self.lock:
            for e in self.accepted.values():
                customer = next(e[f] for f in self.customer_fields if f in e)
                out[(customer, e[self.name_field])] += e[self.value_field][value_key]
        return dict(out)

    # --- per provider ---
    name_field = "name"

    def authorised(self, headers: Mapping[str, str]) -> bool:
        raise NotImplementedError

    def too_big(self, body: bytes) -> Answer | None:
        return None

    def check(self, event: Any, now: dt.datetime) -> str | Answer | None:
        raise NotImplementedError

    def invalid(self, index: int | None, message: str) -> Answer:
        raise NotImplementedError

    def unknown_customer(self, index: int, customer: str) -> Answer:
        raise NotImplementedError

    def ok(self, inserted: int, duplicates: int) -> Answer:
        raise NotImplementedError


def _metadata_problem(meta: Any, limit: int) -> str | None:
    if not isinstance(meta, dict) or len(meta) > limit:
        return f"metadata must be an object of at most {limit} keys"
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str | int | float | bool):
            return f"metadata {key!r}: unsupported value {value!r}"
    return None


class FakePolar(FakeIngest):
    write_route = "POST /v1/events/ingest"
    id_field = "external_id"
    customer_fields = ("customer_id", "external_customer_id")

    def authorised(self, headers: Mapping[str, str]) -> bool:
        return bearer(headers, POLAR_KEY)

    def too_big(self, body: bytes) -> Answer | None:
        return (
            Answer(413, {"detail": "Request Entity Too Large"})
            if len(body) > POLAR_BODY_CAP
            else None
        )

    def check(self, event: Any, now: dt.datetime) -> str | Answer | None:
        allowed = {
            "name",
            "customer_id",
            "external_customer_id",
            "external_id",
            "timestamp",
            "metadata",
        }
        if not isinstance(event, dict) or not set(event) <= allowed:
            self.violation(f"polar event fields {sorted(event)}")
            return "unexpected fields"
        if ("customer_id" in event) == ("external_customer_id" in event):
            self.violation("polar: exactly one of customer_id / external_customer_id")
            return "customer"
        name, stamp = event.get("name"), _time(event.get("timestamp"))
        if not isinstance(name, str) or not 0 < len(name) <= 128 or not event.get("external_id"):
            self.violation(f"polar name / external_id: {event}")
            return "name"
        if stamp is None or stamp > now + dt.timedelta(seconds=1):
            self.violation(f"polar timestamp in the future or unreadable: {event.get('timestamp')}")
            return "Timestamp must be in the past"
        problem = _metadata_problem(event.get("metadata"), 50)
        if problem:
            self.violation(problem)
        return problem

    def invalid(self, index: int | None, message: str) -> Answer:
        loc = ["body", "events"] + ([index] if index is not None else [])
        return Answer(422, {"detail": [{"loc": loc, "msg": message, "type": "value_error"}]})

    def unknown_customer(self, index: int, customer: str) -> Answer:
        return Answer(
            422,
            {
                "detail": [
                    {
                        "loc": ["body", "events", index, "customer_id"],
                        "msg": f"Customer {customer} does not exist.",
                        "type": "value_error",
                    }
                ]
            },
        )

    def ok(self, inserted: int, duplicates: int) -> Answer:
        return Answer(200, {"inserted": inserted, "duplicates": duplicates})


class FakeDodo(FakeIngest):
    write_route = "POST /events/ingest"
    id_field = "event_id"
    name_field = "event_name"
    max_events = 1000

    def authorised(self, headers: Mapping[str, str]) -> bool:
        return bearer(headers, DODO_KEY)

    def check(self, event: Any, now: dt.datetime) -> str | Answer | None:
        fields = {"event_id", "customer_id", "event_name", "timestamp", "metadata"}
        if not isinstance(event, dict) or set(event) != fields:
            self.violation(f"dodo event fields {sorted(event)}")
            return "unexpected fields"
        stamp = _time(event["timestamp"])
        if stamp is None or not now - dt.timedelta(hours=1) <= stamp <= now + dt.timedelta(
            minutes=5
        ):
            self.violation(f"dodo timestamp outside its window: {event['timestamp']}")
            return "timestamp outside the allowed window"
        problem = _metadata_problem(event["metadata"], 50)
        if problem:
            self.violation(problem)
        return problem

    def invalid(self, index: int | None, message: str) -> Answer:
        return Answer(400, {"code": "INVALID_REQUEST", "message": message})

    def unknown_customer(self, index: int, customer: str) -> Answer:
        # Dodo's answer names the customer, not the event: the adapter must isolate it.
        return Answer(
            422, {"code": "CUSTOMER_NOT_FOUND", "message": f"Customer {customer} not found"}
        )

    def ok(self, inserted: int, duplicates: int) -> Answer:
        return Answer(200, {"ingested_count": inserted})


class FakeCreem(FakeIngest):
    write_route = "POST /v1/events/ingest"
    id_field = "event_id"
    value_field = "properties"
    max_events = 100

    def authorised(self, headers: Mapping[str, str]) -> bool:
        return headers.get("x-api-key") == CREEM_KEY and "authorization" not in headers

    def check(self, event: Any, now: dt.datetime) -> str | Answer | None:
        fields = {"name", "customer_id", "event_id", "timestamp", "properties", "metadata"}
        if not isinstance(event, dict) or set(event) != fields:
            self.violation(f"creem event fields {sorted(event)}")
            return "unexpected fields"
        if _time(event["timestamp"]) is None:
            self.violation(f"creem timestamp {event['timestamp']!r}")
            return "timestamp"
        props = event["properties"]
        if not isinstance(props, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in props.values()
        ):
            self.violation(f"creem properties must be numeric: {props}")
            return "properties"
        return _metadata_problem(event["metadata"], 50)

    def invalid(self, index: int | None, message: str) -> Answer:
        param = f"events[{index}]" if index is not None else "events"
        return Answer(422, {"statusCode": 422, "param": param, "message": [message]})

    def unknown_customer(self, index: int, customer: str) -> Answer:
        return Answer(
            422,
            {
                "statusCode": 422,
                "param": f"events[{index}].customer_id",
                "message": ["Customer not found"],
            },
        )

    def ok(self, inserted: int, duplicates: int) -> Answer:
        return Answer(202, {"accepted": inserted + duplicates})
