"""Lemon Squeezy: `POST /v1/usage-records` (JSON:API, no idempotency, no timestamps) and
`GET /v1/subscription-items/{id}/current-usage`.

Checked against the official SDK `@lemonsqueezy/lemonsqueezy.js` 4.0.0 (npm), files
`dist/index.d.ts` (types `NewUsageRecord`, `UsageRecordAction`, the usage record attributes,
`UsageRecord`, `SubscriptionItemCurrentUsage`, `Meta`, `LemonSqueezyResponse`) and `dist/index.js`
(`createUsageRecord`, `getSubscriptionItemCurrentUsage` and the request helper):
- every request carries `Accept` and `Content-Type` `application/vnd.api+json` and a bearer key;
- a usage record is `{"data": {"type": "usage-records", "attributes": {"quantity", "action"},
  "relationships": {"subscription-item": {"data": {"type": "subscription-items", "id": "<str>"}}}}}`
  with `quantity` a positive integer and `action` `increment` | `set`;
- current usage answers `{"jsonapi", "meta": {"period_start", "period_end", "quantity",
  "interval_unit", "interval_quantity"}}` (no `data`, no `links`);
- errors are a JSON:API `errors` array (the SDK reads `errors`); each has `detail`, `status`,
  `title` (and `source.pointer` for a bad attribute), as in the API docs.

A record lands in the item's current period (`roll_over` starts a new one). `late_write` holds
the next record unapplied (its connection is dropped, so the caller times out) until
`release_late`, as when Lemon Squeezy applies a write after the caller gave up.
"""

from __future__ import annotations

import collections
import datetime as dt
import re
import threading
from collections.abc import Mapping
from typing import Any

from fakes.base import Answer, FakeProvider, Fault, bearer, parse_json

KEY = "ls_test_fake"
JSON_API = "application/vnd.api+json"
_CURRENT = re.compile(r"^/v1/subscription-items/([^/]+)/current-usage$")
_TITLES = {401: "Unauthorized", 404: "Not Found", 422: "Unprocessable Entity"}
HOLD_LIMIT = 60.0  # seconds a late write waits for its release at most
_JSON_API = {"Content-Type": JSON_API}


def errors(status: int, detail: str, pointer: str = "") -> Answer:
    error: dict[str, Any] = {"detail": detail, "status": str(status), "title": _TITLES[status]}
    if pointer:
        error["source"] = {"pointer": pointer}
    return Answer(status, {"jsonapi": {"version": "1.0"}, "errors": [error]}, _JSON_API)


