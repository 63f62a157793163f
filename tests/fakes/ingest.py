"""Event ingestion fakes: Polar, Dodo Payments and Creem. Each checks every request against the
request schema of the provider's official SDK at a named version (path, headers, field names,
types, required fields, limits), keeps accepted events by their dedupe id, rejects a whole call
for one bad event (nothing stored) and answers with the SDK's documented success and error
shapes. Anything our client must never send is recorded through `violation()`.

Each also answers the read endpoint the read-back uses, with the SDK's response shape and paging,
over the events as reads see them. Drift between what was accepted and what reads show:
`drop(event_id)` (the event disappears from reads), `double(event_id)` (it is listed twice), and
`lag()` ... `catch_up()` (reads show the events accepted when `lag()` was called)."""

from __future__ import annotations

import collections
import datetime as dt
import itertools
import math
import re
import threading
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

from fakes import base
from fakes.base import Answer, FakeProvider, bearer, parse_json

POLAR_KEY = "polar_oat_fake"
DODO_KEY = "dodo_test_fake"
CREEM_KEY = "creem_test_fake"
POLAR_BODY_CAP = 10 * 1024 * 1024  # bytes


_request = threading.local()  # the query of the request being handled on this thread

Query = dict[str, list[str]]


class _QueryHandler(base._Handler):
    """Keeps the request's query string, which `handle` is not given."""

    def _serve(self, method: str) -> None:
        _request.query = urllib.parse.parse_qs(
            urllib.parse.urlsplit(self.path).query, keep_blank_values=True
        )
        super()._serve(method)


def _time(text: Any) -> dt.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else None


POLAR_ORGANIZATION = "1dbfc517-0bbf-4301-9ba8-555ca42b9737"
_EPOCH, _END = "1970-01-01T00:00:00Z", "9999-12-31T00:00:00Z"


def _integer(text: str, low: int, high: int | None = None) -> int | None:
    """A query parameter as a whole number within [low, high], else None."""
    if not text.isdigit() or int(text) < low or (high is not None and int(text) > high):
        return None
    return int(text)


_UUID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}", re.I
)


def _is_uuid(text: Any) -> bool:
    """A UUID as the SDK's pydantic model takes one: hyphenated 8-4-4-4-12, or 32 hex digits."""
    return isinstance(text, str) and _UUID.fullmatch(text) is not None


def _attributes_problem(
    bag: Any, what: str, keys: int, key_length: int, value_length: int, nested: bool = False
) -> str | None:
    """What is wrong with a metadata / properties object under a provider's limits."""
    if not isinstance(bag, dict) or len(bag) > keys:
        return f"{what} must be an object of at most {keys} keys"
    for key, value in bag.items():
        if len(key) > key_length:
            return f"{what} key {key[:50]!r} is over {key_length} characters"
        if isinstance(value, dict | list) and not nested:
            return f"{what} {key!r}: objects and arrays are not accepted"
        if value is None or (isinstance(value, str) and len(value) > value_length):
            return f"{what} {key!r}: a value of at most {value_length} characters"
    return None


