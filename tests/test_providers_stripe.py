"""The Stripe adapter against a fake Stripe: wire format, dedupe, and every answer's outcome."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import urllib.parse
from collections.abc import Iterator

import httpx
import pytest
from fakes import event, report
from fakes.base import Fault
from fakes.stripe import KEY, FakeStripe

from usage_service import domain
from usage_service.domain import plans
from usage_service.providers import outcome
from usage_service.providers.config import Endpoint
from usage_service.providers.stripe_meters import (
    MAX_VALUE,
    StripeMeters,
    last_timestamp,
    window,
)

pytestmark = pytest.mark.slow  # over HTTP against the fake providers, timeouts included

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


async def test_a_sum_over_15_digits_goes_out_in_pieces_under_derived_identifiers(
    fake, adapter
) -> None:
    value = 2 * MAX_VALUE + 5
    r = report(STRIPE, event(quantity=value), value=value)
    assert await adapter.send(r) == outcome.Delivered()
    sent = [form(c.body) for c in fake.writes()]
    assert [f["identifier"] for f in sent] == [f"{r.report_id}-{k}" for k in (1, 2, 3)]
    assert [c.headers["idempotency-key"] for c in fake.writes()] == [f["identifier"] for f in sent]
    assert [f["payload[value]"] for f in sent] == [str(MAX_VALUE), str(MAX_VALUE), "5"]
    assert fake.totals() == {("cus_1", "llm_tokens"): value}
    # A retry sends the same set: Stripe replays each answer, nothing is added.
    fake.inject(Fault("status", 500, body={"error": {"type": "api_error", "message": "boom"}}))
    assert isinstance(await adapter.send(r), outcome.Retry)
    assert await adapter.send(r) == outcome.Delivered()
    assert fake.totals() == {("cus_1", "llm_tokens"): value}
    assert fake.violations == []


async def test_values_stripe_cannot_take_are_parked_without_a_call(fake, adapter) -> None:
    huge = 2**62  # a sum of 4612 meter events of 15 digits: a bug, not usage
    answer = await adapter.send(report(STRIPE, event(quantity=huge), value=huge))
    assert isinstance(answer, outcome.Failed) and "15 digits" in answer.reason
    peak = MAX_VALUE + 1  # a max figure cannot be split
    answer = await adapter.send(report(STRIPE, event(meter="storage"), value=peak))
    assert isinstance(answer, outcome.Failed) and "15 digits" in answer.reason
    assert fake.calls == [] and fake.violations == []


def test_a_max_figure_is_timed_now_clamped_into_its_periods_whole_minutes() -> None:
    """Stripe summarises by the minute: a report is timed inside its period's whole minutes,
    so a summary of them holds the whole period."""
    now = dt.datetime(2026, 6, 15, 12, 0, 0, 500000, tzinfo=dt.UTC)
    second = int(now.timestamp())  # 12:00:00
    day = dt.timedelta(days=1)
    assert last_timestamp(now, now - day, now + day) == second
    # An ended period: the last second of its last whole minute (11:59:59 before an end at
    # 12:00:00.5 or at 12:00:00).
    assert last_timestamp(now, now - 3 * day, now - day) == second - 86401
    assert last_timestamp(now, now - 3 * day, now.replace(microsecond=0) - day) == second - 86401
    start = now + dt.timedelta(seconds=30)  # 12:00:30.5: a period that starts soon
    assert last_timestamp(now, start, now + day) == second + 60  # its first whole minute
    assert window(now - day, now + day) == (
        dt.datetime(2026, 6, 14, 12, 1, tzinfo=dt.UTC),
        dt.datetime(2026, 6, 16, 12, 0, tzinfo=dt.UTC),
    )


async def test_a_max_report_is_sent_with_the_time_its_figure_is_stated(fake, adapter) -> None:
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(days=3), now - dt.timedelta(days=1)  # an ended period
    stamp = last_timestamp(now, start, end)
    old = event(meter="storage", quantity=50, when=start + dt.timedelta(hours=1))
    stated = dt.datetime.fromtimestamp(stamp, dt.UTC)
    r = dataclasses.replace(report(STRIPE, old, value=50), stated_at=stated)
    assert await adapter.send(r) == outcome.Delivered()
    assert await adapter.send(r) == outcome.Delivered()  # a re-send: the very same parameters
    assert {form(c.body)["timestamp"] for c in fake.writes()} == {str(stamp)}
    assert fake.violations == []


def post(fake: FakeStripe, fields: dict[str, str], **headers: str) -> httpx.Response:
    sent = {
        "Authorization": f"Bearer {KEY}",
        "Idempotency-Key": fields.get("identifier", ""),
        "Stripe-Version": "2026-10-28.endive",
        "User-Agent": "Stripe/v1 PythonBindings/16.1.0",
        **headers,
    }
    return httpx.post(f"{fake.url}/v1/billing/meter_events", data=fields, headers=sent)


def test_fake_stripe_checks_the_sdks_meter_event_schema(fake) -> None:
    good = {
        "event_name": "llm_tokens",
        "payload[stripe_customer_id]": "cus_1",
        "payload[value]": "7",
        "identifier": "id-1",
        "timestamp": str(int(time.time())),
    }
    ok = post(fake, good)
    assert ok.status_code == 200 and ok.headers["request-id"].startswith("req_")
    assert ok.json() == {
        "object": "billing.meter_event",
        "created": ok.json()["created"],
        "event_name": "llm_tokens",
        "identifier": "id-1",
        "livemode": False,
        "payload": {"stripe_customer_id": "cus_1", "value": "7"},
        "timestamp": int(good["timestamp"]),
    }
    assert fake.violations == []
    refused = {
        "missing identifier": ({k: v for k, v in good.items() if k != "identifier"}, "identifier"),
        "unknown field": ({**good, "expand[0]": "x"}, "expand[0]"),
        "16 digits": ({**good, "payload[value]": "1" + "0" * 15}, "payload[value]"),
        "not whole": ({**good, "payload[value]": "1.5"}, "payload[value]"),
        "long identifier": ({**good, "identifier": "i" * 101}, "identifier"),
        "long event_name": ({**good, "event_name": "e" * 101}, "event_name"),
        "bad timestamp": ({**good, "timestamp": "soon"}, "timestamp"),
    }
    for name, (fields, param) in refused.items():
        answer = post(fake, fields)
        assert answer.status_code == 400, name
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, name
        assert error["message"], name
    assert len(fake.violations) == len(refused)
    fake.violations.clear()
    for name, (fields, expected) in {
        "too old": ({**good, "identifier": "id-2", "timestamp": "1"}, 400),
        "max digits": ({**good, "identifier": "id-3", "payload[value]": "9" * 15}, 200),
    }.items():
        assert post(fake, fields).status_code == expected, name
    assert fake.violations == []  # data Stripe refuses is not our client's fault
    post(fake, {**good, "identifier": "id-4"}, **{"Stripe-Version": ""})
    post(fake, {**good, "identifier": "id-5"}, **{"Idempotency-Key": "other"})
    post(fake, {**good, "identifier": "id-6"}, **{"User-Agent": "curl/8"})
    assert len(fake.violations) == 3


def test_fake_stripe_bills_last_by_latest_timestamp_then_latest_received(fake) -> None:
    now = int(time.time())
    for identifier, value, stamp in (("a", 50, now - 60), ("b", 10, now - 30), ("c", 20, now - 30)):
        fields = {
            "event_name": "storage",
            "payload[stripe_customer_id]": "cus_1",
            "payload[value]": str(value),
            "identifier": identifier,
            "timestamp": str(stamp),
        }
        assert post(fake, fields).status_code == 200
    assert fake.last("cus_1", "storage") == 20  # b and c tie on time: c came last
    assert fake.last("cus_1", "storage", now - 100, now - 30) == 50  # [start, end)
    assert fake.last("cus_1", "storage", now - 10, now) is None
    assert fake.summed("cus_1", "storage", now - 30, now) == 30


async def test_a_count_event_over_15_digits_is_refused_alone_without_a_call(fake, adapter) -> None:
    good, huge = event(meter="calls"), event(meter="calls", quantity=MAX_VALUE + 1)
    answer = await adapter.send(report(STRIPE, good, huge, value=2))
    assert isinstance(answer, outcome.Rejected) and set(answer.reasons) == {huge.event_id}
    assert set(fake.events) == {good.event_id} and len(fake.writes()) == 1
    assert fake.violations == []


async def test_an_event_timed_ahead_of_now_waits_until_due_instead_of_being_refused(
    fake: FakeStripe, adapter: StripeMeters
) -> None:
    """RecordUsage takes event times up to 5 minutes ahead; Stripe refuses a timestamp ahead of
    its own clock for good, so the report waits until its time has come."""
    ahead = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=4)
    for meter in ("tokens", "calls"):
        answer = await adapter.send(report(STRIPE, event(meter=meter, when=ahead), value=1))
        assert isinstance(answer, outcome.Retry) and "future" in answer.reason
        assert answer.after is not None and 230 < answer.after < 242
    assert fake.calls == []
