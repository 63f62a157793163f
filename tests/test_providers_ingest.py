"""Polar, Dodo Payments and Creem adapters against fakes: one provider event per usage event,
our event id as the dedupe key, batch caps, timestamp windows, all-or-nothing rejections, every
success body read, and properties that reach each provider whole or are refused when recorded."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
import httpx
import prometheus_client
import pytest
from conftest import Service
from fakes import event, report
from fakes.base import Fault
from fakes.ingest import CREEM_KEY, DODO_KEY, POLAR_KEY, FakeCreem, FakeDodo, FakeIngest, FakePolar
from helpers import details, record

from usage.v1 import customer_pb2, usage_pb2
from usage_service import domain
from usage_service.domain import plans
from usage_service.domain.plans import Meter
from usage_service.domain.reports import ReportEvent
from usage_service.providers import creem, dodo_payments, ingest, outcome, polar
from usage_service.providers.config import Endpoint

pytestmark = pytest.mark.slow  # over HTTP against the fake providers, timeouts included

POLAR_1 = "3d5e7f90-1a2b-4c3d-8e4f-5a6b7c8d9e0f"
POLAR_2 = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"
POLAR_UNKNOWN = "00000000-0000-4000-8000-000000000000"


@dataclasses.dataclass(frozen=True)
class Case:
    provider: domain.Provider
    fake: type[FakeIngest]
    key: str
    make: Callable[[Endpoint, Mapping[str, Meter], float], ingest.Ingest]
    cap: int
    customers: tuple[str, str, str]  # two known provider customer ids, then an unknown one

    def event(self, **fields: Any) -> ReportEvent:
        fields.setdefault("provider_customer_id", self.customers[0])
        return event(**fields)


CASES = [
    Case(
        domain.Provider.POLAR,
        FakePolar,
        POLAR_KEY,
        polar.adapter,
        polar.BATCH,
        (POLAR_1, POLAR_2, POLAR_UNKNOWN),
    ),
    Case(
        domain.Provider.DODO_PAYMENTS,
        FakeDodo,
        DODO_KEY,
        dodo_payments.adapter,
        100,
        ("cus_1", "cus_2", "cus_unknown"),
    ),
    Case(
        domain.Provider.CREEM,
        FakeCreem,
        CREEM_KEY,
        creem.adapter,
        100,
        ("cus_1", "cus_2", "cus_unknown"),
    ),
]


@pytest.fixture(params=CASES, ids=lambda c: c.provider.value)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def fake(case: Case) -> Iterator[FakeIngest]:
    server = case.fake(case.customers[:2]).start()
    yield server
    server.stop()


@pytest.fixture
async def adapter(case: Case, fake: FakeIngest, plans: plans.Plans) -> ingest.Ingest:
    a = case.make(Endpoint(case.key, fake.url), plans.meters, 0.5)
    yield a
    await a.aclose()


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _duplicates(provider: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "usage_provider_duplicate_events_total", {"provider": provider}
    )
    return value or 0.0


async def test_wire_format_of_one_event(case, fake, adapter) -> None:
    e = case.event(quantity=42, region="eu")
    assert await adapter.send(report(case.provider, e)) == outcome.Delivered()
    (call,) = fake.writes()
    (sent,) = json.loads(call.body)["events"]
    stamp = _iso(e.event_time)
    if case.provider is domain.Provider.POLAR:
        assert call.headers["authorization"] == f"Bearer {POLAR_KEY}"
        assert call.headers["polar-version"] == "2026-10"
        assert sent == {
            "name": "tokens",
            "external_id": e.event_id,
            "customer_id": POLAR_1,
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
            "properties": {"value": 42, "region": "eu"},
        }
    assert fake.violations == []


async def test_batches_stay_within_the_cap_and_resends_dedupe(case, fake, adapter) -> None:
    events = [case.event(quantity=1) for _ in range(case.cap * 2 + 1)]
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
    r = report(case.provider, case.event(quantity=3), case.event(quantity=4))
    answer = await adapter.send(r)
    assert isinstance(answer, outcome.Retry) and answer.after == after
    assert await adapter.send(r) == outcome.Delivered()
    assert sorted(
        e["event_id" if "event_id" in e else "external_id"] for e in fake.accepted.values()
    ) == sorted(x.event_id for x in r.events)
    assert fake.violations == []


async def test_an_all_or_nothing_rejection_sets_the_bad_event_aside(case, fake, adapter) -> None:
    good = [case.event(quantity=i) for i in range(1, 8)]
    bad = case.event(provider_customer_id=case.customers[2])
    r = report(case.provider, *good[:3], bad, *good[3:])
    answer = await adapter.send(r)
    assert isinstance(answer, outcome.Rejected), answer
    assert list(answer.reasons) == [bad.event_id]
    assert "not" in answer.reasons[bad.event_id].lower()  # the provider's own words
    assert set(fake.accepted) == {e.event_id for e in good}
    assert fake.violations == []


async def test_bad_credentials_are_permanent(case, fake, plans) -> None:
    a = case.make(Endpoint("wrong", fake.url), plans.meters, 0.5)
    try:
        answer = await a.send(report(case.provider, case.event()))
        assert isinstance(answer, outcome.Failed) and "401" in answer.reason
    finally:
        await a.aclose()


async def test_every_property_reaches_the_provider_beside_the_value(case, fake, adapter) -> None:
    """49 properties of the longest key and value the service accepts, and the value: the most
    a provider that keeps properties holds (50 keys), every one of them arrives."""
    props = {f"{i:02d}".ljust(40, "k"): "v" * 500 for i in range(49)}
    e = case.event(quantity=7, **props)
    assert await adapter.send(report(case.provider, e)) == outcome.Delivered()
    (sent,) = json.loads(fake.writes()[0].body)["events"]
    bag = sent["properties" if case.provider is domain.Provider.CREEM else "metadata"]
    assert bag == {"value": 7, **props}
    assert fake.violations == []


async def test_a_property_a_provider_cannot_keep_is_set_aside_never_dropped(
    case, fake, adapter
) -> None:
    """Events recorded before the limits were aligned: 50 properties (51 keys with the value),
    or a property named like the value key, are parked with a reason, not sent truncated."""
    many = case.event(**{f"p{i:02d}": "x" for i in range(50)})
    clash = case.event(quantity=3, value="7")
    wide = case.event(emoji="\U0001f600" * 300)  # 300 characters, 600 UTF-16 code units
    fine = case.event()
    answer = await adapter.send(report(case.provider, many, clash, wide, fine))
    assert isinstance(answer, outcome.Rejected)
    assert set(answer.reasons) == {many.event_id, clash.event_id, wide.event_id}
    assert "50 properties and the value exceed 50 keys" in answer.reasons[many.event_id]
    assert "value key" in answer.reasons[clash.event_id]
    assert "'emoji'" in answer.reasons[wide.event_id]
    assert set(fake.accepted) == {fine.event_id}
    assert fake.violations == []


# --- record time: what every provider keeps ----------------------------------------------------


async def test_record_refuses_properties_a_provider_could_not_keep(service: Service) -> None:
    cases = [
        (record(**{f"p{i:02d}": "x" for i in range(50)}), "properties"),
        (record(value="7"), "properties['value']"),
        (record(_llm="gpt"), "properties['_llm']"),
        (record(**{"k" * 41: "v"}), f"properties[{'k' * 41!r}]"),
        (record(big="v" * 501), "properties['big']"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.usage.RecordUsage(request)
        d = details(caught.value)
        assert d.code == grpc.StatusCode.INVALID_ARGUMENT, field
        assert set(d.fields) == {field}
        assert d.fields[field]
    assert await service.count_events() == 0
    most = {f"{i:02d}".ljust(40, "k"): "v" * 500 for i in range(49)}
    assert not (await service.usage.RecordUsage(record(**most))).duplicate


async def test_consume_refuses_a_property_named_like_the_value_key(service: Service) -> None:
    await service.add_customer("cus_1")
    request = usage_pb2.CheckEntitlementRequest(
        customer_id="cus_1",
        feature="tokens",
        quantity=1,
        consume=True,
        idempotency_key="k",
        properties={"value": "1"},
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.CheckEntitlement(request)
    assert set(details(caught.value).fields) == {"properties['value']"}


async def test_upsert_refuses_a_polar_customer_id_that_is_not_a_uuid(service: Service) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.add_customer(
            "c_p", provider=customer_pb2.PROVIDER_POLAR, provider_customer_id="pol_1"
        )
    d = details(caught.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(d.fields) == {"customer.provider_customer_id"}
    assert "UUID" in d.fields["customer.provider_customer_id"]
    saved = await service.add_customer(
        "c_p", provider=customer_pb2.PROVIDER_POLAR, provider_customer_id=POLAR_1
    )
    assert saved.provider_customer_id == POLAR_1
    await service.add_customer(  # other providers' ids are not UUIDs
        "c_c", provider=customer_pb2.PROVIDER_CREEM, provider_customer_id="cust_1"
    )
    await service.add_customer("c_e", provider=customer_pb2.PROVIDER_POLAR)  # external


# --- Polar ----------------------------------------------------------------------------------


@pytest.fixture
async def polar_pair(plans: plans.Plans) -> Any:
    fake = FakePolar({POLAR_1}).start()
    a = polar.adapter(Endpoint(POLAR_KEY, fake.url), plans.meters, 0.5)
    yield fake, a
    await a.aclose()
    fake.stop()


async def test_polar_clamps_future_timestamps_with_a_clock_skew_margin(polar_pair) -> None:
    fake, a = polar_pair
    ahead = event(when=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=4), provider_customer_id="")
    just_now = event(when=dt.datetime.now(dt.UTC), provider_customer_id=POLAR_1)
    assert await a.send(report(domain.Provider.POLAR, ahead, just_now)) == outcome.Delivered()
    after = dt.datetime.now(dt.UTC)
    sent = {e["external_id"]: e for e in fake.accepted.values()}
    for e in (ahead, just_now):
        assert sent[e.event_id]["timestamp"] <= _iso(after - polar.CLOCK_SKEW)
    assert sent[ahead.event_id]["external_customer_id"] == "c1"
    assert "customer_id" not in sent[ahead.event_id]
    assert fake.violations == []


async def test_polar_pins_its_version_header(polar_pair) -> None:
    fake, a = polar_pair
    assert await a.send(report(domain.Provider.POLAR, event(provider_customer_id=POLAR_1))) == (
        outcome.Delivered()
    )
    (call,) = fake.writes()
    assert call.headers["polar-version"] == polar.VERSION == "2026-10"
    assert fake.violations == []


async def test_polar_sets_aside_a_customer_id_that_is_not_a_uuid(polar_pair) -> None:
    fake, a = polar_pair
    bad, good = event(provider_customer_id="pol_1"), event(provider_customer_id=POLAR_1)
    answer = await a.send(report(domain.Provider.POLAR, bad, good))
    assert isinstance(answer, outcome.Rejected) and list(answer.reasons) == [bad.event_id]
    assert "UUID" in answer.reasons[bad.event_id]
    assert set(fake.accepted) == {good.event_id}
    assert fake.violations == []


async def test_polar_halves_a_batch_that_is_too_large(polar_pair) -> None:
    fake, a = polar_pair
    fake.inject(Fault("status", 413, body={"detail": "Request Entity Too Large"}))
    r = report(domain.Provider.POLAR, *[event(provider_customer_id=POLAR_1) for _ in range(10)])
    assert await a.send(r) == outcome.Delivered()
    assert fake.batch_sizes == [5, 5]


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.provider is not domain.Provider.CREEM],  # Creem reports none
    indirect=True,
    ids=lambda c: c.provider.value,
)
async def test_duplicates_reported_by_a_provider_are_counted(case, fake, adapter) -> None:
    events = [case.event() for _ in range(3)]
    assert await adapter.send(report(case.provider, *events)) == outcome.Delivered()
    before = _duplicates(case.provider.value)
    new = case.event()
    assert await adapter.send(report(case.provider, *events, new)) == outcome.Delivered()
    assert _duplicates(case.provider.value) == before + 3
    assert fake.violations == []


async def test_an_unreadable_success_body_delivers_and_logs(
    case, fake, adapter, caplog: pytest.LogCaptureFixture
) -> None:
    status = 202 if case.provider is domain.Provider.CREEM else 200
    fake.inject(Fault("status", status, body="ok"))
    with caplog.at_level(logging.WARNING, "usage_service.providers.ingest"):
        answer = await adapter.send(report(case.provider, case.event()))
    assert answer == outcome.Delivered()
    assert "success body not understood" in caplog.text


# --- Dodo Payments --------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    ("fault", "want"),
    [
        (Fault("status", 500, {"x-should-retry": "false"}, {"code": "E", "message": "no"}), None),
        (Fault("status", 429, {"x-should-retry": "false"}, {"code": "E", "message": "no"}), None),
        (Fault("status", 403, {"x-should-retry": "true"}, {"code": "E", "message": "busy"}), 0.0),
        (Fault("status", 429, {"retry-after-ms": "1500", "retry-after": "9"}, {}), 1.5),
        (Fault("status", 503, {"retry-after": "9"}, {}), 9.0),
        (Fault("status", 503, {"retry-after-ms": "0"}, {}), 0.0),
    ],
)
async def test_dodo_obeys_should_retry_and_retry_after_ms(plans, fault, want) -> None:
    """`want`: None = permanent; otherwise a retry after that many seconds (0.0: the drain's
    own backoff decides)."""
    fake = FakeDodo({"cus_1"}).start()
    a = dodo_payments.adapter(Endpoint(DODO_KEY, fake.url), plans.meters, 0.5)
    try:
        fake.inject(fault)
        answer = await a.send(report(domain.Provider.DODO_PAYMENTS, event()))
        if want is None:
            assert isinstance(answer, outcome.Failed), answer
        else:
            assert isinstance(answer, outcome.Retry), answer
            assert answer.after == (want or None)
    finally:
        await a.aclose()
        fake.stop()


# --- Creem ----------------------------------------------------------------------------------


@pytest.fixture
async def creem_pair(plans: plans.Plans) -> Any:
    fake = FakeCreem({"cus_1"}, external={"acme"}, meters={"tokens"}, archived={"seats"}).start()
    a = creem.adapter(Endpoint(CREEM_KEY, fake.url), plans.meters, 0.5)
    yield fake, a
    await a.aclose()
    fake.stop()


async def test_creem_reads_its_error_object_and_sets_aside_only_the_named_event(
    creem_pair,
) -> None:
    fake, a = creem_pair
    good = [event() for _ in range(6)]
    bad = event(provider_customer_id="cus_unknown")
    answer = await a.send(report(domain.Provider.CREEM, *good[:4], bad, *good[4:]))
    assert answer == outcome.Rejected(
        {
            bad.event_id: "creem 422: events[4].customer_id: customer_not_found: "
            "No customer 'cus_unknown' in this store"
        }
    )
    assert len(fake.writes()) == 2  # refused once, then the rest: no halving
    assert set(fake.accepted) == {e.event_id for e in good}
    assert fake.violations == []


async def test_creem_sends_a_customer_without_a_creem_id_as_external_customer_id(
    creem_pair,
) -> None:
    fake, a = creem_pair
    known = event(customer_id="acme", provider_customer_id="")
    unknown = event(customer_id="globex", provider_customer_id="")
    invalid = event(customer_id="a b", provider_customer_id="")
    answer = await a.send(report(domain.Provider.CREEM, known, unknown, invalid))
    assert isinstance(answer, outcome.Rejected)
    assert set(answer.reasons) == {unknown.event_id, invalid.event_id}
    assert "events[1].external_customer_id: customer_not_found" in answer.reasons[unknown.event_id]
    assert "external_customer_id" in answer.reasons[invalid.event_id]
    sent = fake.accepted[known.event_id]
    assert sent["external_customer_id"] == "acme" and "customer_id" not in sent
    assert fake.violations == []


async def test_creem_events_it_will_never_bill_are_rejected_with_its_reason(creem_pair) -> None:
    fake, a = creem_pair
    billed = event(meter="tokens", quantity=5)
    no_meter = event(meter="calls")
    archived = event(meter="seats")
    answer = await a.send(report(domain.Provider.CREEM, billed, no_meter, archived))
    assert isinstance(answer, outcome.Rejected)
    assert answer.reasons[no_meter.event_id].startswith("creem: no_matching_meter: ")
    assert answer.reasons[archived.event_id].startswith("creem: meter_archived: ")
    assert set(answer.reasons) == {no_meter.event_id, archived.event_id}
    assert len(fake.writes()) == 1  # stored by Creem: nothing is sent again
    assert fake.totals() == {("cus_1", "tokens"): 5}
    assert fake.violations == []


# --- the fakes hold to the SDKs' schemas ----------------------------------------------------


def _post(fake: FakeIngest, headers: dict[str, str], events: list[dict[str, Any]]) -> Any:
    path = fake.write_route.split(" ", 1)[1]
    return httpx.post(fake.url + path, headers=headers, json={"events": events}, timeout=5)


def test_the_polar_fake_refuses_what_polar_refuses() -> None:
    fake = FakePolar({POLAR_1}).start()
    try:
        auth = {"Authorization": f"Bearer {POLAR_KEY}"}
        now = dt.datetime.now(dt.UTC)
        ok = {"name": "tokens", "external_id": "e1", "timestamp": _iso(now), "metadata": {}}
        for version in (None, "2099-01"):
            headers = auth | ({"Polar-Version": version} if version else {})
            assert _post(fake, headers, [ok | {"customer_id": POLAR_1}]).status_code == 404
        headers = auth | {"Polar-Version": "2026-10"}
        bad = ok | {"customer_id": "x", "external_id": "e2"}
        answer = _post(fake, headers, [ok | {"customer_id": POLAR_1}, bad])
        assert answer.status_code == 422
        assert answer.json()["detail"][0]["loc"] == ["body", "events", 1, "customer_id"]
        future = _iso(now + dt.timedelta(seconds=30))
        answer = _post(fake, headers, [ok | {"customer_id": POLAR_1, "timestamp": future}])
        assert answer.json()["detail"][0]["loc"] == ["body", "events", 0, "timestamp"]
        assert len(fake.violations) == 4
        assert fake.accepted == {}
        answer = _post(fake, headers, [ok | {"customer_id": POLAR_1}])
        assert answer.json() == {"inserted": 1, "duplicates": 0}
    finally:
        fake.stop()


def test_the_creem_fake_refuses_metadata_and_warns_about_unknown_meters() -> None:
    fake = FakeCreem({"cus_1"}, meters={"tokens"}).start()
    try:
        headers = {"x-api-key": CREEM_KEY}
        ok = {"name": "tokens", "customer_id": "cus_1", "event_id": "e1", "properties": {}}
        answer = _post(fake, headers, [ok | {"metadata": {"a": "b"}}])
        assert answer.status_code == 422
        error = answer.json()["error"]
        assert error["param"] == "events[0].metadata"
        assert {"type", "code", "message", "param", "request_id"} <= set(error)
        assert len(fake.violations) == 1 and fake.accepted == {}
        answer = _post(fake, headers, [ok, ok | {"event_id": "e2", "name": "calls"}])
        assert answer.status_code == 202
        body = answer.json()
        assert body["accepted"] == 2 and body["event_ids"] == ["e1", "e2"]
        ((warning),) = body["warnings"]
        assert (warning["index"], warning["code"]) == (1, "no_matching_meter")
        assert warning["message"]
    finally:
        fake.stop()