class FakeIngest(FakeProvider):
    id_field = ""  # the dedupe key's field
    name_field = "name"
    customer_fields: tuple[str, ...] = ("customer_id",)
    value_field = "metadata"  # where the value lives
    max_events = 0  # per call; 0: no count cap

    def __init__(self, customers: Iterable[str] | None = None) -> None:
        super().__init__()
        self.customers = set(customers or ())  # known provider customer ids
        self.accepted: dict[str, dict[str, Any]] = {}
        self.batch_sizes: list[int] = []
        self.received: dict[str, str] = {}  # dedupe id -> when it was accepted (ISO-8601)
        self.dropped: set[str] = set()
        self.doubled: set[str] = set()
        self._frozen: list[str] | None = None  # dedupe ids reads show while lagging
        self._server.RequestHandlerClass = _QueryHandler

    # --- drift between what was accepted and what reads show ---

    def drop(self, event_id: str) -> None:
        """The provider loses an accepted event: reads no longer show it; sent again, it is
        stored again."""
        with self.lock:
            self.dropped.add(event_id)

    def double(self, event_id: str) -> None:
        with self.lock:
            self.doubled.add(event_id)

    def lag(self) -> None:
        with self.lock:
            self._frozen = list(self.accepted)

    def catch_up(self) -> None:
        with self.lock:
            self._frozen = None

    def held(self) -> list[tuple[str, dict[str, Any]]]:
        """(the provider's id, event) as reads show them, in ingestion order."""
        with self.lock:
            ids = self._frozen if self._frozen is not None else list(self.accepted)
            out = []
            for key in ids:
                if key in self.dropped:
                    continue
                event = self.accepted[key]
                when = str(event.get("timestamp") or self.received[key])
                out.append((f"{key}-1", event, when))
                if key in self.doubled:
                    out.append((f"{key}-2", event, when))
            return out

    def params(self, allowed: AbstractSet[str]) -> dict[str, str] | None:
        """The request's query, each parameter once and known to the SDK; else None (recorded)."""
        query: Query = getattr(_request, "query", {})
        unknown, repeated = set(query) - allowed, [k for k, v in query.items() if len(v) > 1]
        if unknown or repeated:
            self.violation(f"{type(self).__name__} read: query {query!r}")
            return None
        return {k: v[0] for k, v in query.items()}

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        if method == "GET":
            if not self.authorised(headers):
                self.violation("missing or wrong credentials")
                return self.unauthorised()
            return self.read(path, headers)
        if f"{method} {path}" != self.write_route:
            self.violation(f"unexpected call {method} {path}")
            return self.not_found()
        if not self.authorised(headers):
            self.violation("missing or wrong credentials")
            return self.unauthorised()
        if not headers.get("content-type", "").startswith("application/json"):
            self.violation(f"content-type {headers.get('content-type')!r}")
        refused = self.check_headers(headers) or self.too_big(body)
        if refused:
            return refused
        doc = parse_json(self, body)
        events = doc.get("events") if isinstance(doc, dict) else None
        if not isinstance(events, list) or set(doc) != {"events"}:
            self.violation(f"body shape: {str(doc)[:200]}")
            return self.invalid(None, 'body must be {"events": [...]}')
        if not events or (self.max_events and len(events) > self.max_events):
            self.violation(f"{len(events)} events in one call")
            return self.invalid(None, f"1..{self.max_events or 'any'} events per call")
        ids = [e.get(self.id_field) if isinstance(e, dict) else None for e in events]
        if len(set(map(str, ids))) != len(ids):
            self.violation("the same event id twice in one call")
            return self.invalid(None, "duplicate event id in request")
        now = dt.datetime.now(dt.UTC)
        for i, event in enumerate(events):
            if not isinstance(event, dict):
                self.violation(f"event {i} is not an object")
                return self.invalid(i, "must be an object")
            problem = self.check(event, now)
            if problem:
                field, message = problem
                self.violation(f"{type(self).__name__} events[{i}].{field}: {message}")
                return self.invalid(i, message, field)
        for i, event in enumerate(events):
            unknown = self.unknown(event)
            if unknown:
                return self.unknown_customer(i, *unknown)
        with self.lock:
            self.batch_sizes.append(len(events))
            # a dropped event is one the provider lost: sent again, it is stored again
            self.dropped -= {e[self.id_field] for e in events}
            fresh = [e for e in events if e[self.id_field] not in self.accepted]
            for e in fresh:
                self.accepted[e[self.id_field]] = e
                self.received[e[self.id_field]] = now.isoformat().replace("+00:00", "Z")
        return self.ok(events, len(fresh))

    def totals(self, value_key: str = "value") -> dict[tuple[str, str], int]:
        """Sum of the value per (customer, event name), over the events that bill."""
        out: collections.Counter[tuple[str, str]] = collections.Counter()
        with self.lock:
            for e in self.accepted.values():
                if self.bills(e):
                    customer = next(e[f] for f in self.customer_fields if f in e)
                    out[(customer, e[self.name_field])] += e[self.value_field][value_key]
        return dict(out)

    # --- per provider ---

    def authorised(self, headers: Mapping[str, str]) -> bool:
        raise NotImplementedError

    def check_headers(self, headers: Mapping[str, str]) -> Answer | None:
        return None

    def read(self, path: str, headers: Mapping[str, str]) -> Answer:
        self.violation(f"unexpected call GET {path}")
        return self.not_found()

    def too_big(self, body: bytes) -> Answer | None:
        return None

    def check(self, event: dict[str, Any], now: dt.datetime) -> tuple[str, str] | None:
        """(field, message) of what is wrong with one event under the SDK's schema, if any."""
        raise NotImplementedError

    def unknown(self, event: dict[str, Any]) -> tuple[str, str] | None:
        """(field, id) when the event names a customer the provider does not know."""
        customer = event.get("customer_id")
        return ("customer_id", customer) if customer not in self.customers else None

    def bills(self, event: dict[str, Any]) -> bool:
        return True

    def not_found(self) -> Answer:
        return Answer(404, {"detail": "Not Found"})

    def unauthorised(self) -> Answer:
        return Answer(401, {"detail": "unauthorised"})

    def invalid(self, index: int | None, message: str, field: str = "") -> Answer:
        raise NotImplementedError

    def unknown_customer(self, index: int, field: str, customer: str) -> Answer:
        raise NotImplementedError

    def ok(self, events: list[dict[str, Any]], fresh: int) -> Answer:
        raise NotImplementedError


