"""Prepaid credits through a real server: grants, burn order, prepaid billing, spend ceilings."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import tomllib
import uuid
from collections.abc import AsyncIterator

import alerts_support
import grpc
import pytest
from conftest import Service, differences
from helpers import details

from usage.v1 import credit_pb2, credit_pb2_grpc, customer_pb2, usage_pb2
from usage_service import domain
from usage_service.domain import credits, periods
from usage_service.domain import plans as plans_mod
from usage_service.domain.credits import Grant, GrantSource
from usage_service.domain.periods import Period
from usage_service.settings import plans_file
from usage_service.storage import connections, history, store

PLANS = """
[meters.tokens]
aggregation = "sum"
[meters.calls]
aggregation = "count"
[meters.storage]
aggregation = "max"

[plans.bundle]
[plans.bundle.features.tokens]
billing = "prepaid"
[plans.bundle.features.tokens.grant]
amount = 1000
priority = 5
rollover_cap = 500
[plans.bundle.features.calls]
billing = "prepaid"
overage = false

[plans.alerting]
[plans.alerting.features.tokens]
billing = "prepaid"
overage = false
balance_alerts = [500, 0]

[plans.credits_only]
[plans.credits_only.features.tokens]
billing = "prepaid"
overage = false
[plans.credits_only.features.calls]
billing = "prepaid"
overage = false

