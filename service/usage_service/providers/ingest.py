"""Event ingestion shared by Polar, Dodo Payments and Creem: one provider event per usage event,
our event id as the provider's dedupe key, in batches within the provider's cap.

These providers reject a whole batch for one bad event. When the answer names the event, it is
set aside and the rest is sent again; when it does not (or the body is too large), the batch is
halved until the bad event stands alone. A re-sent event is deduplicated by the provider, so
sending a batch again is always safe.

Every success body is read: duplicates the provider reports are counted, and an event the
provider accepted but says it will never bill (a Creem warning) is answered as rejected with the
provider's reason. A success body that cannot be read delivers the batch (the provider holds it)
and is logged.

A read-back (`held`) asks the provider for the events it holds for a customer, meter and period
(each provider's `read`) and compares them with the events sent (`compare`). Any error, or an
answer not in the documented shape, is a Held(None) saying why; nothing raises.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import httpx

from usage_service import metrics
from usage_service.domain.plans import Aggregation, Meter
from usage_service.domain.reports import Report, ReportEvent
from usage_service.providers import outcome
from usage_service.providers.outcome import Outcome
from usage_service.providers.readback import Held, Query

log = logging.getLogger(__name__)

Body = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Accepted:
    """What a success body says: events the provider already had, and events it stored but will
    never bill ({index in the batch: reason})."""

    duplicates: int = 0
    unbilled: Mapping[int, str] = dataclasses.field(default_factory=dict)


def default_should_retry(status: int, headers: httpx.Headers) -> bool:
    return outcome.retryable(status)


def default_delay(headers: httpx.Headers) -> float | None:
    return outcome.retry_after(headers)


@dataclasses.dataclass(frozen=True)
class Row:
    """One event as the provider holds it: our event id ("" when the provider does not say), its
    timestamp and its value under the meter's value key."""

    event_id: str
    time: dt.datetime
    value: int


class ReadError(Exception):
    """A read-back could not be answered; the message says why."""


@dataclasses.dataclass(frozen=True)
class Wire:
    """How one provider's ingestion endpoint is spoken."""

    name: str  # for reasons, e.g. "polar"
    path: str
    cap: int  # events per call
    # (event, meter, now) -> the provider's event, or a reason to set the event aside
    encode: Callable[[ReportEvent, Meter, dt.datetime], Body | str]
    # the error body of a rejected batch -> {index in the batch: reason} for the events it names
    named: Callable[[Any], Mapping[int, str]]
    # the error body -> a readable reason
    reason: Callable[[Any], str]
    # (success body, events sent) -> what it says, or None when it cannot be read
    accepted: Callable[[Any, int], Accepted | None]
    # (status, headers) of an error answer -> whether to send again
    should_retry: Callable[[int, httpx.Headers], bool] = default_should_retry
    # headers of an error answer to be retried -> seconds to wait, None: the drain's backoff
    delay: Callable[[httpx.Headers], float | None] = default_delay
    # (client, query) -> the events the provider holds for the query (raises ReadError, or
    # KeyError / TypeError / ValueError on an answer not in the documented shape)
    read: Callable[[httpx.AsyncClient, Query], Awaitable[Sequence[Row]]] | None = None


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a provider keeps of an event's attributes (the value key included)."""

    keys: int
    key_length: int
    value_length: int


@dataclasses.dataclass(frozen=True)
class _Split:
    """The batch was refused for a reason that names no event: halve it."""

    reason: str


@dataclasses.dataclass(frozen=True)
class _Unbilled:
    """The batch is stored; these events (event_id -> reason) will never bill."""

    reasons: Mapping[str, str]


