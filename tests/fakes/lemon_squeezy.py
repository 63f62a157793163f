"""Lemon Squeezy: `POST /v1/usage-records` (JSON:API, no idempotency) and
`GET /v1/subscription-items/{id}/current-usage`."""

from __future__ import annotations

import collections
import re
import threading
from collections.abc import Mapping
from typing import Any

from fakes.base import Answer, FakeProvider, bearer, parse_json

KEY = "ls_test_fake"
JSON_API = "application/vnd.api+json"
PERIOD_START = "2026-01-01T00:00:00.000000Z"
_CURRENT = re.compile(r"^/v1/subscription-items/([^/]+)/current-usage$")


def errors(status: int, detail: str) -> Answer:
    body = {"jsonapi": {"version": "1.0"}, "errors": [{"status": str(status), "detail": detail}]}
    return Answer(status, body, {"Content-Type": JSON_API})


class FakeLemonSqueezy(FakeProvider):
    write_route = "POST /v1/usage-records"

    def __init__(self, items: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.usage: dict[str, int] = dict(items or {})  # subscription item -> period usage
        self.records: list[tuple[str, str, int]] = []  # (item, action, quantity)
        self.period_start = PERIOD_START
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._flight_lock = threading.Lock()

    def add_item(self, item: str) -> None:
        with self.lock:
            self.usage.setdefault(item, 0)

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        if not bearer(headers, KEY):
            self.violation("no bearer API key")
            return errors(401, "Unauthenticated.")
        if headers.get("accept") != JSON_API:
            self.violation(f"Accept {headers.get('accept')!r}")
        match = _CURRENT.match(path)
        if method == "GET" and match:
            return self._current(match.group(1))
        if (method, path) == ("POST", "/v1/usage-records"):
            if headers.get("content-type") != JSON_API:
                self.violation(f"Content-Type {headers.get('content-type')!r}")
            return self._record(parse_json(self, body))
        self.violation(f"unexpected call {method} {path}")
        return errors(404, "Not found")

    def _current(self, item: str) -> Answer:
        with self.lock:
            if item not in self.usage:
                return errors(404, "Subscription item not found")
            quantity = self.usage[item]
        meta = {
            "period_start": self.period_start,
            "period_end": "2026-02-01T00:00:00.000000Z",
            "quantity": quantity,
            "interval_unit": "month",
            "interval_quantity": 1,
        }
        return Answer(
            200, {"jsonapi": {"version": "1.0"}, "meta": meta}, {"Content-Type": JSON_API}
        )

    def _record(self, doc: Any) -> Answer:
        try:
            data = doc["data"]
            assert set(data) == {"type", "attributes", "relationships"}, sorted(data)
            assert data["type"] == "usage-records"
            attributes = data["attributes"]
            assert set(attributes) == {"quantity", "action"}, sorted(attributes)
            quantity, action = attributes["quantity"], attributes["action"]
            assert isinstance(quantity, int) and quantity >= 0 and action in ("increment", "set")
            rel = data["relationships"]["subscription-item"]["data"]
            assert rel["type"] == "subscription-items" and isinstance(rel["id"], str)
            item = rel["id"]
        except (AssertionError, KeyError, TypeError) as exc:
            self.violation(f"usage record shape: {exc!r}: {doc!r}"[:300])
            return errors(422, "invalid usage record")
        with self._flight_lock:
            self._in_flight[item] += 1
            if self._in_flight[item] > 1:
                self.violation(f"two records in flight for item {item}")
        try:
            with self.lock:
                if item not in self.usage:
                    return errors(404, f"Subscription item {item} not found")
                self.usage[item] = quantity if action == "set" else self.usage[item] + quantity
                self.records.append((item, action, quantity))
        finally:
            with self._flight_lock:
                self._in_flight[item] -= 1
        body = {
            "data": {
                "type": "usage-records",
                "id": str(len(self.records)),
                "attributes": {
                    "subscription_item_id": item,
                    "quantity": quantity,
                    "action": action,
                },
            }
        }
        return Answer(201, body, {"Content-Type": JSON_API})
