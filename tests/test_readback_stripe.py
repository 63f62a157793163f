"""Stripe's read-back against the fake Stripe over HTTP: the figure a meter's event summary
holds for a customer and period, the drift it can show, what cannot be told, and Stripe's
asynchronous meter error reports."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fakes import event, report
from fakes.base import Fault
from fakes.stripe import KEY, FakeStripe

from usage_service import domain
from usage_service.domain import plans
from usage_service.domain.plans import ProviderNaming
from usage_service.domain.reports import ReportEvent
from usage_service.providers import outcome
from usage_service.providers.config import Endpoint
from usage_service.providers.readback import Held, Query
from usage_service.providers.stripe_meters import MeterError, StripeMeters

pytestmark = pytest.mark.slow  # over HTTP against the fake providers, timeouts included

STRIPE = domain.Provider.STRIPE


def period() -> tuple[dt.datetime, dt.datetime]:
    """Whole minutes, from 30 minutes back to the end of the current minute."""
    minute = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    return minute - dt.timedelta(minutes=30), minute + dt.timedelta(minutes=1)


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    server = FakeStripe().start()
    yield server
    server.stop()


@pytest.fixture
async def adapter(fake: FakeStripe, plans: plans.Plans) -> AsyncIterator[StripeMeters]:
    a = StripeMeters(Endpoint(KEY, fake.url), fake.url, plans.meters, timeout=0.5)
    yield a
    await a.aclose()


def query(
    meter: plans.Meter,
    customer: str = "cus_1",
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
) -> Query:
    low, high = period()
    return Query("c1", customer, "", meter, start or low, end or high, ())


async def send(adapter: StripeMeters, *events: ReportEvent) -> str:
    """One report of the events (value: their sum, count or latest) through the adapter."""
    r = report(STRIPE, *events, value=sum(e.quantity for e in events))
    if events[0].meter in ("storage", "seats"):
        r = dataclasses.replace(r, value=max(events, key=lambda e: e.event_time).quantity)
    assert await adapter.send(r) == outcome.Delivered()
    return r.report_id


def reads(fake: FakeStripe, path: str) -> int:
    return sum(1 for c in fake.calls if c.method == "GET" and c.path == path)


async def test_read_back_equals_what_was_sent_for_sum_count_and_last(
    fake: FakeStripe, adapter: StripeMeters, plans: plans.Plans
) -> None:
    now = dt.datetime.now(dt.UTC)
    early = period()[0] - dt.timedelta(minutes=1)  # before the period: not in its figure
    await send(adapter, event(quantity=3, when=now - dt.timedelta(minutes=2)), event(quantity=4))
    await send(adapter, event(quantity=100, when=early))
    await send(adapter, event(quantity=50, provider_customer_id="cus_s"))  # another customer
    await send(adapter, *(event(meter="calls", quantity=1) for _ in range(3)))
    await send(adapter, event(meter="calls", when=early))
    await send(adapter, event(meter="storage", quantity=50, when=now - dt.timedelta(minutes=3)))
    await send(adapter, event(meter="storage", quantity=20, when=now - dt.timedelta(minutes=1)))
    await send(adapter, event(meter="storage", quantity=90, when=early))
    await send(adapter, event(meter="seats", quantity=4))

    assert await adapter.held(query(plans.meters["tokens"])) == Held(7)
    assert await adapter.held(query(plans.meters["tokens"], "cus_s")) == Held(50)
    assert await adapter.held(query(plans.meters["calls"])) == Held(3)
    assert await adapter.held(query(plans.meters["storage"])) == Held(20)  # the latest value
    assert await adapter.held(query(plans.meters["seats"])) == Held(4)
    assert await adapter.held(query(plans.meters["seats"], "cus_s")) == Held(0)  # no events
    assert reads(fake, "/v1/billing/meters") == 1  # the meters are listed once
    assert fake.violations == []


async def test_drift_shows_in_the_figure_read_back(
    fake: FakeStripe, adapter: StripeMeters, plans: plans.Plans
) -> None:
    tokens, calls = plans.meters["tokens"], plans.meters["calls"]
    one, two, four = [await send(adapter, event(quantity=q)) for q in (1, 2, 4)]
    assert await adapter.held(query(tokens)) == Held(7)
    fake.drop(one)
    assert await adapter.held(query(tokens)) == Held(6)
    fake.double(four)
    assert await adapter.held(query(tokens)) == Held(10)

    fake.lag()
    await send(adapter, event(quantity=8))
    fake.drop(two)
    assert await adapter.held(query(tokens)) == Held(10)  # as it was when the lag began
    fake.catch_up()
    assert await adapter.held(query(tokens)) == Held(16)  # 2 dropped, 4 doubled, 8 added

    counted = event(meter="calls")
    await send(adapter, counted, event(meter="calls"))
    fake.double(counted.event_id)
    assert await adapter.held(query(calls)) == Held(3)
    assert fake.violations == []


async def test_a_count_meter_over_a_period_not_in_whole_minutes_cannot_be_told(
    fake: FakeStripe, adapter: StripeMeters, plans: plans.Plans
) -> None:
    """A count meter's events keep their own times, which may fall in a part-minute Stripe
    cannot summarise; sum, max and last reports are timed inside the whole minutes."""
    calls = plans.meters["calls"]
    low, high = period()
    for start, end in ((low + dt.timedelta(seconds=1), high), (low, high - dt.timedelta(0, 0.5))):
        held = await adapter.held(query(calls, start=start, end=end))
        assert held.value is None and "whole minutes" in held.why
    assert fake.calls == []
    held = await adapter.held(query(plans.meters["tokens"], start=low + dt.timedelta(seconds=1)))
    assert held.value == 0
    assert [c for c in fake.calls if "event_summaries" in c.path]  # read over whole minutes


async def test_a_customer_without_a_stripe_id_cannot_be_told(
    fake: FakeStripe, adapter: StripeMeters, plans: plans.Plans
) -> None:
    held = await adapter.held(query(plans.meters["tokens"], customer=""))
    assert held.value is None and "Stripe customer id" in held.why
    assert fake.calls == []


async def test_a_customer_stripe_does_not_know_cannot_be_told(
    fake: FakeStripe, adapter: StripeMeters, plans: plans.Plans
) -> None:
    held = await adapter.held(query(plans.meters["tokens"], customer="cus_gone"))
    assert held.value is None
    assert held.why.startswith("stripe: 404 resource_missing") and "cus_gone" in held.why
    assert fake.violations == []


async def test_a_meter_without_an_active_stripe_meter_cannot_be_told(
    fake: FakeStripe, adapter: StripeMeters, plans: plans.Plans
) -> None:
    fake.add_meter("archived", "sum", status="inactive")
    for name in ("nope", "archived"):
        meter = dataclasses.replace(plans.meters["tokens"], stripe=ProviderNaming(event_name=name))
        held = await adapter.held(query(meter))
        assert held == Held(None, f"no active Stripe meter with event_name {name!r}")
    assert reads(fake, "/v1/billing/meters") == 3  # listed again on each miss
    fake.add_meter("archived", "sum")  # an active meter of the name, created since
    assert await adapter.held(query(meter)) == Held(0)
    assert fake.violations == []


async def test_an_inactive_meter_of_the_same_name_is_passed_over(
    plans: plans.Plans,
) -> None:
    fake = FakeStripe({}).start()
    try:
        fake.add_meter("llm_tokens", "sum", status="inactive")
        fake.add_meter("llm_tokens", "sum")
        a = StripeMeters(Endpoint(KEY, fake.url), fake.url, plans.meters, timeout=0.5)
        await send(a, event(quantity=5))
        assert await a.held(query(plans.meters["tokens"])) == Held(5)
        fake.add_meter("calls", "count")
        fake.add_meter("calls", "count")
        b = StripeMeters(Endpoint(KEY, fake.url), fake.url, plans.meters, timeout=0.5)
        held = await b.held(query(plans.meters["calls"]))
        assert held.value is None and "several active Stripe meters" in held.why
        await a.aclose()
        await b.aclose()
        assert fake.violations == []
    finally:
        fake.stop()


async def test_a_stripe_meter_with_another_formula_cannot_be_told(plans: plans.Plans) -> None:
    fake = FakeStripe({"llm_tokens": "count"}).start()
    try:
        a = StripeMeters(Endpoint(KEY, fake.url), fake.url, plans.meters, timeout=0.5)
        held = await a.held(query(plans.meters["tokens"]))
        await a.aclose()
        assert held.value is None and "aggregates by count" in held.why
    finally:
        fake.stop()


async def test_the_meter_list_is_read_page_by_page_once(
    fake: FakeStripe, adapter: StripeMeters, plans: plans.Plans
) -> None:
    fake.page_size = 1
    await send(adapter, event(meter="seats", quantity=2))
    for _ in range(2):
        assert await adapter.held(query(plans.meters["seats"])) == Held(2)  # the last meter
    assert reads(fake, "/v1/billing/meters") == len(fake.meters)
    assert fake.violations == []


@pytest.mark.parametrize(
    ("fault", "why"),
    [
        (
            Fault("status", 500, body={"error": {"type": "api_error", "message": "boom"}}),
            "stripe: 500 APIError: boom",
        ),
        (Fault("hang"), "stripe: network error"),
        (Fault("drop"), "stripe: network error"),
    ],
)
async def test_stripe_errors_cannot_be_told_and_leave_nothing_behind(
    fake: FakeStripe, adapter: StripeMeters, plans: plans.Plans, fault: Fault, why: str
) -> None:
    tokens = plans.meters["tokens"]
    await send(adapter, event(quantity=3))
    for route in ("GET /v1/billing/meters", "GET /v1/billing/meters/"):  # listing, summaries
        fake.inject(dataclasses.replace(fault, route=route))
        held = await adapter.held(query(tokens))
        assert held.value is None and held.why.startswith(why), held
        fake.release()  # a held request lets go
    assert await adapter.held(query(tokens)) == Held(3)  # nothing failed is kept


async def test_a_figure_that_is_not_a_whole_number_cannot_be_told(
    fake: FakeStripe, adapter: StripeMeters, plans: plans.Plans
) -> None:
    tokens = plans.meters["tokens"]
    assert await adapter.held(query(tokens)) == Held(0)  # the meters are listed
    for value in (2.5, 2.0**60):
        summary = {
            "id": "mtrsum_1",
            "object": "billing.meter_event_summary",
            "aggregated_value": value,
            "start_time": int(period()[0].timestamp()),
            "end_time": int(period()[1].timestamp()),
            "livemode": False,
            "meter": fake.meter_id("llm_tokens"),
        }
        body = {"object": "list", "data": [summary], "has_more": False, "url": "/v1/x"}
        fake.inject(Fault("status", 200, body=body, route="GET /v1/billing/meters/"))
        held = await adapter.held(query(tokens))
        assert held.value is None and "not an exact whole number" in held.why
    del summary["aggregated_value"]
    fake.inject(Fault("status", 200, body=body, route="GET /v1/billing/meters/"))
    held = await adapter.held(query(tokens))
    assert held.value is None and "unexpected answer" in held.why


@pytest.mark.parametrize("thin", [False, True])
async def test_meter_error_reports_are_read_back(
    fake: FakeStripe, adapter: StripeMeters, thin: bool
) -> None:
    sent = await send(adapter, event(quantity=3))
    counted = event(meter="calls")
    await send(adapter, counted)
    since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    fake.report_error(sent, "old_error", "before since", created=since - dt.timedelta(days=1))
    first = fake.report_error(sent, "meter_event_customer_not_found", "No customer cus_1")
    second = fake.report_error(counted.event_id, "timestamp_too_far_in_past", "Too old")
    fake.page_size = 1  # one event a page
    fake.thin = thin  # listed without data: each is fetched

    errors = await adapter.error_reports(since)

    assert [e.event_id for e in errors] == [second, first]  # newest first, as Stripe lists
    assert all(since <= e.created <= dt.datetime.now(dt.UTC) for e in errors)
    assert [dataclasses.replace(e, created=since) for e in errors] == [
        MeterError(
            second,
            fake.meter_id("calls"),
            "calls",
            "timestamp_too_far_in_past",
            1,
            counted.event_id,
            "Too old",
            since,
        ),
        MeterError(
            first,
            fake.meter_id("llm_tokens"),
            "llm_tokens",
            "meter_event_customer_not_found",
            1,
            sent,
            "No customer cus_1",
            since,
        ),
    ]
    assert reads(fake, "/v2/core/events") == 2
    assert sum(c.path.startswith("/v2/core/events/") for c in fake.calls) == (2 if thin else 0)
    assert fake.violations == []


def get(fake: FakeStripe, path: str, params: dict[str, str], **headers: str) -> httpx.Response:
    sent = {
        "Authorization": f"Bearer {KEY}",
        "Stripe-Version": "2026-10-28.endive",
        "User-Agent": f"Stripe/{path[1:3]} PythonBindings/16.1.0",
        **headers,
    }
    return httpx.get(f"{fake.url}{path}", params=params, headers=sent)


def test_fake_stripe_checks_the_sdks_read_params(fake: FakeStripe) -> None:
    path = f"/v1/billing/meters/{fake.meter_id('llm_tokens')}/event_summaries"
    start, end = (int(t.timestamp()) for t in period())
    good = {"customer": "cus_1", "start_time": str(start), "end_time": str(end)}
    ok = get(fake, path, good)
    assert ok.status_code == 200
    assert ok.json()["data"][0]["aggregated_value"] == 0.0
    assert get(fake, path, {**good, "customer": "cus_x"}).status_code == 404
    assert fake.violations == []  # an unknown customer is data, not our client's fault
    refused = {
        "no customer": {k: v for k, v in good.items() if k != "customer"},
        "no start": {k: v for k, v in good.items() if k != "start_time"},
        "start not a minute": {**good, "start_time": str(start + 1)},
        "end not a minute": {**good, "end_time": str(end - 30)},
        "empty period": {**good, "end_time": str(start)},
        "grouping window": {**good, "value_grouping_window": "hour"},
    }
    for name, params in refused.items():
        answer = get(fake, path, params)
        assert answer.status_code == 400, name
        assert answer.json()["error"]["type"] == "invalid_request_error", name
    assert len(fake.violations) == len(refused)
    fake.violations.clear()
    assert get(fake, "/v1/billing/meters", {"limit": "101"}).status_code == 400
    assert get(fake, "/v2/core/events", {"created[gte]": "yesterday"}).status_code == 400
    get(fake, path, good, **{"Stripe-Version": ""})
    get(fake, "/v2/core/events", {}, **{"User-Agent": "Stripe/v1 PythonBindings/16.1.0"})
    assert len(fake.violations) == 4