class Ingest:
    def __init__(self, wire: Wire, http: httpx.AsyncClient, meters: Mapping[str, Meter]) -> None:
        self.wire = wire
        self.reporting = outcome.Reporting(lanes=False, batch=wire.cap)
        self._http = http
        self._meters = meters

    async def aclose(self) -> None:
        await self._http.aclose()

    async def held(self, query: Query) -> Held:
        """What the provider holds for the query's customer, meter and period; the cost is the
        provider's `read` (see its module)."""
        name = self.wire.name
        if self.wire.read is None:
            return Held(None, why=f"{name}: no read-back")
        try:
            rows = await self.wire.read(self._http, query)
        except ReadError as exc:
            return Held(None, why=f"{name}: {exc}")
        except (KeyError, TypeError, ValueError) as exc:
            return Held(None, why=f"{name}: unreadable answer: {exc!r}"[:500])
        return compare(rows, query)

    async def send(self, report: Report) -> Outcome:
        now = dt.datetime.now(dt.UTC)
        rejected: dict[str, str] = {}
        ready: list[tuple[ReportEvent, Body]] = []
        for event in report.events:
            meter = self._meters.get(event.meter)
            body = (
                self.wire.encode(event, meter, now)
                if meter
                else f"meter {event.meter!r} is not in the plans file"
            )
            if isinstance(body, str):
                rejected[event.event_id] = f"{self.wire.name}: {body}"
            else:
                ready.append((event, body))
        cap = self.wire.cap
        queue = collections.deque(ready[i : i + cap] for i in range(0, len(ready), cap))
        for _ in range(4 * len(ready) + 4):  # each pass sends, sets one aside, or halves
            if not queue:
                return outcome.Rejected(rejected) if rejected else outcome.Delivered()
            batch = queue.popleft()
            answer = await self._post(batch)
            if isinstance(answer, _Unbilled):
                rejected.update(answer.reasons)
            elif isinstance(answer, outcome.Rejected):
                rejected.update(answer.reasons)
                rest = [pair for pair in batch if pair[0].event_id not in answer.reasons]
                if rest:
                    queue.appendleft(rest)
            elif isinstance(answer, _Split):
                if len(batch) == 1:
                    rejected[batch[0][0].event_id] = answer.reason
                else:
                    half = len(batch) // 2
                    queue.extendleft([batch[half:], batch[:half]])
            elif not isinstance(answer, outcome.Delivered):
                return answer
        return outcome.Retry(f"{self.wire.name}: could not isolate the rejected events")

    async def _post(
        self, batch: Sequence[tuple[ReportEvent, Body]]
    ) -> Outcome | _Split | _Unbilled:
        """The one place this provider's answers become outcomes."""
        name = self.wire.name
        try:
            response = await self._http.post(self.wire.path, json={"events": [b for _, b in batch]})
        except httpx.TransportError as exc:
            return outcome.Retry(f"{name}: {type(exc).__name__}: {exc}")
        status = response.status_code
        try:
            body: Any = response.json()
        except ValueError:
            body = None if response.is_success else response.text[:300]
        if response.is_success:
            return self._accepted(batch, status, body)
        reason = f"{name} {status}: {self.wire.reason(body)}"
        if self.wire.should_retry(status, response.headers):
            return outcome.Retry(reason, self.wire.delay(response.headers))
        if status == 413:
            return _Split(reason)
        if status in (400, 422):
            named = {
                batch[i][0].event_id: f"{name} {status}: {text}"
                for i, text in self.wire.named(body).items()
                if 0 <= i < len(batch)
            }
            return outcome.Rejected(named) if named else _Split(reason)
        return outcome.Failed(reason)

    def _accepted(
        self, batch: Sequence[tuple[ReportEvent, Body]], status: int, body: Any
    ) -> outcome.Delivered | _Unbilled:
        name = self.wire.name
        said = self.wire.accepted(body, len(batch)) if body is not None else None
        if said is None:  # the provider holds the batch: deliver, and say so
            log.warning(
                "%s %d: success body not understood; %d events taken as delivered: %.200r",
                name,
                status,
                len(batch),
                body,
                extra={"action": "provider_answer", "provider": name},
            )
            return outcome.Delivered()
        if said.duplicates:
            metrics.provider_duplicates(name, said.duplicates)
        unbilled = {
            batch[i][0].event_id: f"{name}: {text}"
            for i, text in said.unbilled.items()
            if 0 <= i < len(batch)
        }
        return _Unbilled(unbilled) if unbilled else outcome.Delivered()


