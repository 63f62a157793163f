"""Stripe Billing Meters (v1 meter events) through the official SDK.

Sum meters: one meter event per report carrying the report's summed value, with the report id as
both `identifier` and Idempotency-Key. Stripe takes at most 15 digits per value, so a larger sum
goes out as several events of at most 15 digits each, `<report id>-1`, `<report id>-2`, ...
(at most MAX_PIECES; beyond that the report is parked). Count meters: one event per usage event,
the event id as identifier. Calls of one report go one at a time: Stripe allows one call in flight
per customer and meter, and the drain keeps one report in flight per customer and meter.

Max and last meters (Stripe formula `last`): each report carries the period's figure, timed so
that it is the latest event Stripe holds for the period: the time the report was built, clamped
into the period (see `build_reports` in drain.py). That time is committed with the report
(`stated_at`), so every re-send carries exactly the same parameters, as an Idempotency-Key
requires. Two reports can still share a timestamp (both
built within one second, or both for a period that has ended: its last second); Stripe does not
document how `last` breaks such ties, and describes `last` as billing "the final meter event
received in a billing period": the later report, which carries the newer figure, is received last.

Read-back (`held`): the meter id comes from `GET /v1/billing/meters`, listed once and kept for the
process's life (listed again when an event name has no active meter: one may have been created
since); the meter for an event name is its active meter (an inactive meter takes no events, so
ours went to the active one). The figure is `aggregated_value` of
`GET /v1/billing/meters/{id}/event_summaries` for [start, end), which Stripe answers only for
minute-aligned bounds; other bounds cannot be told. Meter errors Stripe finds after accepting an
event arrive as `v1.billing.meter.error_report_triggered` events of the v2 events API
(`error_reports`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Mapping

import stripe
from stripe.events import V1BillingMeterErrorReportTriggeredEvent
from stripe.params.v2.core import EventListParams

from usage_service import domain
from usage_service.domain.plans import Aggregation, Meter
from usage_service.domain.reports import Report
from usage_service.providers import outcome
from usage_service.providers.config import Endpoint
from usage_service.providers.outcome import Outcome
from usage_service.providers.readback import Held, Query

ALREADY_EXISTS = "already exists with identifier"  # Stripe's answer to a re-sent identifier
MAX_VALUE = 999_999_999_999_999  # Stripe refuses a meter event value of more than 15 digits
COUNT_REPORT = 200  # events per report for count meters (one call each)
RESEND_WINDOW = dt.timedelta(hours=23)  # Stripe dedupes identifiers for at least 24 h
TOO_OLD = (
    "stripe: first sent over 23 h ago and still unsettled; Stripe's identifier dedupe window "
    "may be over, so it is not re-sent automatically: check the meter's events, then requeue"
)
MAX_PIECES = 10  # meter events one sum report may be split into; beyond: parked
PAGE = 100  # the most objects a Stripe list answers
ERROR_REPORT = "v1.billing.meter.error_report_triggered"
EXACT_FLOAT = 2**53  # a float at or beyond this may not be the whole number Stripe added up
FORMULAS = {  # the Stripe meter formula each aggregation of the plans file is reported with
    Aggregation.SUM: "sum",
    Aggregation.COUNT: "count",
    Aggregation.MAX: "last",
    Aggregation.LAST: "last",
}


def window(start: dt.datetime, end: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The whole minutes inside the period [start, end) (the period itself when it holds
    none): Stripe summarises by the minute, so sum, max and last reports are timed inside them
    and a summary of them holds the whole period."""
    first = math.ceil(start.timestamp() / 60) * 60
    last = math.floor(end.timestamp() / 60) * 60
    if first >= last:
        return start, end
    return dt.datetime.fromtimestamp(first, dt.UTC), dt.datetime.fromtimestamp(last, dt.UTC)


