"""Stripe's v2 meter event stream (STRIPE_METER_EVENT_STREAM=true): the adapter against the fake
Stripe's v2 endpoints, and the drain through them on a real PostgreSQL, faults included."""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest
import stripe
import test_drain
from conftest import Service
from fakes import event, report
from fakes.base import Fault
from fakes.stripe import KEY, SESSION_PATH, STREAM_PATH, FakeStripe
from fakes.world import Fakes
from helpers import Drains, record
from test_adapters_wire import Wire, stripe_http
from test_drain import FAST, add_customers, drain_until_quiet, record_many, states, summary

from usage.v1 import customer_pb2
from usage_service import domain, providers
from usage_service.domain import plans
from usage_service.drain.loop import Drain, DrainSettings
from usage_service.drain.reports import build_reports
from usage_service.providers import outcome
from usage_service.providers.config import Endpoint, ProviderSettings
from usage_service.providers.stripe_meters import MAX_VALUE, StripeMeters
from usage_service.providers.stripe_stream import TOO_OLD_EVENT, StripeMeterStream
from usage_service.settings import ConfigError

STRIPE = domain.Provider.STRIPE
STREAM = f"POST {STREAM_PATH}"
fakes = test_drain.fakes  # fixture


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    server = FakeStripe().start()
    yield server
    server.stop()


@pytest.fixture
async def stream(fake: FakeStripe, plans: plans.Plans) -> AsyncIterator[StripeMeterStream]:
    a = StripeMeterStream(Endpoint(KEY, fake.url), fake.url, plans.meters, timeout=0.5)
    yield a
    await a.aclose()


def calls(fake: FakeStripe, path: str) -> int:
    return sum(1 for c in fake.calls if c.method == "POST" and c.path == path)