[plans.capped]
[plans.capped.features.tokens]
limit = 100
enforcement = "soft"
ceiling = 150
"""


@pytest.fixture
def plans() -> plans_mod.Plans:
    return plans_file.parse(tomllib.loads(PLANS), "credits.toml")


@pytest.fixture
def grants(service: Service) -> credit_pb2_grpc.CreditServiceStub:
    return credit_pb2_grpc.CreditServiceStub(service.channel)


def _key() -> str:
    return uuid.uuid4().hex


def _grant(
    customer_id: str,
    amount: int,
    feature: str = "tokens",
    priority: int = 0,
    expires_in: dt.timedelta | None = None,
    key: str = "",
) -> credit_pb2.CreateGrantRequest:
    out = credit_pb2.CreateGrantRequest(
        customer_id=customer_id,
        feature=feature,
        amount=amount,
        priority=priority,
        idempotency_key=key or _key(),
    )
    if expires_in is not None:
        out.expire_time.FromDatetime(dt.datetime.now(dt.UTC) + expires_in)
    return out


def _consume(
    customer_id: str, quantity: int, feature: str = "tokens"
) -> usage_pb2.CheckEntitlementRequest:
    return usage_pb2.CheckEntitlementRequest(
        customer_id=customer_id,
        feature=feature,
        quantity=quantity,
        consume=True,
        idempotency_key=_key(),
    )


def _record(
    customer_id: str, quantity: int, feature: str = "tokens"
) -> usage_pb2.RecordUsageRequest:
    return usage_pb2.RecordUsageRequest(
        customer_id=customer_id, meter=feature, quantity=quantity, idempotency_key=_key()
    )


async def _summary(service: Service, customer_id: str, meter: str) -> usage_pb2.MeterUsage:
    answer = await service.usage.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(customer_id=customer_id, meter=meter)
    )
    (found,) = answer.meters
    assert isinstance(found, usage_pb2.MeterUsage)
    return found


async def test_the_plan_grant_pays_for_usage_and_the_rest_is_billable_overage(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.add_customer(
        "c1", "bundle", provider=customer_pb2.PROVIDER_STRIPE, provider_customer_id="cus_c1"
    )
    await service.usage.RecordUsage(_record("c1", 300))
    tokens = await _summary(service, "c1", "tokens")
    assert (tokens.billing, tokens.granted, tokens.burned, tokens.balance) == (
        "prepaid",
        1000,
        300,
        700,
    )
    assert (tokens.covered, tokens.billable_overage, tokens.pending) == (300, 0, 0)
    assert tokens.HasField("next_expire_time")

    await service.usage.RecordUsage(_record("c1", 800))  # 700 covered, 100 over
    tokens = await _summary(service, "c1", "tokens")
    assert (tokens.used, tokens.covered, tokens.billable_overage) == (1100, 1000, 100)
    assert (tokens.balance, tokens.unbilled, tokens.pending) == (0, 0, 100)
    rows = await service.db.fetch(
        "SELECT quantity, covered, report_state FROM usage_events WHERE customer_id = 'c1' "
        "ORDER BY seq"
    )
    assert [tuple(r) for r in rows] == [(300, 300, "covered"), (800, 700, "pending")]

    listed = await grants.ListGrants(credit_pb2.ListGrantsRequest(customer_id="c1"))
    assert list(listed.grants) == []  # spent grants are listed only when asked for
    listed = await grants.ListGrants(
        credit_pb2.ListGrantsRequest(customer_id="c1", include_inactive=True)
    )
    (plan_grant,) = listed.grants
    assert (plan_grant.amount, plan_grant.burned, plan_grant.remaining) == (1000, 1000, 0)
    assert plan_grant.state == credit_pb2.GRANT_STATE_SPENT
    assert (plan_grant.priority, plan_grant.source) == (5, credit_pb2.GRANT_SOURCE_PLAN)


async def test_usage_burns_grants_by_priority_then_expiry_then_age(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.add_customer("c1", "credits_only")
    hour = dt.timedelta(hours=1)
    made: dict[str, credit_pb2.Grant] = {}
    for name, request in [
        ("late_low", _grant("c1", 100, priority=1, expires_in=2 * hour)),
        ("soon_low_old", _grant("c1", 100, priority=1, expires_in=hour)),
        ("never_high", _grant("c1", 50, priority=0)),
        ("soon_low_new", _grant("c1", 100, priority=1, expires_in=hour)),
        ("never_low", _grant("c1", 100, priority=1)),
    ]:
        if name == "soon_low_new":  # the same expiry as soon_low_old: the older burns first
            request.expire_time.CopyFrom(made["soon_low_old"].expire_time)
        made[name] = (await grants.CreateGrant(request)).grant

    answer = await service.usage.CheckEntitlement(_consume("c1", 230))
    assert answer.allowed and (answer.covered, answer.balance) == (230, 220)
    everything = credit_pb2.ListGrantsRequest(customer_id="c1", include_inactive=True)
    by_id = {g.grant_id: g for g in (await grants.ListGrants(everything)).grants}
    burned = {name: by_id[g.grant_id].burned for name, g in made.items()}
    assert burned == {
        "never_high": 50,
        "soon_low_old": 100,
        "soon_low_new": 80,
        "late_low": 0,
        "never_low": 0,
    }
    listed = await grants.ListGrants(credit_pb2.ListGrantsRequest(customer_id="c1"))
    order = [g.grant_id for g in listed.grants]
    assert order == [made[n].grant_id for n in ("soon_low_new", "late_low", "never_low")]
    burns = await service.db.fetch("SELECT grant_id::text, amount FROM credit_burns")
    assert sorted((r["grant_id"], r["amount"]) for r in burns) == sorted(
        [
            (made["never_high"].grant_id, 50),
            (made["soon_low_old"].grant_id, 100),
            (made["soon_low_new"].grant_id, 80),
        ]
    )


async def test_sixty_four_concurrent_consumers_spend_exactly_the_balance_in_burn_order(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub, dsn: str
) -> None:
    await service.add_customer("c1", "credits_only")
    hour = dt.timedelta(hours=1)
    made = [
        (await grants.CreateGrant(r)).grant
        for r in [
            _grant("c1", 333, priority=2),
            _grant("c1", 250, priority=1, expires_in=3 * hour),
            _grant("c1", 101, priority=1, expires_in=hour),
            _grant("c1", 200, priority=0, expires_in=5 * hour),
            _grant("c1", 116, priority=2, expires_in=hour),
        ]
    ]
    total = sum(g.amount for g in made)  # 1000

    async def consumer(i: int) -> list[int]:
        taken = []
        for j in range(8):
            quantity = 1 + (i * 7 + j * 3) % 5
            answer = await service.usage.CheckEntitlement(_consume("c1", quantity))
            if answer.allowed:
                assert answer.covered == quantity
                taken.append(quantity)
            else:
                assert answer.reason == usage_pb2.ENTITLEMENT_REASON_BALANCE_EXHAUSTED
                assert answer.balance < quantity
        return taken

    taken = [q for got in await asyncio.gather(*(consumer(i) for i in range(64))) for q in got]
    # 64 x 8 consumes of 1..5 ask for far more than the balance: it ends below 5 units
    spent = sum(taken)
    left = (await _summary(service, "c1", "tokens")).balance
    assert spent + left == total and left < 5
    used = await service.db.fetchval(
        "SELECT sum(quantity) FROM usage_events WHERE customer_id = 'c1'"
    )
    assert used == spent
    # burn order: each grant is spent before the next one is touched
    order = [
        g.grant_id
        for g in credits.in_burn_order(
            Grant(
                "c1",
                g.grant_id,
                "tokens",
                g.amount,
                g.priority,
                g.effective_time.ToDatetime(dt.UTC),
                g.expire_time.ToDatetime(dt.UTC) if g.HasField("expire_time") else None,
                GrantSource.TOP_UP,
                g.idempotency_key,
                g.create_time.ToDatetime(dt.UTC),
            )
            for g in made
        )
    ]
    burned = {
        r["grant_id"]: r["burned"]
        for r in await service.db.fetch("SELECT grant_id::text, burned FROM credit_grants")
    }
    amounts = {g.grant_id: g.amount for g in made}
    states = [burned[g] == amounts[g] for g in order]
    assert states == sorted(states, reverse=True)  # full ones first, then the rest
    assert sum(1 for g in order if 0 < burned[g] < amounts[g]) <= 1
    assert await differences(dsn) == []


async def test_a_consume_that_grants_cannot_cover_is_denied_and_records_nothing(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.add_customer("c1", "credits_only")
    answer = await service.usage.CheckEntitlement(_consume("c1", 1))
    assert not answer.allowed
    assert answer.reason == usage_pb2.ENTITLEMENT_REASON_BALANCE_EXHAUSTED
    assert answer.balance == 0 and answer.HasField("balance")
    await grants.CreateGrant(_grant("c1", 10))
    denied = await service.usage.CheckEntitlement(_consume("c1", 11))
    assert not denied.allowed and denied.balance == 10
    assert await service.count_events("c1") == 0
    check = await service.usage.CheckEntitlement(
        usage_pb2.CheckEntitlementRequest(customer_id="c1", feature="tokens", quantity=10)
    )
    assert check.allowed and check.balance == 10
    allowed = await service.usage.CheckEntitlement(_consume("c1", 10))
    assert allowed.allowed and (allowed.covered, allowed.balance) == (10, 0)
    assert allowed.reason == usage_pb2.ENTITLEMENT_REASON_WITHIN_LIMIT
    empty = await service.usage.CheckEntitlement(
        usage_pb2.CheckEntitlementRequest(customer_id="c1", feature="tokens")
    )
    assert not empty.allowed and empty.reason == usage_pb2.ENTITLEMENT_REASON_BALANCE_EXHAUSTED


async def test_a_count_meter_event_is_covered_whole_by_one_unit(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.add_customer("c1", "credits_only")
    await grants.CreateGrant(_grant("c1", 2, feature="calls"))
    answers = [await service.usage.CheckEntitlement(_consume("c1", 5, "calls")) for _ in range(3)]
    assert [a.allowed for a in answers] == [True, True, False]
    assert [a.covered for a in answers[:2]] == [1, 1]
    rows = await service.db.fetch(
        "SELECT quantity, covered, report_state FROM usage_events ORDER BY seq"
    )
    assert [tuple(r) for r in rows] == [(5, 5, "covered"), (5, 5, "covered")]
    calls = await _summary(service, "c1", "calls")
    assert (calls.used, calls.covered, calls.balance, calls.pending) == (2, 2, 0, 0)


async def test_a_void_between_two_consumes_removes_the_remainder(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.add_customer("c1", "credits_only")
    grant = (await grants.CreateGrant(_grant("c1", 100))).grant
    assert (await service.usage.CheckEntitlement(_consume("c1", 30))).allowed
    voided = await grants.VoidGrant(
        credit_pb2.VoidGrantRequest(customer_id="c1", grant_id=grant.grant_id)
    )
    assert voided.voided == 70
    assert voided.grant.state == credit_pb2.GRANT_STATE_VOIDED
    assert (voided.grant.burned, voided.grant.remaining, voided.grant.forfeited) == (30, 0, 70)
    after = await service.usage.CheckEntitlement(_consume("c1", 1))
    assert not after.allowed and after.balance == 0
    again = await grants.VoidGrant(
        credit_pb2.VoidGrantRequest(customer_id="c1", grant_id=grant.grant_id)
    )
    assert again.voided == 0 and again.grant.void_time == voided.grant.void_time
    listed = await grants.ListGrants(credit_pb2.ListGrantsRequest(customer_id="c1"))
    assert list(listed.grants) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grants.VoidGrant(
            credit_pb2.VoidGrantRequest(customer_id="c2", grant_id=grant.grant_id)
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_top_up_during_a_burst_of_consumes_is_spent_exactly_once(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.add_customer("c1", "credits_only")
    done = 0
    half = asyncio.Event()

    async def consumer() -> int:
        nonlocal done
        allowed = 0
        for _ in range(20):
            answer = await service.usage.CheckEntitlement(_consume("c1", 1))
            allowed += answer.allowed
            done += 1
            if done >= 40:
                half.set()
        return allowed

    async def top_up() -> None:
        await half.wait()
        await grants.CreateGrant(_grant("c1", 50))

    results = await asyncio.gather(*(consumer() for _ in range(16)), top_up())
    allowed = sum(r for r in results if r is not None)
    # The burst may end before the top-up commits (it does on a loaded cluster): whatever is
    # left of the 50 units is spent by the consumes after it, one each, and no unit twice.
    while (await service.usage.CheckEntitlement(_consume("c1", 1))).allowed:
        allowed += 1
    assert allowed == 50
    tokens = await _summary(service, "c1", "tokens")
    assert (tokens.used, tokens.covered, tokens.balance) == (50, 50, 0)


async def test_a_soft_limit_with_a_ceiling_holds_under_concurrency(service: Service) -> None:
    await service.add_customer("c1", "capped")

    async def consumer() -> list[int]:
        return [(await service.usage.CheckEntitlement(_consume("c1", 1))).reason for _ in range(5)]

    reasons = [r for got in await asyncio.gather(*(consumer() for _ in range(40))) for r in got]
    assert reasons.count(usage_pb2.ENTITLEMENT_REASON_WITHIN_LIMIT) == 100
    assert reasons.count(usage_pb2.ENTITLEMENT_REASON_SOFT_LIMIT_EXCEEDED) == 50
    assert reasons.count(usage_pb2.ENTITLEMENT_REASON_LIMIT_EXCEEDED) == 50
    assert await service.count_events("c1") == 150
    tokens = await _summary(service, "c1", "tokens")
    assert (tokens.used, tokens.limit, tokens.ceiling) == (150, 100, 150)
    last = await service.usage.CheckEntitlement(
        usage_pb2.CheckEntitlementRequest(customer_id="c1", feature="tokens")
    )
    assert not last.allowed and last.rule.ceiling == 150


async def test_create_grant_is_idempotent_on_its_key(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.add_customer("c1", "credits_only")
    request = _grant("c1", 40, key="pack-1")
    first = await grants.CreateGrant(request)
    again = await grants.CreateGrant(request)
    assert again.duplicate and not first.duplicate
    assert again.grant.grant_id == first.grant.grant_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grants.CreateGrant(_grant("c1", 41, key="pack-1"))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert details(caught.value).reason == "IDEMPOTENCY_KEY_REUSED"
    assert await service.db.fetchval("SELECT count(*) FROM credit_grants") == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"customer_id": ""}, "customer_id"),
        ({"feature": ""}, "feature"),
        ({"feature": "ghost"}, "feature"),
        ({"feature": "storage"}, "feature"),
        ({"amount": 0}, "amount"),
        ({"amount": -5}, "amount"),
        ({"priority": -1}, "priority"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "plan:tokens:2026"}, "idempotency_key"),
        ({"idempotency_key": "rollover:x"}, "idempotency_key"),
        ({"idempotency_key": "k" * 256}, "idempotency_key"),
        ({"expire_in": -60}, "expire_time"),
        ({"effective_in": -3600}, "effective_time"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, dict) else str(v),
)
async def test_a_bad_grant_is_refused_naming_its_field_and_stores_nothing(
    service: Service,
    grants: credit_pb2_grpc.CreditServiceStub,
    change: dict[str, object],
    field: str,
) -> None:
    await service.add_customer("c1", "credits_only")
    request = _grant("c1", 10)
    now = dt.datetime.now(dt.UTC)
    for name, value in change.items():
        if name == "expire_in":
            request.expire_time.FromDatetime(now + dt.timedelta(seconds=int(str(value))))
        elif name == "effective_in":
            request.effective_time.FromDatetime(now + dt.timedelta(seconds=int(str(value))))
        else:
            setattr(request, name, value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grants.CreateGrant(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in details(caught.value).fields
    assert await service.db.fetchval("SELECT count(*) FROM credit_grants") == 0


async def test_grants_need_a_known_customer(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grants.CreateGrant(_grant("nobody", 10))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grants.ListGrants(credit_pb2.ListGrantsRequest(customer_id="nobody"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# --- at the store, with times chosen by the test ---


@pytest.fixture
async def st(dsn: str, plans: plans_mod.Plans) -> AsyncIterator[store.Store]:
    s = store.Store(await connections.create_pool(dsn, size=5), plans=plans)
    s.clock = lambda: T0  # what recording takes as now, unless a test moves it
    yield s
    await s.close()


T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


async def _customer(st: store.Store, plan_id: str, start: dt.datetime = T0) -> domain.Customer:
    c = domain.Customer(
        customer_id="c1",
        plan_id=plan_id,
        subscription_status=domain.SubscriptionStatus.ACTIVE,
        period_start=start,
        period_end=start + dt.timedelta(days=31),
        cadence=periods.Cadence(periods.Interval.MONTH, 1, start),
    )
    saved, _ = await st.upsert_customer(c, history.CadenceRequest(), start)
    return saved


def _top_up(amount: int, expires: dt.datetime | None, at: dt.datetime = T0, key: str = "") -> Grant:
    return Grant(
        customer_id="c1",
        grant_id=str(uuid.uuid4()),
        feature="tokens",
        amount=amount,
        priority=0,
        effective_at=at,
        expires_at=expires,
        source=GrantSource.TOP_UP,
        idempotency_key=key or _key(),
        created_at=at,
    )


async def _consume_at(
    st: store.Store, plans: plans_mod.Plans, quantity: int, when: dt.datetime
) -> store.Consumed:
    event = domain.UsageEvent(
        event_id=str(uuid.uuid4()),
        customer_id="c1",
        meter="tokens",
        quantity=quantity,
        idempotency_key=_key(),
        event_time=when,
        properties={},
        payload_hash=domain.payload_hash("tokens", quantity, None, {}),
    )

    def decide(c: domain.Customer, totals: domain.Totals, balance: int | None) -> domain.Decision:
        feature = plans.plans[c.plan_id].metered["tokens"]
        return domain.decide(feature, plans.meters["tokens"].aggregation, totals, quantity, balance)

    return await st.consume(
        event, lambda c: domain.gate(c, plans, "tokens"), decide, ("credits_only", "bundle")
    )


async def test_a_grant_expires_at_its_instant_between_two_consumes(
    st: store.Store, plans: plans_mod.Plans
) -> None:
    customer = await _customer(st, "credits_only")
    expiry = T0 + dt.timedelta(days=2)
    await st.create_grant(_top_up(100, expiry), b"k", customer, _period())
    before = await _consume_at(st, plans, 30, expiry - dt.timedelta(microseconds=1))
    assert before.decision is not None and before.decision.allowed
    at = await _consume_at(st, plans, 1, expiry)
    assert at.decision is not None and not at.decision.allowed
    assert at.decision.reason is domain.Reason.BALANCE_EXHAUSTED and at.decision.balance == 0
    (grant,) = await st.list_grants(await _customer_row(st), {}, _period(), "tokens", expiry)
    assert (grant.burned, grant.forfeited(expiry)) == (30, 70)


async def test_a_late_event_burns_no_grant_that_has_expired_since(
    st: store.Store, plans: plans_mod.Plans, dsn: str
) -> None:
    customer = await _customer(st, "credits_only")
    expiry = T0 + dt.timedelta(days=2)
    await st.create_grant(_top_up(100, expiry), b"k", customer, _period())
    st.clock = lambda: expiry + dt.timedelta(hours=1)
    late = domain.UsageEvent(
        event_id=str(uuid.uuid4()),
        customer_id="c1",
        meter="tokens",
        quantity=10,
        idempotency_key="late",
        event_time=T0 + dt.timedelta(days=1),
        properties={},
        payload_hash=b"late",
    )
    await st.record([late])
    row = await st.pool.fetchrow("SELECT covered, report_state FROM usage_events")
    assert row is not None and (row["covered"], row["report_state"]) == (0, "unbilled")
    assert await st.pool.fetchval("SELECT burned FROM credit_grants") == 0
    st.clock = lambda: expiry - dt.timedelta(hours=1)
    await st.record([dataclasses.replace(late, event_id=str(uuid.uuid4()), idempotency_key="x")])
    assert await st.pool.fetchval("SELECT burned FROM credit_grants") == 10
    assert await differences(dsn) == []


async def test_the_unused_plan_grant_rolls_over_up_to_its_cap(
    st: store.Store, plans: plans_mod.Plans
) -> None:
    customer = await _customer(st, "bundle")
    first = _period()
    await _consume_at(st, plans, 300, T0 + dt.timedelta(days=3))
    second_start = first.end
    later = second_start + dt.timedelta(days=1)
    second = Period(second_start, second_start + dt.timedelta(days=30))
    feature = plans.plans["bundle"].metered["tokens"]
    credit = await st.credit(customer, {"tokens": feature}, second, later)
    assert credit["tokens"].balance == 1000 + 500  # 700 unused, capped at 500
    listed = await st.list_grants(customer, {"tokens": feature}, second, "tokens", later)
    sources = sorted((g.source.value, g.amount, g.burned) for g in listed)
    assert sources == [("plan", 1000, 0), ("plan", 1000, 300), ("rollover", 500, 0)]
    again = await st.credit(customer, {"tokens": feature}, second, later)
    assert again == credit  # made now, the same figures


def _period() -> Period:
    return Period(T0, T0 + dt.timedelta(days=31))


async def _customer_row(st: store.Store) -> domain.Customer:
    found = await st.get_customer("c1", T0)
    assert found is not None
    return found[0]


async def test_the_stream_shows_each_balance_change(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.add_customer("c1", "bundle")
    call = service.usage.WatchUsage(
        usage_pb2.WatchUsageRequest(customer_id="c1", meters=["tokens"])
    )
    stream = call.__aiter__()

    async def next_message() -> usage_pb2.WatchUsageResponse:
        async with asyncio.timeout(30):
            message = await stream.__anext__()
        assert isinstance(message, usage_pb2.WatchUsageResponse)
        return message

    def balance(message: usage_pb2.WatchUsageResponse) -> tuple[int, int, int]:
        (tokens,) = message.meters
        return tokens.granted, tokens.burned, tokens.balance

    snap = await next_message()
    assert snap.kind == usage_pb2.USAGE_CHANGE_KIND_SNAPSHOT
    assert balance(snap) == (1000, 0, 1000)  # the period's plan grant, before it is made
    await service.usage.RecordUsage(_record("c1", 300))
    used = await next_message()
    assert used.kind == usage_pb2.USAGE_CHANGE_KIND_USAGE
    assert balance(used) == (1000, 300, 700) and used.meters[0].covered == 300
    pack = (await grants.CreateGrant(_grant("c1", 50))).grant
    topped = await next_message()
    assert topped.kind == usage_pb2.USAGE_CHANGE_KIND_CREDIT
    assert balance(topped) == (1050, 300, 750) and topped.meters[0].used == 300
    await grants.VoidGrant(credit_pb2.VoidGrantRequest(customer_id="c1", grant_id=pack.grant_id))
    voided = await next_message()
    assert voided.kind == usage_pb2.USAGE_CHANGE_KIND_CREDIT
    assert balance(voided) == (1000, 300, 700)
    consumed = await service.usage.CheckEntitlement(_consume("c1", 700))
    assert consumed.allowed and consumed.balance == 0
    spent = await next_message()
    assert balance(spent) == (1000, 1000, 0)
    assert [spent.version, voided.version, topped.version, used.version] == sorted(
        [spent.version, voided.version, topped.version, used.version], reverse=True
    )
    call.cancel()


async def test_plan_grants_follow_the_periods_a_webhook_confirms(
    st: store.Store, plans: plans_mod.Plans, dsn: str
) -> None:
    customer = await _customer(st, "bundle")  # March: [T0, T0 + 31 days)
    first = _period()
    await _consume_at(st, plans, 100, T0 + dt.timedelta(days=1))
    extended = dataclasses.replace(customer, period_end=first.end + dt.timedelta(days=5))
    await st.upsert_customer(extended, history.CadenceRequest(), T0 + dt.timedelta(days=2))
    plan_grant = await st.pool.fetchrow("SELECT expires_at, voided_at FROM credit_grants")
    assert plan_grant is not None
    assert (plan_grant["expires_at"], plan_grant["voided_at"]) == (extended.period_end, None)
    # a late event in the days the webhook added still burns the period's grant
    late = await _consume_at(st, plans, 10, first.end + dt.timedelta(days=1))
    assert late.decision is not None and late.decision.covered == 10
    # the webhook that ends the period early takes the grant's end with it
    early = T0 + dt.timedelta(days=3)
    cut = dataclasses.replace(
        customer, period_start=early, period_end=early + dt.timedelta(days=30)
    )
    await st.upsert_customer(cut, history.CadenceRequest(), early)
    ends = await st.pool.fetch(
        "SELECT effective_at, expires_at FROM credit_grants ORDER BY effective_at"
    )
    assert [(r["effective_at"], r["expires_at"]) for r in ends] == [(T0, early)]
    after = await _consume_at(st, plans, 5, early + dt.timedelta(days=1))
    assert after.decision is not None and after.decision.balance == 1000 + 500
    assert await differences(dsn) == []


async def test_a_late_webhook_for_a_past_period_leaves_the_current_grants_alone(
    st: store.Store, plans: plans_mod.Plans
) -> None:
    customer = await _customer(st, "bundle")
    second = T0 + dt.timedelta(days=31)
    await _consume_at(st, plans, 100, T0 + dt.timedelta(days=1))
    await _consume_at(st, plans, 100, second + dt.timedelta(days=1))  # April's grants
    await st.upsert_customer(customer, history.CadenceRequest(), second + dt.timedelta(days=2))
    rows = await st.pool.fetch(
        "SELECT source, amount, burned, expires_at, voided_at FROM credit_grants"
    )
    april = [r for r in rows if r["expires_at"] == second + dt.timedelta(days=30)]
    assert sorted((r["source"], r["amount"], r["voided_at"]) for r in april) == [
        ("plan", 1000, None),
        ("rollover", 500, None),  # March's 900 unused, up to the cap
    ]
    assert sum(r["burned"] for r in april) == 100


async def test_credits_running_low_alert_once_per_period_each(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub, plans: plans_mod.Plans, dsn: str
) -> None:
    await service.add_customer("c1", "alerting")
    await grants.CreateGrant(_grant("c1", 1000))
    async with alerts_support.pool(dsn) as db:
        a = alerts_support.alerter(db, plans)
        await service.usage.CheckEntitlement(_consume("c1", 499))  # 501 left
        assert await a.catch_up() == 0
        await service.usage.CheckEntitlement(_consume("c1", 1))  # 500 left: running low
        assert await a.catch_up() == 1
        await service.usage.CheckEntitlement(_consume("c1", 100))  # still low: said once
        assert await a.catch_up() == 0
        await service.usage.CheckEntitlement(_consume("c1", 400))  # spent
        assert await a.catch_up() == 1
        rows = await db.fetch("SELECT threshold, amount, used FROM usage_alerts ORDER BY used DESC")
        assert [tuple(r) for r in rows] == [("balance 500", 500, 500), ("balance 0", 0, 0)]
        logged = await alerts_support.threshold_changes(db, "c1")
        assert [c.change.detail["threshold"] for c in logged] == ["balance 500", "balance 0"]
        outbox = await db.fetch("SELECT body FROM usage_webhook_outbox ORDER BY created_at")
        bodies = [json.loads(r["body"]) for r in outbox]
        assert {b["type"] for b in bodies} == {"credits.balance_low"}
        assert sorted((b["data"]["threshold"], b["data"]["balance"]) for b in bodies) == [
            ("balance 0", 0),
            ("balance 500", 500),
        ]
        assert all("used" not in b["data"] for b in bodies)


def test_balance_alerts_need_a_prepaid_feature() -> None:
    raw = tomllib.loads(PLANS)
    raw["plans"]["capped"]["features"]["tokens"]["balance_alerts"] = [10]
    with pytest.raises(plans_mod.PlansError, match="balance_alerts: goes with billing"):
        plans_file.parse(raw, "credits.toml")
