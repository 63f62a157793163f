"""Stripe Billing Meters v1: `POST /v1/billing/meter_events`, form-encoded, one event per call.

Every request is checked against what stripe-python 16.1.0 (PyPI `stripe`, the version pinned
in pyproject.toml) sends and Stripe accepts. Read in that wheel:
- stripe/params/billing/_meter_event_create_params.py: the fields: `event_name` (str, required),
  `payload` (dict of str, required), `identifier` (str, optional; "Stripe enforces uniqueness
  within a rolling period of at least 24 hours"), `timestamp` (int seconds, optional; "within
  the past 35 calendar days or up to 5 minutes in the future"), `expand` (list of str, optional);
- stripe/billing/_meter_event_service.py: `POST /v1/billing/meter_events` on the "api" base;
- stripe/billing/_meter_event.py: the answer, object `billing.meter_event` with `created`,
  `event_name`, `identifier`, `livemode`, `payload`, `timestamp`;
- stripe/_api_requestor.py and stripe/_encode.py: form encoding (`payload[key]=...`),
  headers `Authorization: Bearer <key>`, `Content-Type: application/x-www-form-urlencoded`,
  `Idempotency-Key` (the SDK makes one up for every POST unless given one: we must give ours),
  `Stripe-Version`, `User-Agent: Stripe/v1 PythonBindings/<version>`; errors are read from
  `{"error": {"type", "code", "message", "param"}}`: 400/404 invalid_request_error (or
  idempotency_error), 401, 403, 429 and others; `Request-Id` is read from the headers;
- stripe/_stripe_client.py and stripe/_api_version.py: StripeClient sends `Stripe-Version`
  2026-10-28.endive (the SDK's pinned API version) on every request.
From Stripe's documentation (PROVIDERS.md): `event_name` and `identifier` at most 100
characters; `payload[value]` a whole number of at most 15 digits (400 otherwise).

Our client owes more than the SDK requires: `identifier` and `timestamp` always (never let Stripe
make them up), an Idempotency-Key equal to the identifier, no other fields, one call in flight per
(customer, meter). Whatever our client must never send is recorded in `violations`.

Aggregation, as Stripe bills a period [start, end): `sum` adds the values of the events whose
timestamp is in the period; `last` takes the value of the event with the latest timestamp in the
period. Stripe does not document how `last` breaks a tie of timestamps (whole seconds); its
changelog describes `last` as billing "the final meter event received in a billing period", so
among equal timestamps this fake takes the event received last.

Reads, as stripe-python 16.1.0 sends them (GET, query string in the SDK's bracket encoding, the
same Authorization, Stripe-Version and User-Agent headers, `Stripe/v2` in the User-Agent on /v2):
- `GET /v1/billing/meters` (stripe/billing/_meter_service.py, params/billing/_meter_list_params.py:
  `limit` 1..100, `starting_after`, `status`): a list of `billing.meter` (stripe/billing/_meter.py);
- `GET /v1/billing/meters/{id}/event_summaries` (stripe/billing/_meter_event_summary_service.py,
  params/billing/_meter_event_summary_list_params.py: `customer`, `start_time`, `end_time`
  required, the times "aligned with minute boundaries"): a list of `billing.meter_event_summary`
  (stripe/billing/_meter_event_summary.py: `aggregated_value` a float, `start_time`, `end_time`,
  `meter`, `id`, `livemode`), one summary for the period as no `value_grouping_window` is asked.
  A customer this fake does not know is a 404 `resource_missing`;
- `GET /v2/core/events` (stripe/v2/core/_event_service.py, params/v2/core/_event_list_params.py:
  `types` (sent as `types[0]`...), `created[gte|gt|lte|lt]` RFC 3339 times, `limit`): a v2 list
  (`data`, `next_page_url`) of `v2.core.event`, newest first; with `thin` set, listed without
  their `data`, which `GET /v2/core/events/{id}` gives. This fake holds only the
  `v1.billing.meter.error_report_triggered` events tests add with `report_error` (shape:
  stripe/events/_v1_billing_meter_error_report_triggered_event.py and Stripe's v2 Event object).
The v2 meter event stream, as stripe-python 16.1.0 sends it (stripe/v2/billing/
_meter_event_session_service.py, _meter_event_stream_service.py, _meter_event_session.py,
params/v2/billing/_meter_event_stream_create_params.py; _api_requestor.py: on /v2 a JSON body,
`Content-Type: application/json`, the same Authorization, Stripe-Version, Idempotency-Key and
`Stripe/v2` User-Agent):
- `POST /v2/billing/meter_event_session` (the "api" base; body `{}`, secret key as bearer):
  a `v2.billing.meter_event_session` (`id`, `authentication_token`, `created`, `expires_at`
  ISO-8601, `livemode`), the token valid `session_ttl` seconds (Stripe: 15 minutes);
- `POST /v2/billing/meter_event_stream` (the "meter_events" base; the session's token as bearer):
  `{"events": [...]}`, 1..100 events, each `event_name`, `payload` (str -> str), and the optional
  `identifier` and `timestamp` (ISO-8601) our client always sends; answers `{}`. An expired token
  is a 401 `billing_meter_event_session_expired`. Events Stripe already holds (by identifier, v1
  or v2) are ignored. A 400 refuses the whole request (nothing stored): for a malformed event (a
  violation of ours), or an identifier a test put in `refused`.
Summaries are computed from the events held, with drift a test injects: `drop` (an accepted event
missing from summaries), `double` (counted twice), `lag` / `catch_up` (summaries frozen as they
were when `lag` was called).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import itertools
import json
import math
import re
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

from fakes.base import Answer, FakeProvider, _Handler, bearer

KEY = "sk_test_fake"
PATH = "/v1/billing/meter_events"
REQUIRED = ("event_name", "payload[stripe_customer_id]", "payload[value]")
OURS = ("identifier", "timestamp")  # optional for the SDK, always sent by our client
MAX_NAME = 100  # characters, event_name and identifier
MAX_DIGITS = 15  # payload[value]
WINDOW_BACK = 35 * 86400  # seconds
WINDOW_AHEAD = 300  # seconds
API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}\.[a-z]+")  # e.g. 2026-10-28.endive
USER_AGENT = re.compile(r"Stripe/(v1|v2) PythonBindings/16\.")
METERS_PATH = "/v1/billing/meters"
SUMMARIES = re.compile(r"/v1/billing/meters/([^/]+)/event_summaries")
EVENTS_PATH = "/v2/core/events"
EVENT = re.compile(r"/v2/core/events/([^/]+)")
ERROR_REPORT = "v1.billing.meter.error_report_triggered"
SESSION_PATH = "/v2/billing/meter_event_session"
STREAM_PATH = "/v2/billing/meter_event_stream"
STREAM_EVENTS = 100  # events per stream request, at most
SESSION_TTL = 15 * 60.0  # seconds a session's token is valid
EXPIRED = "billing_meter_event_session_expired"
STREAM_FIELDS = {"event_name", "identifier", "payload", "timestamp"}
# The tests' plans (tests/plans.toml): Stripe event name -> the formula our adapter expects.
METERS = {"llm_tokens": "sum", "calls": "count", "storage": "last", "seats": "last"}
CUSTOMERS = ("cus_1", "cus_s")  # fakes.event's default and fakes.world's Stripe customer
PAGE = 100  # the most objects a Stripe list answers
DEFAULT_PAGE = {METERS_PATH: 10, EVENTS_PATH: 20}  # when no limit is asked


@dataclasses.dataclass(frozen=True)
class MeterEvent:
    event_name: str
    customer: str
    value: int
    identifier: str
    timestamp: int
    received: int = 0  # order of receipt, from 1


def error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    code: str = "",
    param: str = "",
    **headers: str,
) -> Answer:
    body: dict[str, str] = {"type": kind, "message": message}
    if code:
        body["code"] = code
    if param:
        body["param"] = param
    return Answer(status, {"error": body}, headers)


def seconds(when: dt.datetime | int) -> float:
    return when if isinstance(when, int) else when.timestamp()


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_request = threading.local()  # the query string of the request the current thread serves


class _QueryHandler(_Handler):
    """The shared handler, keeping the query string the shared plumbing leaves out."""

    def do_GET(self) -> None:
        _request.query = urllib.parse.urlsplit(self.path).query
        super().do_GET()

    def do_POST(self) -> None:
        _request.query = urllib.parse.urlsplit(self.path).query
        super().do_POST()


@dataclasses.dataclass(frozen=True)
class View:
    """What summaries are computed from: the events held, less dropped, plus doubled ones."""

    events: tuple[MeterEvent, ...]
    dropped: frozenset[str]
    doubled: frozenset[str]


class FakeStripe(FakeProvider):
    write_route = f"POST {PATH}"

    def __init__(
        self, meters: Mapping[str, str] = METERS, customers: Iterable[str] = CUSTOMERS
    ) -> None:
        """`meters`: event_name -> formula (sum, count, last) of the account's active meters;
        `customers`: the Stripe customer ids summaries can be asked for."""
        super().__init__()
        self._server.RequestHandlerClass = _QueryHandler
        self.meters: dict[str, dict[str, Any]] = {}  # billing.meter objects by id, oldest first
        self.customers = set(customers)
        self.error_events: list[dict[str, Any]] = []  # v2.core.event objects, oldest first
        self.page_size = PAGE  # lower it to make lists answer in several pages
        self.thin = False  # list events without their `data` (GET /v2/core/events/{id} has it)
        self.dropped: set[str] = set()
        self.doubled: set[str] = set()
        self._frozen: View | None = None  # set by lag(), until catch_up()
        self._ids = itertools.count(1)
        self.events: dict[str, MeterEvent] = {}  # by identifier
        self.versions: set[str] = set()  # Stripe-Version headers seen
        self._keys: dict[str, tuple[tuple[tuple[str, str], ...], Answer]] = {}
        self._in_flight: collections.Counter[tuple[str, str]] = collections.Counter()
        self._flight_lock = threading.Lock()
        self._received = itertools.count(1)
        self._request_ids = itertools.count(1)
        self.session_ttl = SESSION_TTL  # seconds a new session's token is valid
        self.tokens: dict[str, float] = {}  # session token -> when it expires (time.time())
        self.stream_sizes: list[int] = []  # events per stream request answered 200
        self.refused: dict[str, str] = {}  # identifier -> why the stream refuses it (a 400)
        for event_name, formula in meters.items():
            self.add_meter(event_name, formula)

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        answer = self._handle(method, path, headers, body)
        request_id = f"req_fake{next(self._request_ids):06d}"
        return dataclasses.replace(answer, headers={**answer.headers, "Request-Id": request_id})

    def _handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        summaries = SUMMARIES.fullmatch(path)
        one = EVENT.fullmatch(path)
        if method == "POST" and path == STREAM_PATH:
            self._check_headers(headers, path)
            return self._stream(headers, body)
        known = (method, path) in (
            ("POST", PATH),
            ("POST", SESSION_PATH),
            ("GET", METERS_PATH),
            ("GET", EVENTS_PATH),
        )
        if not known and not (method == "GET" and (summaries or one)):
            self.violation(f"unexpected call {method} {path}")
            return error(404, f"Unrecognized request URL ({method}: {path}).")
        if not bearer(headers, KEY):
            self.violation("no bearer secret key")
            return error(401, "Invalid API Key provided.", "authentication_error")
        self._check_headers(headers, path)
        if method == "GET":
            query = self._query(getattr(_request, "query", ""))
            if query is None:
                return error(400, "Received repeated parameters.")
            if summaries:
                return self._summaries(urllib.parse.unquote(summaries.group(1)), query)
            if one:
                return self._event(urllib.parse.unquote(one.group(1)), query)
            return self._list_meters(query) if path == METERS_PATH else self._events(query)
        if path == SESSION_PATH:
            return self._new_session(body)
        return self._post(headers, body)

    def _post(self, headers: Mapping[str, str], body: bytes) -> Answer:
        try:
            form = urllib.parse.parse_qs(body.decode(), keep_blank_values=True, strict_parsing=True)
        except ValueError:
            self.violation(f"body is not form-encoded: {body[:100]!r}")
            return error(400, "Invalid request body.")
        if any(len(v) != 1 for v in form.values()):
            self.violation(f"repeated fields {sorted(form)}")
            return error(400, "Received repeated parameters.")
        fields = {k: v[0] for k, v in form.items()}
        answer = self._check_fields(fields)
        if answer is not None:
            return answer
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

    def _check_headers(self, headers: Mapping[str, str], path: str) -> None:
        form = "application/x-www-form-urlencoded"
        wanted = {PATH: form, SESSION_PATH: "application/json", STREAM_PATH: "application/json"}
        if path in wanted and not headers.get("content-type", "").startswith(wanted[path]):
            self.violation(f"content-type {headers.get('content-type')} on {path}")
        if path in (SESSION_PATH, STREAM_PATH) and not headers.get("idempotency-key"):
            self.violation(f"no Idempotency-Key on {path}")
        version = headers.get("stripe-version", "")
        if not API_VERSION.fullmatch(version):
            self.violation(f"Stripe-Version {version!r}")
        with self.lock:
            self.versions.add(version)
        agent = USER_AGENT.match(headers.get("user-agent", ""))
        if not agent or agent.group(1) != path[1:3]:
            self.violation(f"not sent by stripe-python 16: {headers.get('user-agent')!r}")

    def _check_fields(self, fields: dict[str, str]) -> Answer | None:
        """The request schema: a 400 (and a violation) for anything our client must not send;
        None when the fields are well formed."""
        for name in REQUIRED + OURS:
            if name not in fields:
                self.violation(f"missing {name}")
                return error(
                    400, f"Missing required param: {name}.", code="parameter_missing", param=name
                )
        unknown = sorted(set(fields) - set(REQUIRED) - set(OURS))
        if unknown:  # other payload keys and `expand` are valid for Stripe, never sent by us
            self.violation(f"unexpected fields {unknown}")
            return error(
                400,
                f"Received unknown parameter: {unknown[0]}",
                code="parameter_unknown",
                param=unknown[0],
            )
        for name in ("event_name", "identifier"):
            if not 0 < len(fields[name]) <= MAX_NAME:
                self.violation(f"{name} of {len(fields[name])} characters")
                return error(
                    400, f"Invalid string: {name} must be 1 to {MAX_NAME} characters.", param=name
                )
        if not re.fullmatch(r"\d+", fields["timestamp"]):
            self.violation(f"timestamp {fields['timestamp']!r} is not a whole number")
            return error(
                400,
                "Invalid integer: timestamp",
                code="parameter_invalid_integer",
                param="timestamp",
            )
        value = fields["payload[value]"]
        if not re.fullmatch(r"\d+", value):
            self.violation(f"value {value!r} is not a whole number")
            return error(
                400, "Invalid value: payload[value] must be a whole number.", param="payload[value]"
            )
        if len(value.lstrip("0")) > MAX_DIGITS:
            self.violation(f"value {value} has more than {MAX_DIGITS} digits")
            return error(
                400,
                f"Invalid value: payload[value] can have at most {MAX_DIGITS} digits.",
                param="payload[value]",
            )
        return None

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
            answer = self._accept(fields)
            self._keys[key] = (params, answer)
            return answer

    def _accept(self, fields: dict[str, str]) -> Answer:
        stamp = int(fields["timestamp"])
        now = time.time()
        if not now - WINDOW_BACK <= stamp <= now + WINDOW_AHEAD:
            return error(
                400,
                "Timestamp must be within the past 35 days and 5 minutes ahead.",
                param="timestamp",
            )
        identifier = fields["identifier"]
        if identifier in self.events:
            return error(
                400,
                f"An event already exists with identifier {identifier}.",
                param="identifier",
                **{"Stripe-Should-Retry": "false"},
            )
        self.events[identifier] = MeterEvent(
            fields["event_name"],
            fields["payload[stripe_customer_id]"],
            int(fields["payload[value]"]),
            identifier,
            stamp,
            next(self._received),
        )
        return Answer(
            200,
            {
                "object": "billing.meter_event",
                "created": int(now),
                "event_name": fields["event_name"],
                "identifier": identifier,
                "livemode": False,
                "payload": {
                    "stripe_customer_id": fields["payload[stripe_customer_id]"],
                    "value": fields["payload[value]"],
                },
                "timestamp": stamp,
            },
        )

    # --- the v2 meter event stream ---

    def _new_session(self, body: bytes) -> Answer:
        if body.strip() not in (b"", b"{}"):
            self.violation(f"meter event session with parameters {body[:100]!r}")
        now = time.time()
        token = f"mes_tok_{next(self._ids):06d}"
        expires = now + self.session_ttl
        with self.lock:
            self.tokens[token] = expires
        stamp = dt.datetime.fromtimestamp
        return Answer(
            200,
            {
                "id": f"mes_test_{next(self._ids):06d}",
                "object": "v2.billing.meter_event_session",
                "authentication_token": token,
                "created": rfc3339(stamp(now, dt.UTC)),
                "expires_at": rfc3339(stamp(expires, dt.UTC)),
                "livemode": False,
            },
        )

    def expire_sessions(self) -> None:
        """Every session's token expires now."""
        with self.lock:
            self.tokens = dict.fromkeys(self.tokens, 0.0)

    def _stream(self, headers: Mapping[str, str], body: bytes) -> Answer:
        auth = headers.get("authorization", "")
        token = auth.removeprefix("Bearer ")
        with self.lock:
            expires = self.tokens.get(token)
        if expires is None:
            self.violation(f"stream call without a session token: {auth[:20]!r}")
            return error(401, "Invalid authentication token.", "invalid_request_error")
        if time.time() >= expires:
            return error(
                401, "The meter event session has expired.", "invalid_request_error", EXPIRED
            )
        try:
            request = json.loads(body)
        except ValueError:
            self.violation(f"stream body is not JSON: {body[:100]!r}")
            return error(400, "Invalid JSON body.")
        if not isinstance(request, dict) or set(request) != {"events"}:
            self.violation(f"stream body is not {{'events': [...]}}: {body[:100]!r}")
            return error(400, "Invalid request body.", param="events")
        events = request["events"]
        if not isinstance(events, list) or not 0 < len(events) <= STREAM_EVENTS:
            self.violation(f"stream request of {len(events)} events")
            return error(400, f"events must hold 1 to {STREAM_EVENTS} events.", param="events")
        parsed = []
        for k, raw in enumerate(events):
            checked = self._check_stream_event(raw, k)
            if isinstance(checked, Answer):
                return checked
            if checked.identifier in self.refused:
                return error(400, self.refused[checked.identifier], param=f"events[{k}]")
            parsed.append(checked)
        if len({e.identifier for e in parsed}) != len(parsed):
            self.violation("an identifier twice in one stream request")
        with self.lock:
            for e in parsed:
                held = self.events.get(e.identifier)
                if held is None:
                    self.events[e.identifier] = dataclasses.replace(
                        e, received=next(self._received)
                    )
                elif dataclasses.replace(held, received=0) != e:
                    self.violation(f"identifier {e.identifier} re-sent with another payload")
            self.stream_sizes.append(len(parsed))
        return Answer(200, {})

    def _check_stream_event(self, raw: Any, k: int) -> MeterEvent | Answer:
        """One stream event as held, or a 400 (and a violation) for what our client must never
        send: a missing or unknown field, a value that is not a whole number of at most 15
        digits, a time that is not ISO-8601 or outside Stripe's window."""
        where = f"events[{k}]"

        def bad(text: str, param: str) -> Answer:
            self.violation(f"{where}: {text}")
            return error(400, f"Invalid {param}: {text}", param=f"{where}.{param}")

        if not isinstance(raw, dict) or set(raw) != STREAM_FIELDS:
            return bad(f"fields {sorted(raw) if isinstance(raw, dict) else raw!r}", "event")
        name, identifier, payload = raw["event_name"], raw["identifier"], raw["payload"]
        for field, text in (("event_name", name), ("identifier", identifier)):
            if not isinstance(text, str) or not 0 < len(text) <= MAX_NAME:
                return bad(f"{field} {text!r}", field)
        if not isinstance(payload, dict) or set(payload) != {"stripe_customer_id", "value"}:
            return bad(f"payload {payload!r}", "payload")
        if not all(isinstance(v, str) for v in payload.values()):
            return bad(f"payload values {payload!r} are not strings", "payload")
        value = payload["value"]
        if not re.fullmatch(r"\d+", value) or len(value.lstrip("0")) > MAX_DIGITS:
            return bad(f"value {value!r}", "payload.value")
        stamp = raw["timestamp"]
        try:
            when = dt.datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:
            return bad(f"timestamp {stamp!r} is not ISO-8601 with a zone", "timestamp")
        now = time.time()
        if not now - WINDOW_BACK <= when.timestamp() <= now + WINDOW_AHEAD:
            return bad(f"timestamp {stamp} outside the past 35 days and 5 minutes", "timestamp")
        if when.timestamp() != int(when.timestamp()):
            return bad(f"timestamp {stamp} is not a whole second", "timestamp")
        return MeterEvent(
            name, payload["stripe_customer_id"], int(value), identifier, int(when.timestamp())
        )

    def _meter_events(
        self,
        customer: str,
        event_name: str,
        start: dt.datetime | int | None,
        end: dt.datetime | int | None,
    ) -> list[MeterEvent]:
        low = -math.inf if start is None else seconds(start)
        high = math.inf if end is None else seconds(end)
        with self.lock:
            return [
                e
                for e in self.events.values()
                if (e.customer, e.event_name) == (customer, event_name)
                and low <= e.timestamp < high
            ]

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

    def summed(
        self,
        customer: str,
        event_name: str,
        start: dt.datetime | int | None = None,
        end: dt.datetime | int | None = None,
    ) -> int:
        """What a `sum` meter bills for [start, end) (unbounded where None)."""
        return sum(e.value for e in self._meter_events(customer, event_name, start, end))

    def last(
        self,
        customer: str,
        event_name: str,
        start: dt.datetime | int | None = None,
        end: dt.datetime | int | None = None,
    ) -> int | None:
        """What a `last` meter bills for [start, end): the value of the event with the latest
        timestamp; of several, the one received last. None: no event in the period."""
        mine = self._meter_events(customer, event_name, start, end)
        return max(mine, key=lambda e: (e.timestamp, e.received)).value if mine else None

    # --- the account's meters, and drift in what summaries show ---

    def add_meter(self, event_name: str, formula: str, status: str = "active") -> str:
        meter_id = f"mtr_test_{next(self._ids):04d}"
        now = int(time.time())
        with self.lock:
            self.meters[meter_id] = {
                "id": meter_id,
                "object": "billing.meter",
                "created": now,
                "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
                "default_aggregation": {"formula": formula},
                "display_name": event_name,
                "event_name": event_name,
                "event_time_window": None,
                "livemode": False,
                "status": status,
                "status_transitions": {"deactivated_at": None if status == "active" else now},
                "updated": now,
                "value_settings": {"event_payload_key": "value"},
            }
        return meter_id

    def meter_id(self, event_name: str) -> str:
        """The active meter of an event name."""
        with self.lock:
            (found,) = (
                m["id"]
                for m in self.meters.values()
                if m["event_name"] == event_name and m["status"] == "active"
            )
        return str(found)

    def drop(self, identifier: str) -> None:
        """An accepted meter event goes missing from summaries."""
        with self.lock:
            assert identifier in self.events, identifier
            self.dropped.add(identifier)

    def double(self, identifier: str) -> None:
        """An accepted meter event is counted twice in summaries."""
        with self.lock:
            assert identifier in self.events, identifier
            self.doubled.add(identifier)

    def lag(self) -> None:
        """Summaries show what they show now until catch_up(), whatever else is accepted."""
        with self.lock:
            self._frozen = self._live_view()

    def catch_up(self) -> None:
        with self.lock:
            self._frozen = None

    def report_error(
        self,
        identifier: str,
        code: str,
        message: str,
        event_name: str = "",
        created: dt.datetime | None = None,
    ) -> str:
        """Stripe's asynchronous report of a meter event it accepted but could not bill: a
        `v1.billing.meter.error_report_triggered` event naming `identifier` as its one sample.
        The meter is the active one of the event's name (or of `event_name`)."""
        with self.lock:
            known = self.events.get(identifier)
        meter_id = self.meter_id(known.event_name if known else event_name)
        when = created or dt.datetime.now(dt.UTC)
        event = {
            "id": f"evt_test_{next(self._ids):04d}",
            "object": "v2.core.event",
            "context": None,
            "created": rfc3339(when),
            "data": {
                "developer_message_summary": "There is 1 invalid event",
                "reason": {
                    "error_count": 1,
                    "error_types": [
                        {
                            "code": code,
                            "error_count": 1,
                            "sample_errors": [
                                {"error_message": message, "request": {"identifier": identifier}}
                            ],
                        }
                    ],
                },
                "validation_end": rfc3339(when),
                "validation_start": rfc3339(when - dt.timedelta(seconds=10)),
            },
            "livemode": False,
            "reason": None,
            "related_object": {
                "id": meter_id,
                "type": "billing.meter",
                "url": f"{METERS_PATH}/{meter_id}",
            },
            "type": ERROR_REPORT,
        }
        with self.lock:
            self.error_events.append(event)
        return str(event["id"])

    def summary(
        self, customer: str, event_name: str, start: int, end: int, formula: str = ""
    ) -> float:
        """What a summary of [start, end) shows, with the injected drift: sum, count or last
        (latest timestamp, then latest received) by the formula (by default the event name's
        active meter's); 0 without events."""
        formula = formula or self._formula(event_name)
        with self.lock:
            view = self._frozen or self._live_view()
        mine = [
            e
            for e in view.events
            if (e.customer, e.event_name) == (customer, event_name)
            and start <= e.timestamp < end
            and e.identifier not in view.dropped
        ]
        if formula == "last":
            return float(max(mine, key=lambda e: (e.timestamp, e.received)).value if mine else 0)
        counted = mine + [e for e in mine if e.identifier in view.doubled]
        if formula == "count":
            return float(len(counted))
        return float(sum(e.value for e in counted))

    # --- the read endpoints ---

    def _live_view(self) -> View:
        return View(tuple(self.events.values()), frozenset(self.dropped), frozenset(self.doubled))

    def _formula(self, event_name: str) -> str:
        meter_id = self.meter_id(event_name)
        with self.lock:
            return str(self.meters[meter_id]["default_aggregation"]["formula"])

    def _query(self, query: str) -> dict[str, str] | None:
        parsed = urllib.parse.parse_qs(query, keep_blank_values=True)
        if any(len(v) != 1 for v in parsed.values()):
            self.violation(f"repeated query parameters {sorted(parsed)}")
            return None
        return {k: v[0] for k, v in parsed.items()}

    def _refuse(self, query: Mapping[str, str], allowed: Iterable[str]) -> Answer | None:
        """A 400 (and a violation) for a parameter the SDK's params type does not have, or one
        this fake does not implement; None when every parameter is known."""
        unknown = sorted(set(query) - set(allowed))
        if not unknown:
            return None
        self.violation(f"unexpected query parameters {unknown}")
        return error(
            400,
            f"Received unknown parameter: {unknown[0]}",
            code="parameter_unknown",
            param=unknown[0],
        )

    def _limit(self, query: Mapping[str, str], path: str) -> int | Answer:
        text = query.get("limit", str(DEFAULT_PAGE[path]))
        if not (text.isdigit() and 1 <= int(text) <= PAGE):
            self.violation(f"limit {text!r}")
            return error(400, f"Invalid limit: must be 1 to {PAGE}.", param="limit")
        return min(int(text), self.page_size)

    def _list_meters(self, query: Mapping[str, str]) -> Answer:
        refused = self._refuse(query, ("limit", "starting_after", "status"))
        if refused:
            return refused
        limit = self._limit(query, METERS_PATH)
        if isinstance(limit, Answer):
            return limit
        status = query.get("status")
        if status not in (None, "active", "inactive"):
            self.violation(f"status {status!r}")
            return error(400, f"Invalid status: {status}", param="status")
        with self.lock:
            meters = [m for m in self.meters.values() if status in (None, m["status"])]
        ids = [m["id"] for m in meters]
        after = query.get("starting_after")
        if after is not None and after not in ids:
            self.violation(f"starting_after {after!r}")
            return error(404, f"No such billing meter: '{after}'", code="resource_missing")
        first = 0 if after is None else ids.index(after) + 1
        page = meters[first : first + limit]
        return Answer(
            200,
            {
                "object": "list",
                "data": page,
                "has_more": first + limit < len(meters),
                "url": METERS_PATH,
            },
        )

    def _summaries(self, meter_id: str, query: Mapping[str, str]) -> Answer:
        with self.lock:
            meter = self.meters.get(meter_id)
        if meter is None:
            self.violation(f"event summaries of unknown meter {meter_id!r}")
            return error(404, f"No such billing meter: '{meter_id}'", code="resource_missing")
        refused = self._refuse(query, ("customer", "start_time", "end_time", "limit"))
        if refused:
            return refused
        limit = self._limit(query, METERS_PATH)
        if isinstance(limit, Answer):
            return limit
        for name in ("customer", "start_time", "end_time"):
            if not query.get(name):
                self.violation(f"missing {name}")
                return error(
                    400, f"Missing required param: {name}.", code="parameter_missing", param=name
                )
        for name in ("start_time", "end_time"):
            if not query[name].isdigit() or int(query[name]) % 60:
                self.violation(f"{name} {query[name]!r} is not a whole minute")
                return error(400, f"{name} must be aligned with minute boundaries.", param=name)
        start, end = int(query["start_time"]), int(query["end_time"])
        if start >= end:
            self.violation(f"start_time {start} is not before end_time {end}")
            return error(400, "start_time must be before end_time.", param="start_time")
        customer = query["customer"]
        if customer not in self.customers:
            return error(404, f"No such customer: '{customer}'", code="resource_missing")
        formula = meter["default_aggregation"]["formula"]
        value = self.summary(customer, meter["event_name"], start, end, formula)
        summary = {
            "id": f"mtrsum_{meter_id}_{customer}_{start}",
            "object": "billing.meter_event_summary",
            "aggregated_value": value,
            "end_time": end,
            "livemode": False,
            "meter": meter_id,
            "start_time": start,
        }
        return Answer(
            200,
            {
                "object": "list",
                "data": [summary],
                "has_more": False,
                "url": f"{METERS_PATH}/{meter_id}/event_summaries",
            },
        )

    def _events(self, query: Mapping[str, str]) -> Answer:
        types = {k: v for k, v in query.items() if re.fullmatch(r"types\[\d+\]", k)}
        bounds = {k: v for k, v in query.items() if re.fullmatch(r"created\[(gte|gt|lte|lt)\]", k)}
        refused = self._refuse(query, {*types, *bounds, "limit", "page"})
        if refused:
            return refused
        limit = self._limit(query, EVENTS_PATH)
        if isinstance(limit, Answer):
            return limit
        times: dict[str, dt.datetime] = {}
        for key, text in bounds.items():
            try:
                times[key[8:-1]] = dt.datetime.fromisoformat(text)
            except ValueError:
                self.violation(f"{key} {text!r} is not an RFC 3339 time")
                return error(400, f"Invalid timestamp: {key}", param=key)
            if times[key[8:-1]].tzinfo is None:
                self.violation(f"{key} {text!r} has no time zone")
                return error(400, f"Invalid timestamp: {key}", param=key)
        tests = {
            "gte": lambda c, t: c >= t,
            "gt": lambda c, t: c > t,
            "lte": lambda c, t: c <= t,
            "lt": lambda c, t: c < t,
        }
        with self.lock:
            events = list(self.error_events)
        chosen = [
            e
            for e in reversed(events)  # newest first
            if (not types or e["type"] in types.values())
            and all(
                tests[op](dt.datetime.fromisoformat(e["created"]), t) for op, t in times.items()
            )
        ]
        first = int(query.get("page", "0"))
        more = first + limit < len(chosen)
        rest = {k: v for k, v in query.items() if k != "page"}
        following = urllib.parse.urlencode({**rest, "page": str(first + limit)})
        page = chosen[first : first + limit]
        if self.thin:
            page = [{k: v for k, v in e.items() if k != "data"} for e in page]
        return Answer(
            200,
            {
                "data": page,
                "next_page_url": f"{EVENTS_PATH}?{following}" if more else None,
                "previous_page_url": None,
            },
        )

    def _event(self, event_id: str, query: Mapping[str, str]) -> Answer:
        refused = self._refuse(query, ())
        if refused:
            return refused
        with self.lock:
            found = [e for e in self.error_events if e["id"] == event_id]
        if not found:
            self.violation(f"unknown event {event_id!r}")
            return error(404, f"No such event: '{event_id}'", code="resource_missing")
        return Answer(200, found[0])