def ago(**delta: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(**delta)


# --- the adapter against the fake ---


async def test_reports_share_requests_of_at_most_100_events(fake, stream) -> None:
    counted = [
        report(STRIPE, *(event(meter="calls", quantity=1, customer_id=f"c{k}") for _ in range(120)))
        for k in range(3)
    ]
    summed = report(STRIPE, event(quantity=5), event(quantity=6), value=11)

    answers = await stream.send_many([*counted, summed])

    assert answers == [outcome.Delivered()] * 4
    assert sorted(fake.stream_sizes) == [61, 100, 100, 100]
    assert calls(fake, SESSION_PATH) == 1  # one session for every request
    assert fake.counts()[("cus_1", "calls")] == 360
    assert fake.events[summed.report_id].value == 11
    first = next(c for c in fake.calls if c.path == STREAM_PATH)
    assert first.headers["content-type"] == "application/json"
    assert first.headers["authorization"].startswith("Bearer mes_tok_")  # not the secret key
    sent = json.loads(first.body)["events"][0]
    assert set(sent) == {"event_name", "identifier", "payload", "timestamp"}
    assert sent["timestamp"].endswith("Z")
    assert fake.violations == []


async def test_an_expired_token_gets_a_new_session_and_the_request_again(fake, stream) -> None:
    first = report(STRIPE, event(quantity=2), value=2)
    assert await stream.send(first) == outcome.Delivered()
    fake.expire_sessions()
    second = report(STRIPE, event(quantity=3), value=3)

    assert await stream.send(second) == outcome.Delivered()

    assert calls(fake, SESSION_PATH) == 2
    expired = [c for c in fake.calls if c.path == STREAM_PATH and c.status == 401]
    assert len(expired) == 1
    assert fake.totals()[("cus_1", "llm_tokens")] == 5
    assert fake.violations == []


async def test_a_token_is_renewed_before_it_expires(fake, stream) -> None:
    fake.session_ttl = 30.0  # less than the margin kept before expiry: renewed on every use
    for q in (1, 2):
        assert await stream.send(report(STRIPE, event(quantity=q), value=q)) == outcome.Delivered()

    assert calls(fake, SESSION_PATH) == 2
    assert all(c.status == 200 for c in fake.calls if c.path == STREAM_PATH)


@pytest.mark.parametrize(
    ("fault", "after"),
    [
        (Fault("status", 429, {"Retry-After": "7"}, {"error": {"message": "slow"}}, STREAM), 7.0),
        (Fault("status", 500, body={"error": {"type": "api_error", "message": "x"}}), None),
        (Fault("drop", route=STREAM), None),  # stored, then the connection closed
        (Fault("hang", route=STREAM), None),  # nothing stored, no answer before our timeout
    ],
)
async def test_an_unknown_outcome_is_sent_again_whole_and_counted_once(
    fake, stream, fault: Fault, after: float | None
) -> None:
    if fault.route == "":
        fault.route = STREAM
    r = report(STRIPE, *(event(meter="calls", quantity=1) for _ in range(3)))
    fake.inject(fault)

    answer = await stream.send(r)

    assert isinstance(answer, outcome.Retry) and answer.after == after
    assert await stream.send(r) == outcome.Delivered()
    assert fake.counts()[("cus_1", "calls")] == 3
    assert fake.violations == []


async def test_a_refused_event_parks_its_report_only(fake, stream) -> None:
    good = [report(STRIPE, event(quantity=q), value=q) for q in range(1, 60)]
    bad = report(STRIPE, event(quantity=1000), value=1000)
    counted = report(STRIPE, *(event(meter="calls", quantity=1) for _ in range(50)))
    culprit = counted.events[17].event_id
    fake.refused[bad.report_id] = "No such customer"
    fake.refused[culprit] = "Invalid payload"

    answers = await stream.send_many([*good[:30], bad, *good[30:], counted])

    assert answers[30] == outcome.Failed("stripe 400 InvalidRequestError: No such customer")
    assert answers[-1] == outcome.Rejected(
        {culprit: "stripe 400 InvalidRequestError: Invalid payload"}
    )
    assert [a for i, a in enumerate(answers) if i not in (30, 60)] == [outcome.Delivered()] * 59
    assert fake.totals()[("cus_1", "llm_tokens")] == sum(range(1, 60))
    assert fake.counts()[("cus_1", "calls")] == 49
    assert bad.report_id not in fake.events and culprit not in fake.events
    assert calls(fake, STREAM_PATH) < 40  # halves, not one request per event


async def test_stripes_window_and_15_digits_hold_as_on_v1(fake, stream) -> None:
    old = event(meter="calls", quantity=1, when=ago(days=36))
    fresh = event(meter="calls", quantity=1)
    huge = event(meter="calls", quantity=MAX_VALUE + 1)
    counted = report(STRIPE, old, fresh, huge)
    stale = report(STRIPE, event(quantity=4, when=ago(days=36)), value=4)
    ahead = report(STRIPE, event(quantity=4, when=ago(seconds=-120)), value=4)
    big = report(STRIPE, event(quantity=2 * MAX_VALUE + 1), value=2 * MAX_VALUE + 1)

    answers = await stream.send_many([counted, stale, ahead, big])

    rejected = answers[0]
    assert isinstance(rejected, outcome.Rejected)
    assert rejected.reasons[old.event_id] == TOO_OLD_EVENT
    assert "15 digits" in rejected.reasons[huge.event_id]
    assert set(rejected.reasons) == {old.event_id, huge.event_id}
    assert answers[1] == outcome.Failed(TOO_OLD_EVENT)
    assert isinstance(answers[2], outcome.Retry) and (answers[2].after or 0) > 100
    assert answers[3] == outcome.Delivered()
    pieces = {i: e.value for i, e in fake.events.items() if i.startswith(big.report_id)}
    assert pieces == {
        f"{big.report_id}-1": MAX_VALUE,
        f"{big.report_id}-2": MAX_VALUE,
        f"{big.report_id}-3": 1,
    }
    assert set(fake.events) == {fresh.event_id, *pieces}
    assert fake.violations == []


async def test_a_refused_secret_key_parks_without_a_stream_call(fake, plans) -> None:
    wrong = StripeMeterStream(Endpoint("sk_test_wrong", fake.url), fake.url, plans.meters, 0.5)
    try:
        answer = await wrong.send(report(STRIPE, event(quantity=1), value=1))
    finally:
        await wrong.aclose()
    assert isinstance(answer, outcome.Failed) and "401" in answer.reason
    assert calls(fake, STREAM_PATH) == 0


def test_the_stream_is_a_setting_off_by_default(plans) -> None:
    base = {"STRIPE_API_KEY": KEY}
    off = providers.adapters(ProviderSettings.from_env(base), plans.meters)[STRIPE]
    on = providers.adapters(
        ProviderSettings.from_env({**base, "STRIPE_METER_EVENT_STREAM": "true"}), plans.meters
    )[STRIPE]
    assert type(off) is StripeMeters and not isinstance(off, providers.StreamAdapter)
    assert isinstance(on, StripeMeterStream) and isinstance(on, providers.StreamAdapter)
    with pytest.raises(ConfigError, match="STRIPE_METER_EVENT_STREAM"):
        ProviderSettings.from_env({**base, "STRIPE_METER_EVENT_STREAM": "maybe"})


# --- the drain through the stream, on a real PostgreSQL ---


@pytest.fixture
async def drains(dsn: str, plans: plans.Plans, fakes: Fakes) -> AsyncIterator[Drains]:
    made = Drains(dsn, plans.meters)
    yield made
    await made.close()
    if made.made:
        db = await asyncpg.connect(dsn)
        try:
            assert await test_drain.fakes_against_reported(fakes, db, plans) == []
        finally:
            await db.close()


async def stream_drain(
    drains: Drains, fakes: Fakes, settings: DrainSettings = FAST, owner: str = "", on: bool = True
) -> Drain:
    env = {k: v for k, v in fakes.env().items() if k.startswith("STRIPE_")}
    env["STRIPE_METER_EVENT_STREAM"] = "true" if on else "false"
    return await drains.make(env, settings, owner, pool_size=5)


async def record_all_meters(service: Service, round_: int) -> dict[str, list[int]]:
    recorded = {
        "tokens": [5, 7, 11 + round_],
        "calls": [1] * (3 + round_),
        "seats": [3 + round_, 2 + round_ * 4],
        "storage": [100 * (round_ + 1), 50],
    }
    start = ago(minutes=10 - round_)
    for meter, quantities in recorded.items():
        await record_many(service, "c_stripe", meter, quantities, start)
    return recorded


async def test_the_drain_bills_exactly_what_was_recorded_through_every_fault(
    service: Service, fakes: Fakes, drains: Drains
) -> None:
    await add_customers(service, ["stripe"])
    d = await stream_drain(drains, fakes)
    stripe = fakes.stripe
    recorded: dict[str, list[int]] = {}
    for round_ in range(2):
        for meter, quantities in (await record_all_meters(service, round_)).items():
            recorded.setdefault(meter, []).extend(quantities)
        stripe.inject(*test_drain.transient_faults(STREAM))
        stripe.inject(Fault("status", 500, route=f"POST {SESSION_PATH}"))
        if round_:
            stripe.expire_sessions()
        await drain_until_quiet([d], service.db)

    assert stripe.totals()[("cus_s", "llm_tokens")] == sum(recorded["tokens"])
    assert stripe.counts()[("cus_s", "calls")] == len(recorded["calls"])
    assert stripe.last("cus_s", "seats") == recorded["seats"][-1]
    assert stripe.last("cus_s", "storage") == max(recorded["storage"])
    total = sum(len(q) for q in recorded.values())
    assert await states(service.db, "c_stripe") == {"reported": total}
    assert (await summary(service, "c_stripe"))["tokens"].reported == sum(recorded["tokens"])
    assert calls(stripe, "/v1/billing/meter_events") == 0
    assert calls(stripe, SESSION_PATH) >= 2
    assert stripe.violations == []


async def test_a_report_sent_by_a_dead_worker_is_sent_again_and_counted_once(
    service: Service, fakes: Fakes, drains: Drains, plans: plans.Plans
) -> None:
    await add_customers(service, ["stripe"])
    await record_many(service, "c_stripe", "tokens", [5, 6])
    await record_many(service, "c_stripe", "calls", [1, 1, 1])
    dead = await stream_drain(drains, fakes, owner="dead")
    # The dead worker claims, commits and sends its reports, then dies before settling them.
    claimed = await dead.store.claim_new(
        STRIPE,
        "dead",
        1.0,
        100,
        lambda c: build_reports(STRIPE, StripeMeterStream.reporting, plans.meters, c),
    )
    adapter = dead.adapters[STRIPE]
    assert isinstance(adapter, StripeMeterStream)
    assert await adapter.send_many(claimed) == [outcome.Delivered()] * 2
    assert fakes.stripe.stream_sizes == [4]

    live = await stream_drain(drains, fakes, owner="live")
    await drain_until_quiet([live], service.db)

    assert fakes.stripe.stream_sizes == [4, 4]  # the same events again, ignored by Stripe
    assert fakes.stripe.totals()[("cus_s", "llm_tokens")] == 11
    assert fakes.stripe.counts()[("cus_s", "calls")] == 3
    assert await states(service.db, "c_stripe") == {"reported": 5}
    assert fakes.stripe.violations == []


async def test_a_token_expiring_mid_drain_loses_nothing(
    service: Service, fakes: Fakes, drains: Drains
) -> None:
    await add_customers(service, ["stripe"])
    d = await stream_drain(drains, fakes)
    await record_many(service, "c_stripe", "calls", [1] * 350)
    await d.cycle()  # the first report, of 200 events: two requests
    assert fakes.stripe.stream_sizes == [100, 100]
    fakes.stripe.expire_sessions()
    await drain_until_quiet([d], service.db)

    assert fakes.stripe.counts()[("cus_s", "calls")] == 350
    assert calls(fakes.stripe, SESSION_PATH) == 2
    assert max(fakes.stripe.stream_sizes) <= 100
    assert await states(service.db, "c_stripe") == {"reported": 350}
    assert fakes.stripe.violations == []


async def test_many_customers_share_requests_of_at_most_100_events(
    service: Service, fakes: Fakes, drains: Drains
) -> None:
    for k in range(150):
        await service.add_customer(
            f"c{k}",
            plan_id="basic",
            provider=customer_pb2.PROVIDER_STRIPE,
            provider_customer_id=f"cus_{k}",
        )
        await record_many(service, f"c{k}", "tokens", [k + 1, 2])
    d = await stream_drain(drains, fakes)
    await drain_until_quiet([d], service.db)

    assert sorted(fakes.stripe.stream_sizes) == [50, 100]  # one summed event per customer
    totals = fakes.stripe.totals()
    assert all(totals[(f"cus_{k}", "llm_tokens")] == k + 3 for k in range(150))
    assert fakes.stripe.violations == []


async def test_v1_when_the_stream_is_off(service: Service, fakes: Fakes, drains: Drains) -> None:
    await add_customers(service, ["stripe"])
    d = await stream_drain(drains, fakes, on=False)
    recorded = await record_all_meters(service, 0)
    await drain_until_quiet([d], service.db)

    assert calls(fakes.stripe, STREAM_PATH) == calls(fakes.stripe, SESSION_PATH) == 0
    assert calls(fakes.stripe, "/v1/billing/meter_events") == 1 + 3 + 1 + 1
    assert fakes.stripe.totals()[("cus_s", "llm_tokens")] == sum(recorded["tokens"])
    assert fakes.stripe.violations == []


def test_the_drain_bench_runs_both_stripe_paths(server_dsn: str) -> None:
    bench = pathlib.Path(__file__).resolve().parent.parent / "bench" / "drain.py"
    out = subprocess.run(
        [
            *(sys.executable, str(bench), "--database-url", server_dsn, "--events", "1500"),
            *("--scenario", "stripe-stream", "--scenario", "stripe-v1", "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["scenario"] for r in runs] == ["stripe-stream", "stripe-v1"]
    for r in runs:
        assert r["reported"] == 1500 and r["violations"] == 0, r
        assert r["accepted_by_fake"] == r["expected_by_fake"] == 75_750, r


async def test_a_batch_providers_claim_keeps_each_events_properties(
    service: Service, fakes: Fakes, drains: Drains, plans: plans.Plans
) -> None:
    await add_customers(service, ["polar"])
    await service.usage.RecordUsage(record("c_polar", "tokens", 3, "with", region="eu", tier="1"))
    await service.usage.RecordUsage(record("c_polar", "tokens", 4, "without"))
    env = {k: v for k, v in fakes.env().items() if k.startswith("POLAR_")}
    dead = await drains.make(env, FAST, "dead")
    # Claimed and committed in one statement, then resent from the stored report.
    (claimed,) = await dead.store.claim_batches(domain.Provider.POLAR, "dead", 0.5, 100, 500)
    assert sorted(e.properties.get("region", "") for e in claimed.events) == ["", "eu"]
    live = await drains.make(env, FAST, "live")
    await drain_until_quiet([live], service.db)

    sent = sorted(fakes.polar.accepted.values(), key=lambda e: e["metadata"]["value"])
    assert [e["metadata"] for e in sent] == [
        {"value": 3, "region": "eu", "tier": "1"},
        {"value": 4},
    ]
    assert await states(service.db, "c_polar") == {"reported": 2}


async def test_the_wire_session_on_the_api_host_events_on_the_meter_events_host(
    plans: plans.Plans,
) -> None:
    api, meter_events = "https://api.provider.test", "https://meter-events.provider.test"
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=15)).isoformat()
    session = {"object": "v2.billing.meter_event_session", "id": "mes_1", "livemode": False}
    session |= {"authentication_token": "tok_1", "created": later, "expires_at": later}
    wire = Wire(httpx.Response(200, json=session), httpx.Response(200, json={}))
    adapter = StripeMeterStream(
        Endpoint(KEY, api), meter_events, plans.meters, 5.0, stripe_http(wire)
    )
    when = dt.datetime(2026, 11, 30, 6, 0, 1, 500000, dt.UTC)
    r = report(STRIPE, event(quantity=3, when=when), value=3)
    try:
        assert await adapter.send(r) == outcome.Delivered()
    finally:
        await adapter.aclose()

    made, sent = wire.requests
    assert (made.method, str(made.url)) == ("POST", f"{api}{SESSION_PATH}")
    assert made.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(made.content) == {}
    assert (sent.method, str(sent.url)) == ("POST", f"{meter_events}{STREAM_PATH}")
    assert sent.headers["authorization"] == "Bearer tok_1"
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["stripe-version"] == stripe.api_version
    assert json.loads(sent.content) == {
        "events": [
            {
                "event_name": "llm_tokens",
                "identifier": r.report_id,
                "payload": {"stripe_customer_id": "cus_1", "value": "3"},
                "timestamp": "2026-11-30T06:00:01.000Z",
            }
        ]
    }