def _fields(
    event: dict[str, Any], required: set[str], optional: set[str]
) -> tuple[str, str] | None:
    missing, extra = required - set(event), set(event) - required - optional
    if missing:
        return sorted(missing)[0], "Field required"
    if extra:
        return sorted(extra)[0], "Extra inputs are not permitted"
    return None


class FakePolar(FakeIngest):
    """Polar, after polar-sdk 1.0.2 (PyPI): `polar/base.py` (`_default_headers`: `Authorization:
    Bearer`, `Polar-Version`; errors), `polar/v2026_10/client.py` (version "2026-10"; the SDK
    also ships "2026-04" and "2027-01"), `polar/v2026_10/services/events.py` (`POST
    /v1/events/ingest`, 422 `HTTPValidationError`), `polar/v2026_10/inputs.py` (`EventsIngest`,
    `EventCreateCustomer`, `EventCreateExternalCustomer`, `EventMetadataInput`: at most 50 keys of
    at most 40 characters, strings of at most 500, `_cost` / `_llm` structured),
    `polar/v2026_10/outputs.py` (`EventsIngestResponse {inserted, duplicates}`,
    `ValidationError {loc, msg, type, input}`). From PROVIDERS.md: `customer_id` is a UUID, a
    timestamp after Polar's now fails the batch, an unknown Polar-Version is a 404, 10 MiB cap."""

    write_route = "POST /v1/events/ingest"
    id_field = "external_id"
    customer_fields = ("customer_id", "external_customer_id")
    versions = frozenset({"2026-04", "2026-10", "2027-01"})
    # `events.list` query parameters (`metadata[...]` left out: not used)
    list_params = frozenset(
        {
            "filter",
            "start_timestamp",
            "end_timestamp",
            "organization_id",
            "customer_id",
            "external_customer_id",
            "meter_id",
            "name",
            "source",
            "query",
            "parent_id",
            "depth",
            "page",
            "limit",
            "sorting",
        }
    )
    common = frozenset({"timestamp", "organization_id", "external_id", "parent_id", "metadata"})

    def authorised(self, headers: Mapping[str, str]) -> bool:
        return bearer(headers, POLAR_KEY)

    def check_headers(self, headers: Mapping[str, str]) -> Answer | None:
        version = headers.get("polar-version")
        if version in self.versions:
            return None
        self.violation(f"polar: Polar-Version {version!r} (pin one the SDK knows)")
        return self.not_found()

    def too_big(self, body: bytes) -> Answer | None:
        if len(body) > POLAR_BODY_CAP:
            return Answer(413, {"detail": "Request Entity Too Large"})
        return None

    def check(self, event: dict[str, Any], now: dt.datetime) -> tuple[str, str] | None:
        if "customer_id" in event:
            wrong = _fields(event, {"name", "customer_id"}, self.common | {"member_id"})
        else:
            wrong = _fields(
                event, {"name", "external_customer_id"}, self.common | {"external_member_id"}
            )
        if wrong:
            return wrong
        name = event["name"]
        if not isinstance(name, str) or not 0 < len(name) <= 128:
            return "name", "a string of 1..128 characters"
        if not isinstance(event.get("external_id"), str) or not event["external_id"]:
            return "external_id", "our dedupe key must be sent"
        if "customer_id" in event and not _is_uuid(event["customer_id"]):
            return "customer_id", "Input should be a valid UUID"
        if not isinstance(event.get("external_customer_id", ""), str):
            return "external_customer_id", "Input should be a valid string"
        stamp = _time(event.get("timestamp"))
        if "timestamp" in event and stamp is None:
            return "timestamp", "Input should be a valid datetime"
        if stamp is not None and stamp > now:
            return "timestamp", "Timestamp must be in the past"
        meta = event.get("metadata", {})
        problem = _attributes_problem(meta, "metadata", 50, 40, 500)
        if problem:
            return "metadata", problem
        for key in ("_cost", "_llm"):
            if key in meta and not isinstance(meta[key], dict):
                return "metadata", f"{key} is structured data, not {meta[key]!r}"
        return None

    def unknown(self, event: dict[str, Any]) -> tuple[str, str] | None:
        if "customer_id" not in event:  # external_customer_id is not checked
            return None
        return super().unknown(event)

    def invalid(self, index: int | None, message: str, field: str = "") -> Answer:
        loc: list[str | int] = ["body", "events"]
        loc += [index] if index is not None else []
        loc += [field] if field else []
        return Answer(422, {"detail": [{"loc": loc, "msg": message, "type": "value_error"}]})

    def unknown_customer(self, index: int, field: str, customer: str) -> Answer:
        return self.invalid(index, f"Customer {customer} does not exist.", field)

    def ok(self, events: list[dict[str, Any]], fresh: int) -> Answer:
        return Answer(200, {"inserted": fresh, "duplicates": len(events) - fresh})

    def read(self, path: str, headers: Mapping[str, str]) -> Answer:
        """`GET /v1/events/` (`events.list`), as `ListResourceEvent` of `UserEvent`s."""
        refused = self.check_headers(headers)
        if refused:
            return refused
        if path != "/v1/events/":
            return super().read(path, headers)
        q = self.params(self.list_params)
        if q is None:
            return self.query_invalid("query", "unknown or repeated parameter")
        page, limit = _integer(q.get("page", "1"), 1), _integer(q.get("limit", "10"), 1, 100)
        start, end = _time(q.get("start_timestamp", _EPOCH)), _time(q.get("end_timestamp", _END))
        sorting = q.get("sorting", "-timestamp")
        for field, wrong in (
            ("page", page is None),
            ("limit", limit is None),
            ("start_timestamp", start is None),
            ("end_timestamp", end is None),
            ("sorting", sorting not in ("timestamp", "-timestamp")),
            ("source", q.get("source", "user") not in ("user", "system")),
            ("customer_id", "customer_id" in q and not _is_uuid(q["customer_id"])),
        ):
            if wrong:
                self.violation(f"polar read: {field} {q.get(field)!r}")
                return self.query_invalid(field, "Input is not valid")
        assert page is not None and limit is not None and start and end
        rows = [
            (pid, e, when)
            for pid, e, stamp in self.held()
            if all(
                e.get(f) == q[f] for f in ("customer_id", "external_customer_id", "name") if f in q
            )
            and q.get("source", "user") == "user"
            and start < (when := _time(stamp) or start) < end
        ]
        rows.sort(key=lambda r: r[2], reverse=sorting == "-timestamp")
        items = [
            {
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, pid)),
                "timestamp": when.isoformat().replace("+00:00", "Z"),
                "organization_id": POLAR_ORGANIZATION,
                "customer_id": e.get("customer_id"),
                "customer": None,
                "external_customer_id": e.get("external_customer_id"),
                "member_id": None,
                "external_member_id": None,
                "child_count": 0,
                "parent_id": None,
                "label": e["name"],
                "name": e["name"],
                "source": "user",
                "metadata": e.get("metadata", {}),
            }
            for pid, e, when in rows[(page - 1) * limit : page * limit]
        ]
        pagination = {"total_count": len(rows), "max_page": math.ceil(len(rows) / limit)}
        return Answer(200, {"items": items, "pagination": pagination})

    def query_invalid(self, field: str, message: str) -> Answer:
        detail = {"loc": ["query", field], "msg": message, "type": "value_error"}
        return Answer(422, {"detail": [detail]})


