"""Event ingestion shared by Polar, Dodo Payments and Creem: one provider event per usage event,
our event id as the provider's dedupe key, in batches within the provider's cap.

These providers reject a whole batch for one bad event. When the answer names the event, it is
set aside and the rest is sent again; when it does not (or the body is too large), the batch is
halved until the bad event stands alone. A re-sent event is deduplicated by the provider, so
sending a batch again is always safe.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from usage_service.plans import Meter
from usage_service.providers import outcome
from usage_service.providers.outcome import Outcome, Report, ReportEvent

Body = dict[str, Any]


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


@dataclasses.dataclass(frozen=True)
class _Split:
    """The batch was refused for a reason that names no event: halve it."""

    reason: str


class Ingest:
    def __init__(self, wire: Wire, http: httpx.AsyncClient, meters: Mapping[str, Meter]) -> None:
        self.wire = wire
        self._http = http
        self._meters = meters

    async def aclose(self) -> None:
        await self._http.aclose()

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
            if isinstance(answer, outcome.Rejected):
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

    async def _post(self, batch: Sequence[tuple[ReportEvent, Body]]) -> Outcome | _Split:
        """The one place this provider's answers become outcomes."""
        name = self.wire.name
        try:
            response = await self._http.post(self.wire.path, json={"events": [b for _, b in batch]})
        except httpx.TransportError as exc:
            return outcome.Retry(f"{name}: {type(exc).__name__}: {exc}")
        status = response.status_code
        if response.is_success:
            return outcome.Delivered()
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text[:300]
        reason = f"{name} {status}: {self.wire.reason(body)}"
        if outcome.retryable(status):
            return outcome.Retry(reason, outcome.retry_after(response.headers))
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


def client(base_url: str, headers: Mapping[str, str], timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, headers=dict(headers), timeout=timeout)


def metadata(event: ReportEvent, value_key: str, limit: int) -> dict[str, str | int]:
    """The value under `value_key`, then the event's properties (sorted) up to `limit` keys."""
    extra = sorted((k, v) for k, v in event.properties.items() if k != value_key)
    return {value_key: event.quantity, **dict(extra[: limit - 1])}


def not_future(when: dt.datetime, now: dt.datetime) -> dt.datetime:
    return min(when, now)
