"""The Stripe adapter against a fake Stripe: wire format, dedupe, and every answer's outcome."""

from __future__ import annotations

import datetime as dt
import urllib.parse
from collections.abc import Iterator

import pytest
from fakes import event, report
from fakes.base import Fault
from fakes.stripe import KEY, FakeStripe

from usage_service import domain, plans
from usage_service.providers import outcome
from usage_service.providers.config import Endpoint
from usage_service.providers.stripe_meters import StripeMeters

STRIPE = domain.Provider.STRIPE


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    server = FakeStripe().start()
    yield server
    server.stop()


@pytest.fixture
async def adapter(fake: FakeStripe, plans: plans.Plans) -> StripeMeters:
    a = StripeMeters(Endpoint(KEY, fake.url), fake.url, plans.meters, timeout=0.5)
    yield a
    await a.aclose()


def form(body: bytes) -> dict[str, str]:
    return {k: v[0] for k, v in urllib.parse.parse_qs(body.decode()).items()}


async def test_sum_report_is_one_meter_event_with_the_report_id(fake, adapter) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    old = event(quantity=3, when=now - dt.timedelta(minutes=2))
    new = event(quantity=4, when=now - dt.timedelta(minutes=1))
    r = report(STRIPE, old, new, value=7)

    assert await adapter.send(r) == outcome.Delivered()

    (call,) = fake.writes()
    assert call.headers["authorization"] == f"Bearer {KEY}"
    assert call.headers["idempotency-key"] == r.report_id
    assert form(call.body) == {
        "event_name": "llm_tokens",  # tests/plans.toml names the Stripe meter
        "payload[stripe_customer_id]": "cus_1",
        "payload[value]": "7",
        "identifier": r.report_id,
        "timestamp": str(int(new.event_time.timestamp())),
    }
    assert fake.totals() == {("cus_1", "llm_tokens"): 7}
    assert fake.violations == []


async def test_a_resent_report_is_delivered_once(fake, adapter) -> None:
    r = report(STRIPE, event(quantity=5), value=5)
    assert await adapter.send(r) == outcome.Delivered()
    assert await adapter.send(r) == outcome.Delivered()  # same key: Stripe replays its answer
    fake._keys.clear()  # the key expired, the identifier is still known
    assert await adapter.send(r) == outcome.Delivered(duplicate=True)
    assert fake.totals() == {("cus_1", "llm_tokens"): 5}
    assert [c.status for c in fake.writes()] == [200, 200, 400]
    assert fake.violations == []


async def test_count_meter_sends_each_event_under_its_own_id(fake, adapter) -> None:
    events = [event(meter="calls", quantity=1) for _ in range(3)]
    assert await adapter.send(report(STRIPE, *events, value=3)) == outcome.Delivered()
    assert sorted(form(c.body)["identifier"] for c in fake.writes()) == sorted(
        e.event_id for e in events
    )
    assert fake.counts() == {("cus_1", "calls"): 3}


@pytest.mark.parametrize(
    ("fault", "after"),
    [
        (Fault("status", 500, body={"error": {"type": "api_error", "message": "boom"}}), None),
        (Fault("status", 502, body=None), None),
        (
            Fault(
                "status",
                429,
                {"Retry-After": "7", "Stripe-Rate-Limited-Reason": "meter-event-customer"},
                {"error": {"type": "invalid_request_error", "code": "rate_limit", "message": "x"}},
            ),
            7.0,
        ),
        (Fault("status", 409, body={"error": {"type": "api_error", "message": "lock"}}), None),
        (Fault("hang"), None),
        (Fault("drop"), None),
    ],
)
async def test_transient_answers_retry_and_the_retry_lands_once(
    fake, adapter, fault, after
) -> None:
    fake.inject(fault)
    r = report(STRIPE, event(quantity=2), value=2)
    answer = await adapter.send(r)
    assert isinstance(answer, outcome.Retry), answer
    assert answer.after == after
    assert await adapter.send(r) in (outcome.Delivered(), outcome.Delivered(duplicate=True))
    assert fake.totals() == {("cus_1", "llm_tokens"): 2}
    assert fake.violations == []


async def test_validation_errors_are_permanent_with_stripes_reason(fake, adapter) -> None:
    stale = event(when=dt.datetime.now(dt.UTC) - dt.timedelta(days=40))
    answer = await adapter.send(report(STRIPE, stale, value=1))
    assert isinstance(answer, outcome.Failed)
    assert "35 days" in answer.reason
    fake.inject(
        Fault("status", 503, {"Stripe-Should-Retry": "false"}, {"error": {"message": "no"}})
    )
    assert isinstance(await adapter.send(report(STRIPE, event(), value=1)), outcome.Failed)
    assert fake.events == {}


async def test_a_customer_without_a_stripe_id_is_refused_before_any_call(fake, adapter) -> None:
    answer = await adapter.send(report(STRIPE, event(provider_customer_id=""), value=1))
    assert isinstance(answer, outcome.Failed) and "Stripe customer id" in answer.reason
    assert fake.calls == []


async def test_count_meter_parks_only_the_refused_event(fake, adapter) -> None:
    good = event(meter="calls")
    stale = event(meter="calls", when=dt.datetime.now(dt.UTC) - dt.timedelta(days=40))
    answer = await adapter.send(report(STRIPE, good, stale, value=2))
    assert isinstance(answer, outcome.Rejected) and set(answer.reasons) == {stale.event_id}
    assert set(fake.events) == {good.event_id}