def stated(when: dt.datetime, start: dt.datetime, end: dt.datetime) -> dt.datetime:
    """The meter-event time (whole seconds) of a report built for the period [start, end):
    `when` clamped into the period's window."""
    first, last = window(start, end)
    latest = math.ceil(last.timestamp()) - 1  # the window's last whole second
    second = max(math.ceil(first.timestamp()), min(math.floor(when.timestamp()), latest))
    return dt.datetime.fromtimestamp(second, dt.UTC)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One meter event a report goes out as, the same on every send of the report."""

    identifier: str  # the report id (`-1`, `-2`, ... for a split sum), or a count event's id
    event_name: str
    customer: str  # the Stripe customer id
    value: int
    timestamp: int  # unix seconds
    event_id: str = ""  # count meters: the usage event it carries; "" for a collapsed record


@dataclasses.dataclass(frozen=True)
class Plan:
    """The meter events of a report, in sending order. Count meters: one per usage event, and
    `rejected` the events refused before any send (event id -> reason)."""

    pieces: tuple[Piece, ...]
    count: bool
    rejected: Mapping[str, str] = dataclasses.field(default_factory=dict)


def plan(report: Report, meters: Mapping[str, Meter], now: dt.datetime) -> Plan | Outcome:
    """The meter events a report is sent as (on v1 and on the v2 stream alike, so the
    identifiers never change), or the outcome when it cannot be sent (yet)."""
    first = report.events[0]
    meter = meters.get(first.meter)
    if meter is None:
        return outcome.Failed(f"meter {first.meter!r} is not in the plans file")
    customer = first.provider_customer_id
    if not customer:
        return outcome.Failed("the customer has no Stripe customer id (provider_customer_id)")
    newest = max(e.event_time for e in report.events)
    ahead = (newest - now).total_seconds()
    if ahead > 0:  # a time ahead of Stripe's clock is refused for good: send it once due
        return outcome.Retry("stripe: an event is timed in the future", ahead + 1.0)
    name = meter.stripe.event_name
    if meter.aggregation is Aggregation.COUNT:
        rejected: dict[str, str] = {}
        each = []
        for event in sorted(report.events, key=lambda e: (e.event_time, e.event_id)):
            if event.quantity > MAX_VALUE:
                rejected[event.event_id] = f"stripe: value {event.quantity} has more than 15 digits"
                continue
            stamp = int(event.event_time.timestamp())
            each.append(
                Piece(event.event_id, name, customer, event.quantity, stamp, event.event_id)
            )
        return Plan(tuple(each), True, rejected)
    timestamp = int((report.stated_at or newest).timestamp())
    pieces = split(report.value) if meter.aggregation is Aggregation.SUM else [report.value]
    if pieces[0] > MAX_VALUE:
        return outcome.Failed(
            f"stripe: value {report.value} has more than 15 digits: a meter event cannot "
            f"carry it, and a {meter.aggregation.value} figure cannot be split"
        )
    if len(pieces) > MAX_PIECES:
        return outcome.Failed(
            f"stripe: sum {report.value} would take {len(pieces)} meter events of at most "
            f"15 digits (the most sent for one report is {MAX_PIECES}); check its events"
        )
    return Plan(
        tuple(
            Piece(
                report.report_id if len(pieces) == 1 else f"{report.report_id}-{k}",
                name,
                customer,
                value,
                timestamp,
            )
            for k, value in enumerate(pieces, 1)
        ),
        False,
    )


@dataclasses.dataclass(frozen=True)
class StripeMeter:
    meter_id: str
    event_name: str
    formula: str
    active: bool


@dataclasses.dataclass(frozen=True)
class MeterError:
    """One error Stripe found in meter events after accepting them. Stripe names only a sample
    of the events of each kind of error (`count` says how many there were in its window); the
    event's customer is not in the report: `identifier` is our report or event id."""

    event_id: str  # the Stripe event carrying the report
    meter_id: str
    event_name: str  # "" when the meter is not among the meters listed
    code: str  # e.g. meter_event_customer_not_found
    count: int  # errors of this code in the report's window
    identifier: str  # the meter event's identifier; "" when Stripe gave no sample
    message: str
    created: dt.datetime