def stamp(when: dt.datetime) -> str:
    """Lemon Squeezy's timestamp format, e.g. 2026-01-01T00:00:00.000000Z."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FakeLemonSqueezy(FakeProvider):
    write_route = "POST /v1/usage-records"

    def __init__(self, items: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.usage: dict[str, int] = dict(items or {})  # subscription item -> period usage
        self.records: list[tuple[str, str, int]] = []  # (item, action, quantity)
        start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=15)
        self.period_start = stamp(start)
        self.period_end = stamp(start + dt.timedelta(days=30))
        self.late_held = threading.Event()  # a late write is held, not applied
        self.usage_read = threading.Event()  # a current-usage read was answered
        self._late = False
        self._late_release = threading.Event()
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._flight_lock = threading.Lock()

    def add_item(self, item: str) -> None:
        with self.lock:
            self.usage.setdefault(item, 0)

    def totals(self) -> dict[str, int]:
        """Current-period usage per subscription item."""
        with self.lock:
            return dict(self.usage)

    def roll_over(self, start: dt.datetime, end: dt.datetime) -> None:
        """A new billing period starts: every item's usage is 0 again."""
        with self.lock:
            self.period_start, self.period_end = stamp(start), stamp(end)
            self.usage = dict.fromkeys(self.usage, 0)

    def late_write(self) -> None:
        """The next usage record is held unapplied, its connection dropped without an answer,
        until `release_late`; then it is applied."""
        self._late_release.clear()
        self.late_held.clear()
        self._late = True
        self.inject(Fault("drop"))

    def release_late(self) -> None:
        self._late_release.set()

    def stop(self) -> None:
        self._late_release.set()
        super().stop()

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        if not bearer(headers, KEY):
            self.violation("no bearer API key")
            return errors(401, "Unauthenticated.")
        for name in ("accept", "content-type"):
            if headers.get(name) != JSON_API:
                self.violation(f"{name} {headers.get(name)!r} on {method} {path}")
        match = _CURRENT.match(path)
        if method == "GET" and match:
            return self._current(match.group(1))
        if (method, path) == ("POST", "/v1/usage-records"):
            return self._record(parse_json(self, body))
        self.violation(f"unexpected call {method} {path}")
        return errors(404, "Not found")

    def _current(self, item: str) -> Answer:
        with self.lock:
            if item not in self.usage:
                return errors(404, "Subscription item not found")
            meta = {
                "period_start": self.period_start,
                "period_end": self.period_end,
                "quantity": self.usage[item],
                "interval_unit": "month",
                "interval_quantity": 1,
            }
        self.usage_read.set()
        return Answer(200, {"jsonapi": {"version": "1.0"}, "meta": meta}, _JSON_API)

    def _record(self, doc: Any) -> Answer:
        try:
            assert isinstance(doc, dict) and set(doc) == {"data"}, doc
            data = doc["data"]
            assert set(data) == {"type", "attributes", "relationships"}, sorted(data)
            assert data["type"] == "usage-records"
            attributes = data["attributes"]
            assert set(attributes) == {"quantity", "action"}, sorted(attributes)
            assert attributes["action"] in ("increment", "set"), attributes
            relationships = data["relationships"]
            assert set(relationships) == {"subscription-item"}, sorted(relationships)
            rel = relationships["subscription-item"]["data"]
            assert set(rel) == {"type", "id"} and rel["type"] == "subscription-items", rel
            assert isinstance(rel["id"], str) and rel["id"], rel
        except (AssertionError, KeyError, TypeError) as exc:
            self.violation(f"usage record shape: {exc!r}: {doc!r}"[:300])
            return errors(422, "The data is not a valid usage record.", "/data")
        quantity, action, item = attributes["quantity"], attributes["action"], rel["id"]
        if type(quantity) is not int or quantity < 1:
            self.violation(f"usage record quantity {quantity!r} is not a positive integer")
            return errors(422, "The quantity must be at least 1.", "/data/attributes/quantity")
        with self._flight_lock:
            self._in_flight[item] += 1
            if self._in_flight[item] > 1:
                self.violation(f"two records in flight for item {item}")
        try:
            if self._late:
                self._late = False
                self.late_held.set()
                self._late_release.wait(HOLD_LIMIT)
            with self.lock:
                if item not in self.usage:
                    return errors(404, f"Subscription item {item} not found")
                self.usage[item] = quantity if action == "set" else self.usage[item] + quantity
                self.records.append((item, action, quantity))
                record_id = str(len(self.records))
        finally:
            with self._flight_lock:
                self._in_flight[item] -= 1
        now = stamp(dt.datetime.now(dt.UTC))
        url = f"{self.url}/v1/usage-records/{record_id}"
        body = {
            "jsonapi": {"version": "1.0"},
            "links": {"self": url},
            "data": {
                "type": "usage-records",
                "id": record_id,
                "attributes": {
                    "subscription_item_id": int(item) if item.isdigit() else item,
                    "quantity": quantity,
                    "action": action,
                    "created_at": now,
                    "updated_at": now,
                },
                "relationships": {
                    "subscription-item": {
                        "links": {
                            "related": f"{url}/subscription-item",
                            "self": f"{url}/relationships/subscription-item",
                        }
                    }
                },
                "links": {"self": url},
            },
        }
        return Answer(201, body, _JSON_API)