class FakeDodo(FakeIngest):
    """Dodo Payments, after dodopayments 1.123.0 (PyPI): `resources/usage_events.py` (`POST
    /events/ingest`; at most 1000 events; metadata at most 50 pairs, keys at most 100 characters,
    values at most 500; duplicate event_id in one call fails it; timestamps older than 1 hour or
    over 5 minutes ahead rejected), `types/usage_event_ingest_params.py`,
    `types/event_input_param.py` (required customer_id, event_id, event_name; optional metadata
    of str / number / bool, optional ISO-8601 timestamp), `types/usage_event_ingest_response.py`
    (`{ingested_count}`), `_client.py` (bearer token; error classes by status) and
    `_base_client.py` (`x-should-retry`, `retry-after-ms`). Errors `{code, message}` as in
    PROVIDERS.md. `ok` counts the events it had not seen before."""

    write_route = "POST /events/ingest"
    id_field = "event_id"
    name_field = "event_name"
    max_events = 1000

    def authorised(self, headers: Mapping[str, str]) -> bool:
        return bearer(headers, DODO_KEY)

    def check(self, event: dict[str, Any], now: dt.datetime) -> tuple[str, str] | None:
        wrong = _fields(event, {"customer_id", "event_id", "event_name"}, {"metadata", "timestamp"})
        if wrong:
            return wrong
        for field in ("customer_id", "event_id", "event_name"):
            if not isinstance(event[field], str) or not event[field]:
                return field, "a non-empty string"
        stamp = _time(event.get("timestamp"))
        if "timestamp" in event and stamp is None:
            return "timestamp", "an ISO-8601 timestamp"
        if stamp is not None and not (
            now - dt.timedelta(hours=1) <= stamp <= now + dt.timedelta(minutes=5)
        ):
            return "timestamp", "timestamp outside the allowed window"
        meta = event.get("metadata")
        if meta is not None:
            problem = _attributes_problem(meta, "metadata", 50, 100, 500)
            if problem:
                return "metadata", problem
        return None

    def unauthorised(self) -> Answer:
        return Answer(401, {"code": "UNAUTHORIZED", "message": "invalid API key"})

    def not_found(self) -> Answer:
        return Answer(404, {"code": "NOT_FOUND", "message": "not found"})

    def invalid(self, index: int | None, message: str, field: str = "") -> Answer:
        return Answer(400, {"code": "INVALID_REQUEST_BODY", "message": message})

    def unknown_customer(self, index: int, field: str, customer: str) -> Answer:
        # Dodo's answer names the customer, not the event: the adapter must isolate it.
        return Answer(
            422, {"code": "CUSTOMER_NOT_FOUND", "message": f"Customer {customer} not found"}
        )

    def ok(self, events: list[dict[str, Any]], fresh: int) -> Answer:
        return Answer(200, {"ingested_count": fresh})

    def read(self, path: str, headers: Mapping[str, str]) -> Answer:
        """`GET /events` (`usage_events.list`): `{"items": [Event]}`, pages from 0."""
        if path != "/events":
            return super().read(path, headers)
        q = self.params(
            {"customer_id", "end", "event_name", "meter_id", "page_number", "page_size", "start"}
        )
        if q is None:
            return self.invalid(None, "unknown or repeated query parameter")
        page, size = _integer(q.get("page_number", "0"), 0), _integer(q.get("page_size", "10"), 1)
        start, end = _time(q.get("start", _EPOCH)), _time(q.get("end", _END))
        if page is None or size is None or start is None or end is None:
            self.violation(f"dodo read: query {q!r}")
            return self.invalid(None, "invalid query parameter")
        rows = [
            {
                "business_id": "bus_fake",
                "customer_id": e["customer_id"],
                "event_id": e["event_id"],
                "event_name": e["event_name"],
                "timestamp": stamp,
                "metadata": e.get("metadata"),
            }
            for _, e, stamp in self.held()
            if all(e[f] == q[f] for f in ("customer_id", "event_name") if f in q)
            and start <= (_time(stamp) or start) <= end
        ]
        return Answer(200, {"items": rows[page * size : (page + 1) * size]})


