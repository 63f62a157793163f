"""Stripe Billing Meters (v1 meter events) through the official SDK.

Sum and last/max meters: one meter event per report, carrying the report's collapsed value, with
the report id as both `identifier` and Idempotency-Key. Count meters: one event per usage event,
the event id as identifier. Calls of one report go one at a time: Stripe allows one call in flight
per customer and meter, and the drain keeps one report in flight per customer and meter.
"""

from __future__ import annotations

from collections.abc import Mapping

import stripe

from usage_service import domain
from usage_service.plans import Aggregation, Meter
from usage_service.providers import outcome
from usage_service.providers.config import Endpoint
from usage_service.providers.outcome import Outcome, Report

ALREADY_EXISTS = "already exists with identifier"  # Stripe's answer to a re-sent identifier


class StripeMeters:
    provider = domain.Provider.STRIPE

    def __init__(
        self,
        endpoint: Endpoint,
        meter_events_base: str,
        meters: Mapping[str, Meter],
        timeout: float,
    ) -> None:
        self._http = stripe.HTTPXClient(timeout=timeout)
        self._client = stripe.StripeClient(
            endpoint.api_key,
            base_addresses={"api": endpoint.base_url, "meter_events": meter_events_base},
            http_client=self._http,
            max_network_retries=0,  # the drain owns retries
        )
        self._meters = meters

    async def aclose(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def send(self, report: Report) -> Outcome:
        first = report.events[0]
        meter = self._meters.get(first.meter)
        if meter is None:
            return outcome.Failed(f"meter {first.meter!r} is not in the plans file")
        if not first.provider_customer_id:
            return outcome.Failed("the customer has no Stripe customer id (provider_customer_id)")
        if meter.aggregation is not Aggregation.COUNT:
            latest = max(report.events, key=lambda e: (e.event_time, e.event_id))
            params = _params(meter, first.provider_customer_id, report.value, latest, report)
            return await self._create(params)
        rejected: dict[str, str] = {}
        for event in sorted(report.events, key=lambda e: (e.event_time, e.event_id)):
            params = _params(meter, first.provider_customer_id, event.quantity, event, None)
            answer = await self._create(params)
            if isinstance(answer, outcome.Failed):
                rejected[event.event_id] = answer.reason
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


def _params(
    meter: Meter,
    customer: str,
    value: int,
    event: outcome.ReportEvent,
    report: Report | None,
) -> stripe.params.billing.MeterEventCreateParams:
    return {
        "event_name": meter.stripe.event_name,
        "payload": {"stripe_customer_id": customer, "value": str(value)},
        "identifier": report.report_id if report else event.event_id,
        "timestamp": int(event.event_time.timestamp()),
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
