"""Stripe Billing Meters through the v2 meter event stream (`STRIPE_METER_EVENT_STREAM=true`).

A report goes out as the same meter events as on v1 (`stripe_meters.plan`: same identifiers,
values and times), but many reports' events share one request: `POST {meter_events}/v2/billing/
meter_event_stream`, JSON `{"events": [...]}` of at most STREAM_EVENTS events, ISO-8601 times,
authorised by the token of a meter event session (`POST {api}/v2/billing/meter_event_session`,
valid 15 minutes). The token is kept until SESSION_MARGIN before its `expires_at`; a 401
(`billing_meter_event_session_expired`) drops it, and the request is sent again under a new one.

The stream answers `{}` with no per-event status and validates asynchronously; Stripe dedupes on
`identifier`, so a request whose outcome is unknown (network error, timeout, 5xx, 429) is sent
again whole, with the same identifiers and payloads, and events it already holds are ignored.
Outcomes, per report:
- 2xx: every request carrying one of its events answered: Delivered.
- 429, 409, 5xx, network errors (`stripe_meters.classify`): Retry, the whole report again later.
- 400: one bad event refuses the whole request, and Stripe does not say which. The request is
  split in halves and each half sent again, down to single events, so the events of good reports
  are delivered and only the culprit is refused: a collapsed record (sum, last) parks its
  report (Failed), a count meter's event parks that event (Rejected). A bad event costs about
  2 * log2(100) extra requests; it is a bug on our side or data Stripe refuses, both rare.
- Session creation failing: classified as a v1 call (401 or 403: Failed, the key is wrong).
Stripe's window is checked before sending, as the stream would accept and then drop such an
event: timed in the future, the report waits (Retry until due, as on v1); timed more than 35 days
ago (less a margin), it is refused here (TOO_OLD_EVENT). Values keep v1's 15-digit rule.

Read-back, error reports and meter listing are v1 calls, inherited from StripeMeters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

import stripe
from stripe.params.v2.billing import (
    MeterEventStreamCreateParams,
    MeterEventStreamCreateParamsEvent,
)

from usage_service.domain.reports import Report
from usage_service.providers import outcome, stripe_meters
from usage_service.providers.outcome import Outcome
from usage_service.providers.stripe_meters import Piece, Plan

STREAM_EVENTS = 100  # meter events per stream request (Stripe's limit)
STREAM_CONCURRENCY = 8  # stream requests in flight per adapter (Stripe allows 10k/s live)
SESSION_MARGIN = dt.timedelta(seconds=60)  # a token is renewed this long before it expires
SESSION_FALLBACK = dt.timedelta(minutes=5)  # a token's life when `expires_at` cannot be read
WINDOW_BACK = dt.timedelta(days=35)  # Stripe takes meter events up to 35 days old
WINDOW_MARGIN = dt.timedelta(minutes=10)  # clock skew kept off the 35 days
EXPIRED = "billing_meter_event_session_expired"
TOO_OLD_EVENT = "stripe: timed more than 35 days ago, outside Stripe's meter event window; not sent"


@dataclasses.dataclass(frozen=True)
class _Session:
    token: str = dataclasses.field(repr=False)
    renew_at: dt.datetime


class StripeMeterStream(stripe_meters.StripeMeters):
    """Sends reports through the v2 stream, many reports per request (`send_many`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._session: _Session | None = None
        self._session_lock = asyncio.Lock()
        self._gate = asyncio.Semaphore(STREAM_CONCURRENCY)

    async def send(self, report: Report) -> Outcome:
        (answer,) = await self.send_many([report])
        return answer

    async def send_many(self, reports: Sequence[Report]) -> list[Outcome]:
        """One outcome per report, in order. The reports' meter events go out in requests of at
        most STREAM_EVENTS, STREAM_CONCURRENCY at a time; a report is delivered once every
        request carrying one of its events is."""
        now = dt.datetime.now(dt.UTC)
        oldest = int((now - WINDOW_BACK + WINDOW_MARGIN).timestamp())
        answers: list[Outcome | None] = [None] * len(reports)
        refused: list[dict[str, str]] = [{} for _ in reports]  # count meters: event id -> reason
        items: list[tuple[int, Piece]] = []  # (report index, meter event)
        for i, report in enumerate(reports):
            planned = stripe_meters.plan(report, self._meters, now)
            if not isinstance(planned, Plan):
                answers[i] = planned
                continue
            refused[i].update(planned.rejected)
            late = [p for p in planned.pieces if p.timestamp < oldest]
            if late and not planned.count:
                answers[i] = outcome.Failed(TOO_OLD_EVENT)
                continue
            refused[i].update((p.event_id, TOO_OLD_EVENT) for p in late)
            items += [(i, p) for p in planned.pieces if p.timestamp >= oldest]
        chunks = [items[k : k + STREAM_EVENTS] for k in range(0, len(items), STREAM_EVENTS)]
        results = await asyncio.gather(*(self._send_chunk([p for _, p in c]) for c in chunks))
        retry: dict[int, outcome.Retry] = {}
        failed: dict[int, str] = {}
        for chunk, result in zip(chunks, results, strict=True):
            for (i, piece), answer in zip(chunk, result, strict=True):
                if isinstance(answer, outcome.Retry):
                    retry.setdefault(i, answer)
                elif isinstance(answer, outcome.Failed):
                    if piece.event_id:
                        refused[i][piece.event_id] = answer.reason
                    else:
                        failed.setdefault(i, answer.reason)
        out: list[Outcome] = []
        for i, early in enumerate(answers):
            if early is not None:
                out.append(early)
            elif i in retry:  # sent again whole: Stripe ignores the events it holds
                out.append(retry[i])
            elif i in failed:
                out.append(outcome.Failed(failed[i]))
            elif refused[i]:
                out.append(outcome.Rejected(refused[i]))
            else:
                out.append(outcome.Delivered())
        return out

    async def _send_chunk(self, pieces: list[Piece]) -> list[Outcome]:
        """One outcome per meter event: Delivered, Retry or Failed. A 400 refuses the whole
        request without naming the event: the halves are sent again, down to single events."""
        async with self._gate:
            answer, isolate = await self._post(pieces)
        if isolate and len(pieces) > 1:
            half = len(pieces) // 2
            left, right = await asyncio.gather(
                self._send_chunk(pieces[:half]), self._send_chunk(pieces[half:])
            )
            return left + right
        return [answer] * len(pieces)

    async def _post(self, pieces: list[Piece]) -> tuple[Outcome, bool]:
        """One stream request (again under a new session when the token is refused); the
        outcome, and whether it refused an event of the request (a 400)."""
        params: MeterEventStreamCreateParams = {"events": [_event(p) for p in pieces]}
        for fresh in (False, True):
            token = await self._token()
            if not isinstance(token, str):
                return token, False
            try:
                await self._client.v2.billing.meter_event_stream.create_async(
                    params, {"api_key": token}
                )
            except stripe.StripeError as exc:
                if exc.http_status != 401:
                    return stripe_meters.classify(exc), exc.http_status == 400
                self._drop(token)
                if fresh:  # refused although just made: Stripe's side; try again later
                    return outcome.Retry(f"stripe: a new session's token was refused: {exc}"), False
                continue
            return outcome.Delivered(), False
        raise AssertionError("unreachable")

    async def _token(self) -> str | Outcome:
        """The current session's token, a new session made when there is none or it expires
        within SESSION_MARGIN; the outcome when Stripe does not give one."""
        async with self._session_lock:
            now = dt.datetime.now(dt.UTC)
            if self._session is None or now >= self._session.renew_at:
                try:
                    made = await self._client.v2.billing.meter_event_session.create_async()
                except stripe.StripeError as exc:
                    return stripe_meters.classify(exc)
                self._session = _Session(made.authentication_token, _renew_at(made, now))
            return self._session.token

    def _drop(self, token: str) -> None:
        """Forgets the session of a refused token (unless another request renewed it)."""
        if self._session is not None and self._session.token == token:
            self._session = None


def _renew_at(session: Any, now: dt.datetime) -> dt.datetime:
    try:
        expires = dt.datetime.fromisoformat(str(session.expires_at))
    except (AttributeError, ValueError):
        return now + SESSION_FALLBACK
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=dt.UTC)
    return expires - SESSION_MARGIN


def _event(piece: Piece) -> MeterEventStreamCreateParamsEvent:
    return {
        "event_name": piece.event_name,
        "identifier": piece.identifier,
        "payload": {"stripe_customer_id": piece.customer, "value": str(piece.value)},
        "timestamp": outcome.iso(dt.datetime.fromtimestamp(piece.timestamp, dt.UTC)),
    }
