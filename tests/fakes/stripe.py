"""Stripe Billing Meters v1: `POST /v1/billing/meter_events`, form-encoded, one event per call."""

from __future__ import annotations

import collections
import dataclasses
import re
import threading
import time
import urllib.parse
from collections.abc import Mapping

from fakes.base import Answer, FakeProvider, bearer

KEY = "sk_test_fake"
FIELDS = {"event_name", "payload[stripe_customer_id]", "payload[value]", "identifier", "timestamp"}
WINDOW_BACK = 35 * 86400  # seconds
WINDOW_AHEAD = 300  # seconds


@dataclasses.dataclass(frozen=True)
class MeterEvent:
    event_name: str
    customer: str
    value: int
    identifier: str
    timestamp: int


def error(status: int, message: str, kind: str = "invalid_request_error", **headers: str) -> Answer:
    return Answer(status, {"error": {"type": kind, "message": message}}, headers)


class FakeStripe(FakeProvider):
    write_route = "POST /v1/billing/meter_events"

    def __init__(self) -> None:
        super().__init__()
        self.events: dict[str, MeterEvent] = {}  # by identifier
        self._keys: dict[str, tuple[tuple[tuple[str, str], ...], Answer]] = {}
        self._in_flight: collections.Counter[tuple[str, str]] = collections.Counter()
        self._flight_lock = threading.Lock()

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        if (method, path) != ("POST", "/v1/billing/meter_events"):
            self.violation(f"unexpected call {method} {path}")
            return error(404, "Unrecognized request URL")
        if not bearer(headers, KEY):
            self.violation("no bearer secret key")
            return error(401, "Invalid API Key provided", "authentication_error")
        if not headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            self.violation(f"content-type {headers.get('content-type')}")
        form = urllib.parse.parse_qs(body.decode(), keep_blank_values=True, strict_parsing=True)
        fields = {k: v[0] for k, v in form.items()}
        if set(fields) != FIELDS or any(len(v) != 1 for v in form.values()):
            self.violation(f"fields {sorted(form)}")
            return error(400, "bad fields")
        key = headers.get("idempotency-key", "")
        if key != fields["identifier"]:
            self.violation(f"Idempotency-Key {key!r} != identifier {fields['identifier']!r}")
        lane = (fields["payload[stripe_customer_id]"], fields["event_name"])
        with self._flight_lock:
            self._in_flight[lane] += 1
            if self._in_flight[lane] > 1:
                self.violation(f"two calls in flight for {lane}")
        try:
            time.sleep(0.001)  # widen the window in which a second concurrent call would overlap
            return self._create(fields, key)
        finally:
            with self._flight_lock:
                self._in_flight[lane] -= 1

    def _create(self, fields: dict[str, str], key: str) -> Answer:
        params = tuple(sorted(fields.items()))
        with self.lock:
            if key in self._keys:
                seen, answer = self._keys[key]
                if seen != params:
                    self.violation(f"Idempotency-Key {key} reused with other parameters")
                    return error(
                        400,
                        "Keys for idempotent requests can only be used with the same "
                        "parameters they were first used with.",
                        "idempotency_error",
                    )
                return Answer(answer.status, answer.body, {"Idempotent-Replayed": "true"})
            answer = self._validate(fields)
            if answer.status == 200:
                identifier = fields["identifier"]
                if identifier in self.events:
                    answer = error(
                        400,
                        f"An event already exists with identifier {identifier}.",
                        **{"Stripe-Should-Retry": "false"},
                    )
                else:
                    self.events[identifier] = MeterEvent(
                        fields["event_name"],
                        fields["payload[stripe_customer_id]"],
                        int(fields["payload[value]"]),
                        identifier,
                        int(fields["timestamp"]),
                    )
            self._keys[key] = (params, answer)
            return answer

    def _validate(self, fields: dict[str, str]) -> Answer:
        if not re.fullmatch(r"\d+", fields["payload[value]"]):
            self.violation(f"value {fields['payload[value]']!r} is not a whole number")
            return error(400, "value must be a whole number")
        if not 0 < len(fields["identifier"]) <= 100 or not 0 < len(fields["event_name"]) <= 100:
            self.violation("identifier or event_name length")
            return error(400, "too long")
        stamp = int(fields["timestamp"])
        now = time.time()
        if not now - WINDOW_BACK <= stamp <= now + WINDOW_AHEAD:
            return error(400, "Timestamp must be within the past 35 days and 5 minutes ahead")
        return Answer(
            200,
            {
                "object": "billing.meter_event",
                "event_name": fields["event_name"],
                "identifier": fields["identifier"],
                "payload": {
                    "stripe_customer_id": fields["payload[stripe_customer_id]"],
                    "value": fields["payload[value]"],
                },
                "timestamp": stamp,
                "livemode": False,
                "created": int(now),
            },
        )

    def totals(self) -> dict[tuple[str, str], int]:
        """Sum of values per (customer, event_name)."""
        out: collections.Counter[tuple[str, str]] = collections.Counter()
        with self.lock:
            for e in self.events.values():
                out[(e.customer, e.event_name)] += e.value
        return dict(out)

    def counts(self) -> dict[tuple[str, str], int]:
        out: collections.Counter[tuple[str, str]] = collections.Counter()
        with self.lock:
            for e in self.events.values():
                out[(e.customer, e.event_name)] += 1
        return dict(out)

    def last(self, customer: str, event_name: str) -> int | None:
        with self.lock:
            mine = [
                e
                for e in self.events.values()
                if (e.customer, e.event_name) == (customer, event_name)
            ]
        return max(mine, key=lambda e: e.timestamp).value if mine else None