def client(
    base_url: str,
    headers: Mapping[str, str],
    timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,  # tests: httpx.MockTransport
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url, headers=dict(headers), timeout=timeout, transport=transport
    )


def attributes(
    event: ReportEvent, value_key: str, limits: Limits, reserved: str = ""
) -> dict[str, str | int] | str:
    """The value under `value_key`, then every property of the event (sorted); or, when the
    provider could not keep all of them as they are, a reason to set the event aside (an event
    recorded under older limits: nothing is dropped or overwritten silently)."""
    props = sorted(event.properties.items())
    problem = ""
    if value_key in event.properties:
        problem = f"property {value_key!r} has the name of the meter's value key"
    elif len(props) + 1 > limits.keys:
        problem = f"{len(props)} properties and the value exceed {limits.keys} keys"
    else:
        for key, value in props:
            if js_length(key) > limits.key_length or js_length(value) > limits.value_length:
                problem = (
                    f"property {key[:50]!r} is over {limits.key_length} characters (key) "
                    f"or {limits.value_length} (value)"
                )
            elif reserved and key.startswith(reserved):
                problem = f"property {key[:50]!r}: keys starting with {reserved!r} are reserved"
            if problem:
                break
    if problem:
        return f"{problem}; not sent"
    return {value_key: event.quantity, **dict(props)}


def js_length(text: str) -> int:
    """A string's length as the providers' JavaScript and TypeScript servers count it: in UTF-16
    code units, so a character outside the Basic Multilingual Plane counts twice."""
    return len(text) + sum(1 for c in text if ord(c) > 0xFFFF)


def count(body: Any, key: str) -> int | None:
    """A non-negative whole number under `key` of a JSON object, if there is one."""
    value = body.get(key) if isinstance(body, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


async def get(
    http: httpx.AsyncClient,
    path: str,
    params: Mapping[str, str | int],
    reason: Callable[[Any], str],
) -> Any:
    """The JSON body of a successful GET; otherwise ReadError with the provider's reason."""
    try:
        response = await http.get(path, params=params)
    except httpx.TransportError as exc:
        raise ReadError(f"{type(exc).__name__}: {exc}") from exc
    try:
        body: Any = response.json()
    except ValueError:
        if response.is_success:
            raise ReadError(f"{response.status_code}: the body is not JSON") from None
        body = response.text[:300]
    if not response.is_success:
        raise ReadError(f"{response.status_code}: {reason(body)}")
    return body


def number(value: Any) -> int:
    """A whole number as a provider gives one back (5, 5.0 or "5"); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"not a number: {value!r}")
    as_float = float(value)
    if not as_float.is_integer():
        raise ValueError(f"not a whole number: {value!r}")
    return int(as_float)


def moment(text: Any) -> dt.datetime:
    """An ISO-8601 timestamp with a zone; ValueError otherwise."""
    when = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(f"timestamp without a zone: {text!r}")
    return when


def aggregate(rows: Sequence[Row], aggregation: Aggregation) -> int:
    """The rows in the meter's units; 0 for no rows."""
    if not rows:
        return 0
    if aggregation is Aggregation.SUM:
        return sum(r.value for r in rows)
    if aggregation is Aggregation.COUNT:
        return len(rows)
    if aggregation is Aggregation.MAX:
        return max(r.value for r in rows)
    return max(rows, key=lambda r: r.time).value  # last; ties: the first listed


def compare(rows: Sequence[Row], query: Query) -> Held:
    """The figure of the rows in the query's period, the sent events none of them is, and what
    the rest adds: the figure minus that of the first row of each sent event (for a `last`
    meter this is negative when an unsent row is newer and lower)."""
    rows = sorted((r for r in rows if query.start <= r.time < query.end), key=lambda r: r.time)
    sent = {s.event_id for s in query.sent}
    first: dict[str, Row] = {}
    for row in rows:
        if row.event_id in sent:
            first.setdefault(row.event_id, row)
    missing = tuple(s.event_id for s in query.sent if s.event_id not in first)
    value = aggregate(rows, query.meter.aggregation)
    extra = value - aggregate(list(first.values()), query.meter.aggregation)
    return Held(value, missing=missing, extra=extra)
