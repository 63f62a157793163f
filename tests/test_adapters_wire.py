"""Each provider adapter over an httpx.MockTransport, in-process: the request it builds (method,
URL, credentials, body) and the Outcome it answers for a success and for an error."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import types
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import stripe
from fakes import event, report

from usage_service import domain
from usage_service.domain import plans
from usage_service.providers import creem, dodo_payments, outcome, polar
from usage_service.providers.config import Endpoint
from usage_service.providers.lemon_squeezy import JSON_API, LemonSqueezy
from usage_service.providers.stripe_meters import StripeMeters

KEY = "sk_test_wire"
API = "https://api.provider.test"  # never reached: the transport answers
POLAR_CUSTOMER = "3d5e7f90-1a2b-4c3d-8e4f-5a6b7c8d9e0f"


class Wire:
    """A transport that keeps every request and answers each with the next response given."""

    def __init__(self, *answers: httpx.Response) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self._answer)

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answers.pop(0)

    def json(self, i: int = 0) -> Any:
        return json.loads(self.requests[i].content)


def iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.fixture
async def closing() -> AsyncIterator[Callable[[Any], Any]]:
    """Closes every adapter the test makes."""
    made: list[Any] = []

    def keep(adapter: Any) -> Any:
        made.append(adapter)
        return adapter

    yield keep
    for adapter in made:
        await adapter.aclose()


# --- Stripe ---


def stripe_http(wire: Wire) -> stripe.HTTPXClient:
    """The SDK's own httpx client, built over the wire's transport."""
    lib = types.SimpleNamespace(
        AsyncClient=lambda **options: httpx.AsyncClient(transport=wire.transport, **options)
    )
    return stripe.HTTPXClient(timeout=5, _lib=lib)


def stripe_adapter(wire: Wire, meters: plans.Plans) -> StripeMeters:
    return StripeMeters(Endpoint(KEY, API), API, meters.meters, 5.0, stripe_http(wire))


async def test_stripe_sum_report_is_one_meter_event(plans: plans.Plans, closing: Any) -> None:
    stored = {"object": "billing.meter_event", "event_name": "llm_tokens", "livemode": False}
    wire = Wire(httpx.Response(200, json=stored))
    adapter = closing(stripe_adapter(wire, plans))
    r = report(domain.Provider.STRIPE, event(quantity=3), event(quantity=4), value=7)

    assert await adapter.send(r) == outcome.Delivered()

    (sent,) = wire.requests
    assert (sent.method, str(sent.url)) == ("POST", f"{API}/v1/billing/meter_events")
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["idempotency-key"] == r.report_id
    newest = max(e.event_time for e in r.events)
    assert dict(urllib.parse.parse_qsl(sent.content.decode())) == {
        "event_name": "llm_tokens",
        "identifier": r.report_id,
        "payload[stripe_customer_id]": "cus_1",
        "payload[value]": "7",
        "timestamp": str(int(newest.timestamp())),
    }


async def test_stripe_errors_map_to_failed_retry_and_duplicate(
    plans: plans.Plans, closing: Any
) -> None:
    missing = {"error": {"type": "invalid_request_error", "code": "resource_missing"}}
    missing["error"]["message"] = "No such customer: 'cus_1'"
    busy = {"error": {"type": "invalid_request_error", "message": "Too many requests"}}
    twice = {"error": {"type": "invalid_request_error", "message": "An event already exists "}}
    twice["error"]["message"] += "with identifier x"
    wire = Wire(
        httpx.Response(400, json=missing),
        httpx.Response(429, json=busy, headers={"Retry-After": "7"}),
        httpx.Response(400, json=twice),
    )
    adapter = closing(stripe_adapter(wire, plans))
    r = report(domain.Provider.STRIPE, event(quantity=3), value=3)

    assert await adapter.send(r) == outcome.Failed(
        "stripe 400 resource_missing: No such customer: 'cus_1'"
    )
    answer = await adapter.send(r)
    assert isinstance(answer, outcome.Retry) and answer.after == 7.0
    assert "stripe 429" in answer.reason
    assert await adapter.send(r) == outcome.Delivered(duplicate=True)
    assert len(wire.requests) == 3  # one call each: the SDK retries nothing


# --- Polar, Dodo Payments, Creem ---


async def test_polar_posts_the_batch_and_reads_duplicates(plans: plans.Plans, closing: Any) -> None:
    wire = Wire(httpx.Response(200, json={"inserted": 0, "duplicates": 1}))
    adapter = closing(polar.adapter(Endpoint(KEY, API), plans.meters, 5.0, wire.transport))
    e = event(quantity=42, provider_customer_id=POLAR_CUSTOMER, region="eu")

    assert await adapter.send(report(domain.Provider.POLAR, e)) == outcome.Delivered()

    (sent,) = wire.requests
    assert (sent.method, str(sent.url)) == ("POST", f"{API}/v1/events/ingest")
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["polar-version"] == polar.VERSION
    assert wire.json() == {
        "events": [
            {
                "name": "tokens",
                "external_id": e.event_id,
                "customer_id": POLAR_CUSTOMER,
                "timestamp": iso(e.event_time),
                "metadata": {"value": 42, "region": "eu"},
            }
        ]
    }


async def test_polar_422_rejects_the_event_it_names(plans: plans.Plans, closing: Any) -> None:
    detail = [{"loc": ["body", "events", 1, "customer_id"], "msg": "no such customer"}]
    wire = Wire(
        httpx.Response(422, json={"detail": detail}),
        httpx.Response(200, json={"inserted": 1}),
    )
    adapter = closing(polar.adapter(Endpoint(KEY, API), plans.meters, 5.0, wire.transport))
    good, bad = (event(provider_customer_id=POLAR_CUSTOMER) for _ in range(2))

    answer = await adapter.send(report(domain.Provider.POLAR, good, bad))

    assert answer == outcome.Rejected({bad.event_id: "polar 422: customer_id: no such customer"})
    resent = [e["external_id"] for e in wire.json(1)["events"]]
    assert resent == [good.event_id]  # the rest goes again, without the named event


async def test_dodo_posts_the_batch(plans: plans.Plans, closing: Any) -> None:
    wire = Wire(httpx.Response(200, json={"ingested_count": 1}))
    adapter = closing(dodo_payments.adapter(Endpoint(KEY, API), plans.meters, 5.0, wire.transport))
    e = event(quantity=5, provider_customer_id="dodo_1")

    assert await adapter.send(report(domain.Provider.DODO_PAYMENTS, e)) == outcome.Delivered()

    (sent,) = wire.requests
    assert (sent.method, str(sent.url)) == ("POST", f"{API}/events/ingest")
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert wire.json() == {
        "events": [
            {
                "event_id": e.event_id,
                "customer_id": "dodo_1",
                "event_name": "tokens",
                "timestamp": iso(e.event_time),
                "metadata": {"value": 5},
            }
        ]
    }


async def test_dodo_should_retry_headers_decide(plans: plans.Plans, closing: Any) -> None:
    body = {"code": "RATE_LIMITED", "message": "slow down"}
    wire = Wire(
        httpx.Response(500, json=body, headers={"x-should-retry": "false"}),
        httpx.Response(
            400, json=body, headers={"x-should-retry": "true", "retry-after-ms": "1500"}
        ),
    )
    adapter = closing(dodo_payments.adapter(Endpoint(KEY, API), plans.meters, 5.0, wire.transport))
    r = report(domain.Provider.DODO_PAYMENTS, event(provider_customer_id="dodo_1"))

    assert await adapter.send(r) == outcome.Failed("dodo_payments 500: RATE_LIMITED: slow down")
    assert await adapter.send(r) == outcome.Retry("dodo_payments 400: RATE_LIMITED: slow down", 1.5)


async def test_creem_posts_the_batch_with_its_key_header(plans: plans.Plans, closing: Any) -> None:
    e = event(quantity=9, provider_customer_id="creem_1")
    accepted = {"accepted": 1, "event_ids": [e.event_id], "warnings": []}
    wire = Wire(httpx.Response(202, json=accepted))
    adapter = closing(creem.adapter(Endpoint(KEY, API), plans.meters, 5.0, wire.transport))

    assert await adapter.send(report(domain.Provider.CREEM, e)) == outcome.Delivered()

    (sent,) = wire.requests
    assert (sent.method, str(sent.url)) == ("POST", f"{API}/v1/events/ingest")
    assert sent.headers["x-api-key"] == KEY and "authorization" not in sent.headers
    assert wire.json() == {
        "events": [
            {
                "name": "tokens",
                "customer_id": "creem_1",
                "event_id": e.event_id,
                "timestamp": iso(e.event_time),
                "properties": {"value": 9},
            }
        ]
    }


async def test_creem_errors_and_warnings_reject_the_named_events(
    plans: plans.Plans, closing: Any
) -> None:
    first, second = (event(provider_customer_id="creem_1") for _ in range(2))
    error = {"code": "invalid_customer", "message": "unknown", "param": "events[0].customer_id"}
    warned = {
        "accepted": 1,
        "event_ids": [second.event_id],
        "warnings": [{"index": 0, "code": "no_meter", "message": "matches no meter"}],
    }
    wire = Wire(httpx.Response(422, json={"error": error}), httpx.Response(202, json=warned))
    adapter = closing(creem.adapter(Endpoint(KEY, API), plans.meters, 5.0, wire.transport))

    answer = await adapter.send(report(domain.Provider.CREEM, first, second))

    assert answer == outcome.Rejected(
        {
            first.event_id: "creem 422: events[0].customer_id: invalid_customer: unknown",
            second.event_id: "creem: no_meter: matches no meter",  # stored, never billed
        }
    )


async def test_a_network_failure_is_a_retry(plans: plans.Plans, closing: Any) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    transport = httpx.MockTransport(refuse)
    adapter = closing(polar.adapter(Endpoint(KEY, API), plans.meters, 5.0, transport))
    r = report(domain.Provider.POLAR, event(provider_customer_id=POLAR_CUSTOMER))
    assert await adapter.send(r) == outcome.Retry("polar: ConnectError: connection refused")


# --- Lemon Squeezy ---


def usage_answer(quantity: int, start: dt.datetime, end: dt.datetime) -> httpx.Response:
    meta = {"period_start": iso(start), "period_end": iso(end), "quantity": quantity}
    return httpx.Response(200, json={"jsonapi": {"version": "1.0"}, "meta": meta})


async def test_lemon_squeezy_reads_usage_checkpoints_then_increments(
    plans: plans.Plans, closing: Any
) -> None:
    now = dt.datetime.now(dt.UTC)
    wire = Wire(
        usage_answer(10, now - dt.timedelta(days=1), now + dt.timedelta(days=29)),
        httpx.Response(201, json={"data": {"type": "usage-records", "id": "1"}}),
    )
    adapter = closing(
        LemonSqueezy(Endpoint(KEY, API), plans.meters, 5.0, settle=1.0, transport=wire.transport)
    )
    r = report(domain.Provider.LEMON_SQUEEZY, event(subscription_item="si_1"), value=7)

    first = await adapter.send(r)
    assert isinstance(first, outcome.Checkpoint) and first.state["baseline"] == 10
    read = wire.requests[0]
    assert (read.method, str(read.url)) == (
        "GET",
        f"{API}/v1/subscription-items/si_1/current-usage",
    )
    assert read.headers["authorization"] == f"Bearer {KEY}"
    assert read.headers["accept"] == JSON_API

    assert await adapter.send(dataclasses.replace(r, checkpoint=first.state)) == (
        outcome.Delivered()
    )
    post = wire.requests[1]
    assert (post.method, str(post.url)) == ("POST", f"{API}/v1/usage-records")
    assert post.headers["content-type"] == JSON_API
    assert wire.json(1) == {
        "data": {
            "type": "usage-records",
            "attributes": {"quantity": 7, "action": "increment"},
            "relationships": {
                "subscription-item": {"data": {"type": "subscription-items", "id": "si_1"}}
            },
        }
    }


async def test_lemon_squeezy_errors_fail_or_retry(plans: plans.Plans, closing: Any) -> None:
    wire = Wire(
        httpx.Response(404, json={"errors": [{"status": "404", "detail": "Not found."}]}),
        httpx.Response(503, text="busy", headers={"Retry-After": "30"}),
    )
    adapter = closing(
        LemonSqueezy(Endpoint(KEY, API), plans.meters, 5.0, settle=1.0, transport=wire.transport)
    )
    r = report(domain.Provider.LEMON_SQUEEZY, event(subscription_item="si_1"), value=7)

    assert await adapter.send(r) == outcome.Failed("lemon squeezy 404: Not found.")
    assert await adapter.send(r) == outcome.Retry("lemon squeezy 503: busy", 30.0)
    assert [q.method for q in wire.requests] == ["GET", "GET"]  # nothing posted
