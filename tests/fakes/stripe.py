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
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import itertools
import math
import re
import threading
import time
import urllib.parse
from collections.abc import Mapping

from fakes.base import Answer, FakeProvider, bearer

KEY = "sk_test_fake"
PATH = "/v1/billing/meter_events"
REQUIRED = ("event_name", "payload[stripe_customer_id]", "payload[value]")
OURS = ("identifier", "timestamp")  # optional for the SDK, always sent by our client
MAX_NAME = 100  # characters, event_name and identifier
MAX_DIGITS = 15  # payload[value]
WINDOW_BACK = 35 * 86400  # seconds
WINDOW_AHEAD = 300  # seconds
API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}\.[a-z]+")  # e.g. 2026-10-28.endive
USER_AGENT = re.compile(r"Stripe/v1 PythonBindings/16\.")


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


class FakeStripe(FakeProvider):
    write_route = f"POST {PATH}"

    def __init__(self) -> None:
        super().__init__()
        self.events: dict[str, MeterEvent] = {}  # by identifier
        self.versions: set[str] = set()  # Stripe-Version headers seen
        self._keys: dict[str, tuple[tuple[tuple[str, str], ...], Answer]] = {}
        self._in_flight: collections.Counter[tuple[str, str]] = collections.Counter()
        self._flight_lock = threading.Lock()
        self._received = itertools.count(1)
        self._request_ids = itertools.count(1)

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        answer = self._handle(method, path, headers, body)
        request_id = f"req_fake{next(self._request_ids):06d}"
        return dataclasses.replace(answer, headers={**answer.headers, "Request-Id": request_id})

    def _handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        if (method, path) != ("POST", PATH):
            self.violation(f"unexpected call {method} {path}")
            return error(404, f"Unrecognized request URL ({method}: {path}).")
        if not bearer(headers, KEY):
            self.violation("no bearer secret key")
            return error(401, "Invalid API Key provided.", "authentication_error")
        self._check_headers(headers)
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

    def _check_headers(self, headers: Mapping[str, str]) -> None:
        if not headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            self.violation(f"content-type {headers.get('content-type')}")
        version = headers.get("stripe-version", "")
        if not API_VERSION.fullmatch(version):
            self.violation(f"Stripe-Version {version!r}")
        with self.lock:
            self.versions.add(version)
        if not USER_AGENT.match(headers.get("user-agent", "")):
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