_CREEM_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")


class FakeCreem(FakeIngest):
    """Creem, after the official TypeScript SDK `creem` 1.13.0 (npm): `CHANGELOG.md` (1.9.0:
    exactly one of customer_id / external_customer_id; `metadata` removed, refused with 422),
    `src/funcs/eventsIngestEvents.ts` (`POST /v1/events/ingest`, 1..100 events, 202, 422 error,
    whole batch validated first, event_id deduplicated), `src/lib/security.ts` (`x-api-key`),
    `src/models/components/ingestusageeventapirequestdto.ts` (name; customer_id |
    external_customer_id: letters, digits, `_`, `-`, at most 255; event_id; timestamp;
    properties: at most 50 keys of at most 40 characters, values at most 500),
    `ingestusageeventsapiresponsedto.ts` (`{accepted, event_ids, warnings?}`),
    `ingestusageeventwarningapidto.ts` (`{index, code, message}`, codes `no_matching_meter`,
    `meter_archived`, `timestamp_outside_late_window`), `usagemeteringerrordetailapidto.ts` and
    `src/models/errors/usagemeteringerrorapiresponsedto.ts` (`{error: {type, code, message,
    param, details, request_id}}`).

    `meters`: the event names an active meter consumes (None: every name); `archived`: names
    only an archived meter consumes. Other names are accepted with a warning and never bill."""

    write_route = "POST /v1/events/ingest"
    id_field = "event_id"
    customer_fields = ("customer_id", "external_customer_id")
    value_field = "properties"
    max_events = 100

    def __init__(
        self,
        customers: Iterable[str] | None = None,
        external: Iterable[str] = (),
        meters: Iterable[str] | None = None,
        archived: Iterable[str] = (),
    ) -> None:
        super().__init__(customers)
        self.external = set(external)  # external_id registered on Creem customers
        self.meters = None if meters is None else set(meters)
        self.archived = set(archived)
        self._requests = itertools.count(1)

    def authorised(self, headers: Mapping[str, str]) -> bool:
        return headers.get("x-api-key") == CREEM_KEY and "authorization" not in headers

    def check(self, event: dict[str, Any], now: dt.datetime) -> tuple[str, str] | None:
        if "metadata" in event:  # removed in 1.9.0
            return "metadata", "property metadata should not exist; use properties"
        if ("customer_id" in event) == ("external_customer_id" in event):
            return "customer_id", "exactly one of customer_id / external_customer_id"
        optional = {"customer_id", "external_customer_id", "event_id", "timestamp", "properties"}
        wrong = _fields(event, {"name", "event_id"}, optional)
        if wrong:
            return wrong
        if not isinstance(event["name"], str) or not event["name"]:
            return "name", "a non-empty string"
        for field in ("customer_id", "external_customer_id"):
            if field in event and not _CREEM_ID.fullmatch(str(event[field])):
                return field, "letters, digits, _ and - only, at most 255 characters"
        if not isinstance(event["event_id"], str) or not event["event_id"].strip():
            return "event_id", "must not be empty"
        if "timestamp" in event and _time(event["timestamp"]) is None:
            return "timestamp", "an ISO-8601 timestamp"
        problem = _attributes_problem(event.get("properties", {}), "properties", 50, 40, 500, True)
        return ("properties", problem) if problem else None

    def unknown(self, event: dict[str, Any]) -> tuple[str, str] | None:
        if "external_customer_id" in event:
            known = event["external_customer_id"] in self.external
            return None if known else ("external_customer_id", event["external_customer_id"])
        return super().unknown(event)

    def warning(self, event: dict[str, Any]) -> tuple[str, str] | None:
        name = event["name"]
        if self.meters is None or name in self.meters:
            return None
        if name in self.archived:
            return "meter_archived", f"only archived meters consume {name!r}"
        return "no_matching_meter", f"no meter consumes the event name {name!r}"

    def bills(self, event: dict[str, Any]) -> bool:
        return self.warning(event) is None

    def error(self, status: int, kind: str, code: str, message: str, param: str = "") -> Answer:
        error: dict[str, Any] = {
            "type": kind,
            "code": code,
            "message": message,
            "request_id": f"req_{next(self._requests)}",
        }
        if param:
            error["param"] = param
        return Answer(status, {"error": error})

    def unauthorised(self) -> Answer:
        return self.error(401, "authentication_error", "invalid_api_key", "Invalid API key")

    def not_found(self) -> Answer:
        return self.error(404, "invalid_request_error", "not_found", "Not found")

    def invalid(self, index: int | None, message: str, field: str = "") -> Answer:
        param = "events" if index is None else f"events[{index}]"
        param += f".{field}" if field and index is not None else ""
        return self.error(422, "invalid_request_error", "validation_error", message, param)

    def unknown_customer(self, index: int, field: str, customer: str) -> Answer:
        return self.error(
            422,
            "invalid_request_error",
            "customer_not_found",
            f"No customer {customer!r} in this store",
            f"events[{index}].{field}",
        )

    def ok(self, events: list[dict[str, Any]], fresh: int) -> Answer:
        body: dict[str, Any] = {
            "accepted": len(events),
            "event_ids": [e["event_id"].strip() for e in events],
        }
        warnings = [
            {"index": i, "code": w[0], "message": w[1]}
            for i, w in enumerate(map(self.warning, events))
            if w
        ]
        if warnings:
            body["warnings"] = warnings
        return Answer(202, body)

    def read(self, path: str, headers: Mapping[str, str]) -> Answer:
        """`GET /v1/events` (`events.listEvents`): oldest first, a forward cursor page."""
        if path != "/v1/events":
            return super().read(path, headers)
        q = self.params({"customer_id", "limit", "meter_id", "reference", "starting_after"})
        limit = _integer(q.get("limit", ""), 1) if q is not None else None
        if q is None or limit is None:  # the SDK always sends limit (default 10)
            self.violation(f"creem read: query {q!r}")
            return self.invalid(None, "invalid query parameter")
        rows = [
            {
                "id": f"uev_{pid}",
                "customer_id": e.get("customer_id") or f"cust_{e.get('external_customer_id')}",
                "event_id": e["event_id"],
                "name": e["name"],
                "properties": e.get("properties", {}),
                "timestamp": stamp,
                "created_at": self.received[e["event_id"]],
                "matched_meters": [f"mtr_{e['name']}"] if self.bills(e) else [],
            }
            for pid, e, stamp in self.held()
        ]
        after = q.get("starting_after")
        if after is not None:
            ids = [r["id"] for r in rows]
            if after not in ids:
                return self.error(404, "invalid_request_error", "not_found", "No such event")
            rows = rows[ids.index(after) + 1 :]
        rows = [
            r
            for r in rows
            if q.get("customer_id", r["customer_id"]) == r["customer_id"]
            and q.get("reference", r["event_id"]) == r["event_id"]
            and q.get("meter_id", f"mtr_{r['name']}") == f"mtr_{r['name']}"
        ]
        body = {"object": "list", "data": rows[:limit], "has_more": len(rows) > limit}
        return Answer(200, body)