class StripeMeters:
    provider = domain.Provider.STRIPE
    reporting = outcome.Reporting(
        lanes=True,
        count_batch=COUNT_REPORT,
        max_value=MAX_VALUE,
        stated=stated,
        resend_window=RESEND_WINDOW,
        too_old=TOO_OLD,
    )

    def __init__(
        self,
        endpoint: Endpoint,
        meter_events_base: str,
        meters: Mapping[str, Meter],
        timeout: float,
        http_client: stripe.HTTPXClient | None = None,  # tests: one over an httpx.MockTransport
    ) -> None:
        self._http = http_client or stripe.HTTPXClient(timeout=timeout)
        self._client = stripe.StripeClient(
            endpoint.api_key,
            base_addresses={"api": endpoint.base_url, "meter_events": meter_events_base},
            http_client=self._http,
            max_network_retries=0,  # the drain owns retries
        )
        self._meters = meters
        self._stripe_meters: dict[str, StripeMeter] | None = None  # by meter id

    async def aclose(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def send(self, report: Report) -> Outcome:
        planned = plan(report, self._meters, dt.datetime.now(dt.UTC))
        if not isinstance(planned, Plan):
            return planned
        if planned.count:
            return await self._send_each(planned)
        duplicate = True
        for piece in planned.pieces:
            answer = await self._create(_params(piece))
            if not isinstance(answer, outcome.Delivered):
                return answer  # a retry sends the same pieces again
            duplicate = duplicate and answer.duplicate
        return outcome.Delivered(duplicate)

    async def _send_each(self, planned: Plan) -> Outcome:
        rejected = dict(planned.rejected)
        for piece in planned.pieces:
            answer = await self._create(_params(piece))
            if isinstance(answer, outcome.Failed):
                rejected[piece.event_id] = answer.reason
            elif not isinstance(answer, outcome.Delivered):
                return answer
        return outcome.Rejected(rejected) if rejected else outcome.Delivered()

    async def _create(self, params: stripe.params.billing.MeterEventCreateParams) -> Outcome:
        try:
            await self._client.v1.billing.meter_events.create_async(
                params, {"idempotency_key": params["identifier"]}
            )
        except stripe.StripeError as exc:
            return classify(exc)
        return outcome.Delivered()

    async def held(self, query: Query) -> Held:
        if not query.provider_customer_id:
            return Held(None, "the customer has no Stripe customer id (provider_customer_id)")
        start, end = window(query.start, query.end)
        if (start, end) != (
            query.start,
            query.end,
        ) and query.meter.aggregation is Aggregation.COUNT:
            return Held(
                None,
                "period bounds are not whole minutes, Stripe summarises by the minute, and a "
                "count meter's events keep their own times",
            )
        event_name = query.meter.stripe.event_name
        try:
            active = await self._active(event_name)
            if not active:
                return Held(None, f"no active Stripe meter with event_name {event_name!r}")
            if len(active) > 1:
                ids = ", ".join(m.meter_id for m in active)
                return Held(
                    None, f"several active Stripe meters with event_name {event_name!r}: {ids}"
                )
            meter = active[0]
            want = FORMULAS[query.meter.aggregation]
            if meter.formula != want:
                return Held(
                    None,
                    f"Stripe meter {meter.meter_id} aggregates by {meter.formula}, "
                    f"the plans file by {query.meter.aggregation.value} (Stripe: {want})",
                )
            params: stripe.params.billing.MeterEventSummaryListParams = {
                "customer": query.provider_customer_id,
                "start_time": int(start.timestamp()),
                "end_time": int(end.timestamp()),
                "limit": PAGE,
            }
            page = await self._client.v1.billing.meters.event_summaries.list_async(
                meter.meter_id, params
            )
            values = [s.aggregated_value async for s in page.auto_paging_iter()]
        except stripe.StripeError as exc:
            return Held(None, _reason(exc))
        except (AttributeError, KeyError) as exc:  # an answer without a field the SDK names
            return Held(None, f"stripe: unexpected answer: {exc!r}")
        return _figure(values, meter.formula)

    async def error_reports(self, since: dt.datetime) -> list[MeterError]:
        """The meter errors Stripe reported from `since` on (Stripe keeps events 30 days).
        Raises stripe.StripeError when Stripe cannot be read."""
        params: EventListParams = {
            "types": [ERROR_REPORT],
            "created": {"gte": _rfc3339(since)},
        }
        page = await self._client.v2.core.events.list_async(params)
        meters = await self._meters_by_id()
        out: list[MeterError] = []
        async for listed in page.auto_paging_iter():
            event = listed
            if "data" not in event:  # listed thin: the event itself carries its data
                event = await self._client.v2.core.events.retrieve_async(listed.id)
            if not isinstance(event, V1BillingMeterErrorReportTriggeredEvent):
                continue
            meter_id = event.related_object.id
            known = meters.get(meter_id)
            created = dt.datetime.fromisoformat(event.created)
            for kind in event.data.reason.error_types:
                samples = [(s.request.identifier, s.error_message) for s in kind.sample_errors]
                for identifier, message in samples or [("", "")]:
                    out.append(
                        MeterError(
                            event.id,
                            meter_id,
                            known.event_name if known else "",
                            kind.code,
                            kind.error_count,
                            identifier,
                            message,
                            created,
                        )
                    )
        return out

    async def _active(self, event_name: str) -> list[StripeMeter]:
        """The active meters of an event name; the meters are listed again when there is none
        (one may have been created since)."""
        for fresh in (False, True):
            meters = await self._meters_by_id(fresh)
            active = [m for m in meters.values() if m.active and m.event_name == event_name]
            if active:
                break
        return active

    async def _meters_by_id(self, fresh: bool = False) -> dict[str, StripeMeter]:
        """Every Stripe meter of the account, listed once and kept (again when `fresh`)."""
        if self._stripe_meters is None or fresh:
            page = await self._client.v1.billing.meters.list_async({"limit": PAGE})
            self._stripe_meters = {
                m.id: StripeMeter(
                    m.id, m.event_name, m.default_aggregation.formula, m.status == "active"
                )
                async for m in page.auto_paging_iter()
            }
        return self._stripe_meters


def _rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _figure(values: list[float], formula: str) -> Held:
    """The period's figure from the summaries Stripe answered (one for the whole period, as no
    grouping window is asked; none when the customer has no events in it)."""
    if len(values) > 1 and formula == "last":
        return Held(None, f"stripe: {len(values)} summaries of a last meter for one period")
    total = 0
    for value in values:
        if isinstance(value, float) and not (value.is_integer() and abs(value) < EXACT_FLOAT):
            return Held(None, f"stripe: aggregated_value {value!r} is not an exact whole number")
        total += int(value)
    return Held(total)


def _reason(exc: stripe.StripeError) -> str:
    message = exc.user_message or str(exc) or type(exc).__name__
    if isinstance(exc, stripe.APIConnectionError) or exc.http_status is None:
        return f"stripe: network error: {message}"
    return f"stripe: {exc.http_status} {exc.code or type(exc).__name__}: {message}"


def split(value: int) -> list[int]:
    """A sum as meter event values of at most 15 digits each (one piece when it fits)."""
    if value <= MAX_VALUE:
        return [value]
    full, rest = divmod(value, MAX_VALUE)
    return [MAX_VALUE] * full + ([rest] if rest else [])


def last_timestamp(now: dt.datetime, start: dt.datetime, end: dt.datetime) -> int:
    """The meter-event timestamp of a max / last report built at `now` for the period
    [start, end): now, clamped into the period's window."""
    return int(stated(now, start, end).timestamp())


def _params(piece: Piece) -> stripe.params.billing.MeterEventCreateParams:
    return {
        "event_name": piece.event_name,
        "payload": {"stripe_customer_id": piece.customer, "value": str(piece.value)},
        "identifier": piece.identifier,
        "timestamp": piece.timestamp,
    }


def classify(exc: stripe.StripeError) -> Outcome:
    """Every Stripe answer other than 2xx, mapped once."""
    message = exc.user_message or str(exc) or type(exc).__name__
    if isinstance(exc, stripe.APIConnectionError) or exc.http_status is None:
        return outcome.Retry(f"stripe: network error: {message}")
    status = exc.http_status
    headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
    if ALREADY_EXISTS in message.lower():
        return outcome.Delivered(duplicate=True)
    reason = f"stripe {status} {exc.code or type(exc).__name__}: {message}"
    if isinstance(exc, stripe.IdempotencyError):
        return outcome.Failed(reason)
    should_retry = headers.get("stripe-should-retry", "")
    if should_retry == "true" or (outcome.retryable(status) and should_retry != "false"):
        return outcome.Retry(reason, outcome.retry_after(headers))
    return outcome.Failed(reason)
