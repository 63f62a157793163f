"""Polar, Dodo Payments and Creem adapters against fakes: one provider event per usage event,
our event id as the dedupe key, batch caps, timestamp windows, all-or-nothing rejections."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Iterator, Mapping

import pytest
from fakes import event, report
from fakes.base import Fault
from fakes.ingest import CREEM_KEY, DODO_KEY, POLAR_KEY, FakeCreem, FakeDodo, FakeIngest, FakePolar

from usage_service import domain, plans
from usage_service.plans import Meter
from usage_service.providers import creem, dodo_payments, ingest, outcome, polar
from usage_service.providers.config import Endpoint


@dataclasses.dataclass(frozen=True)
class Case:
    provider: domain.Provider
    fake: type[FakeIngest]
    key: str
    make: Callable[[Endpoint, Mapping[str, Meter], float], ingest.Ingest]
    cap: int


CASES = [
    Case(domain.Provider.POLAR, FakePolar, POLAR_KEY, polar.adapter, polar.BATCH),
    Case(domain.Provider.DODO_PAYMENTS, FakeDodo, DODO_KEY, dodo_payments.adapter, 100),
    Case(domain.Provider.CREEM, FakeCreem, CREEM_KEY, creem.adapter, 100),
]


@pytest.fixture(params=CASES, ids=lambda c: c.provider.value)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def fake(case: Case) -> Iterator[FakeIngest]:
    server = case.fake({"cus_1", "cus_2"}).start()
    yield server
    server.stop()


@pytest.fixture
async def adapter(case: Case, fake: FakeIngest, plans: plans.Plans) -> ingest.Ingest:
    a = case.make(Endpoint(case.key, fake.url), plans.meters, 0.5)
    yield a
    await a.aclose()


async def test_wire_format_of_one_event(case, fake, adapter) -> None:
    e = event(quantity=42, region="eu")
    assert await adapter.send(report(case.provider, e)) == outcome.Delivered()
    (call,) = fake.writes()
    (sent,) = json.loads(call.body)["events"]
    stamp = e.event_time.astimezone(dt.UTC).isoformat(timespec="milliseconds")
    stamp = stamp.replace("+00:00", "Z")
    if case.provider is domain.Provider.POLAR:
        assert call.headers["authorization"] == f"Bearer {POLAR_KEY}"
        assert sent == {
            "name": "tokens",
            "external_id": e.event_id,
            "customer_id": "cus_1",
            "timestamp": stamp,
            "metadata": {"value": 42, "region": "eu"},
        }
    elif case.provider is domain.Provider.DODO_PAYMENTS:
        assert call.headers["authorization"] == f"Bearer {DODO_KEY}"
        assert sent == {
            "event_id": e.event_id,
            "customer_id": "cus_1",
            "event_name": "tokens",
            "timestamp": stamp,
            "metadata": {"value": 42, "region": "eu"},
        }
    else:
        assert call.headers["x-api-key"] == CREEM_KEY
        assert sent == {
            "name": "tokens",
            "customer_id": "cus_1",
            "event_id": e.event_id,
            "timestamp": stamp,
            "properties": {"value": 42},
            "metadata": {"region": "eu"},
        }
    assert fake.violations == []


async def test_batches_stay_within_the_cap_and_resends_dedupe(case, fake, adapter) -> None:
    events = [event(quantity=1) for _ in range(case.cap * 2 + 1)]
    r = report(case.provider, *events)
    assert await adapter.send(r) == outcome.Delivered()
    assert fake.batch_sizes == [case.cap, case.cap, 1]
    assert await adapter.send(r) == outcome.Delivered()  # all duplicates now
    assert len(fake.accepted) == len(events)
    assert fake.violations == []


@pytest.mark.parametrize(
    ("fault", "after"),
    [
        (Fault("status", 500, body={"detail": "boom"}), None),
        (Fault("status", 429, {"Retry-After": "5"}, {"detail": "slow"}), 5.0),
        (Fault("status", 408, body={"detail": "timeout"}), None),
        (Fault("hang"), None),
        (Fault("drop"), None),
    ],
)
async def test_transient_answers_retry_and_the_retry_lands_once(
    case, fake, adapter, fault, after
) -> None:
    fake.inject(fault)
    r = report(case.provider, event(quantity=3), event(quantity=4))
    answer = await adapter.send(r)
    assert isinstance(answer, outcome.Retry) and answer.after == after
    assert await adapter.send(r) == outcome.Delivered()
    assert sorted(
        e["event_id" if "event_id" in e else "external_id"] for e in fake.accepted.values()
    ) == sorted(x.event_id for x in r.events)
    assert fake.violations == []


async def test_an_all_or_nothing_rejection_sets_the_bad_event_aside(case, fake, adapter) -> None:
    good = [event(quantity=i) for i in range(1, 8)]
    bad = event(provider_customer_id="cus_unknown")
    r = report(case.provider, *good[:3], bad, *good[3:])
    answer = await adapter.send(r)
    assert isinstance(answer, outcome.Rejected), answer
    assert list(answer.reasons) == [bad.event_id]
    assert "not" in answer.reasons[bad.event_id].lower()  # the provider's own words
    assert set(fake.accepted) == {e.event_id for e in good}
    assert fake.violations == []


async def test_polar_clamps_future_timestamps_and_names_external_customers(plans) -> None:
    fake = FakePolar({"cus_1"}).start()
    a = polar.adapter(Endpoint(POLAR_KEY, fake.url), plans.meters, 0.5)
    try:
        ahead = event(when=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=4))
        anonymous = event(customer_id="acme", provider_customer_id="")
        assert await a.send(report(domain.Provider.POLAR, ahead, anonymous)) == outcome.Delivered()
        sent = {e["external_id"]: e for e in fake.accepted.values()}
        assert sent[ahead.event_id]["timestamp"] <= outcome.iso(dt.datetime.now(dt.UTC))
        assert sent[anonymous.event_id]["external_customer_id"] == "acme"
        assert "customer_id" not in sent[anonymous.event_id]
        assert fake.violations == []
    finally:
        await a.aclose()
        fake.stop()


async def test_polar_halves_a_batch_that_is_too_large(plans) -> None:
    fake = FakePolar({"cus_1"}).start()
    a = polar.adapter(Endpoint(POLAR_KEY, fake.url), plans.meters, 0.5)
    try:
        fake.inject(Fault("status", 413, body={"detail": "Request Entity Too Large"}))
        r = report(domain.Provider.POLAR, *[event() for _ in range(10)])
        assert await a.send(r) == outcome.Delivered()
        assert fake.batch_sizes == [5, 5]
    finally:
        await a.aclose()
        fake.stop()


async def test_dodo_parks_events_older_than_its_window(plans) -> None:
    fake = FakeDodo({"cus_1"}).start()
    a = dodo_payments.adapter(Endpoint(DODO_KEY, fake.url), plans.meters, 0.5)
    try:
        stale = event(when=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=61))
        fresh = event()
        answer = await a.send(report(domain.Provider.DODO_PAYMENTS, stale, fresh))
        assert answer == outcome.Rejected(
            {stale.event_id: f"dodo_payments: {dodo_payments.TOO_OLD}"}
        )
        assert set(fake.accepted) == {fresh.event_id}
        assert fake.violations == []
    finally:
        await a.aclose()
        fake.stop()


async def test_bad_credentials_are_permanent(case, fake, plans) -> None:
    a = case.make(Endpoint("wrong", fake.url), plans.meters, 0.5)
    try:
        answer = await a.send(report(case.provider, event()))
        assert isinstance(answer, outcome.Failed) and "401" in answer.reason
    finally:
        await a.aclose()
