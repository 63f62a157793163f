"""Prepaid credits under attack, second round: the stream's credit figures against the summary,
credits-running-low alerts, plan grants that follow moved periods, lock order between the
writers of grants, group commit over many prepaid customers, and hostile plans files.
Tests marked xfail show a bug that is still there."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import tomllib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import alerts_support
import asyncpg
import grpc
import pytest
from conftest import Service, differences
from helpers import lock_waiters, wait_for

from usage.v1 import credit_pb2, credit_pb2_grpc, usage_pb2
from usage_service import domain
from usage_service.domain import periods
from usage_service.domain import plans as plans_mod
from usage_service.domain.credits import Grant, GrantSource, plan_key
from usage_service.domain.periods import Period
from usage_service.settings import plans_file
from usage_service.storage import connections, history, store

PLANS = """
[meters.tokens]
aggregation = "sum"
[meters.calls]
aggregation = "count"

[plans.flat]
[plans.flat.features.tokens]
billing = "prepaid"
[plans.flat.features.tokens.grant]
amount = 1000

[plans.pre]
[plans.pre.features.tokens]
billing = "prepaid"
[plans.pre.features.tokens.grant]
amount = 1000
rollover_cap = 1000

[plans.duo]
[plans.duo.features.tokens]
billing = "prepaid"
[plans.duo.features.tokens.grant]
amount = 300
[plans.duo.features.calls]
billing = "prepaid"
[plans.duo.features.calls.grant]
amount = 20

[plans.low]
[plans.low.features.tokens]
billing = "prepaid"
overage = false
balance_alerts = [500, 0]

[plans.arrears]
[plans.arrears.features.tokens]
included = 0
[plans.arrears.features.calls]
included = 0
"""


@pytest.fixture
def plans() -> plans_mod.Plans:
    return plans_file.parse(tomllib.loads(PLANS), "attacks2.toml")


@pytest.fixture
def grants(service: Service) -> credit_pb2_grpc.CreditServiceStub:
    return credit_pb2_grpc.CreditServiceStub(service.channel)


def _key() -> str:
    return uuid.uuid4().hex


def _grant_request(
    customer_id: str, amount: int, feature: str = "tokens"
) -> credit_pb2.CreateGrantRequest:
    return credit_pb2.CreateGrantRequest(
        customer_id=customer_id, feature=feature, amount=amount, idempotency_key=_key()
    )


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
    customer_id: str, quantity: int, feature: str = "tokens", key: str = ""
) -> usage_pb2.RecordUsageRequest:
    return usage_pb2.RecordUsageRequest(
        customer_id=customer_id, meter=feature, quantity=quantity, idempotency_key=key or _key()
    )


# --- hostile plans files: every bad value is a PlansError naming its key ---

BASE = """
[meters.tokens]
aggregation = "sum"
[plans.p.features.tokens]
billing = "prepaid"
"""

BAD_KEYS: dict[str, tuple[dict[str, Any], str]] = {
    "grant-not-a-table": ({"grant": 5}, "tokens.grant:"),
    "grant-without-amount": ({"grant": {}}, "tokens.grant.amount:"),
    "grant-amount-text": ({"grant": {"amount": "1"}}, "tokens.grant.amount:"),
    "grant-priority-past-int32": (
        {"grant": {"amount": 1, "priority": 2**31}},
        "tokens.grant.priority:",
    ),
    "grant-rollover-negative": (
        {"grant": {"amount": 1, "rollover_cap": -1}},
        "tokens.grant.rollover_cap:",
    ),
    "balance-alerts-text": ({"balance_alerts": "low"}, "tokens.balance_alerts:"),
    "balance-alerts-negative": ({"balance_alerts": [-1]}, "tokens.balance_alerts.0:"),
    "balance-alerts-bool": ({"balance_alerts": [True]}, "tokens.balance_alerts.0:"),
    "balance-alerts-float": ({"balance_alerts": [1.5]}, "tokens.balance_alerts.0:"),
    "balance-alerts-twice": ({"balance_alerts": [3, 3]}, "tokens.balance_alerts:"),
    "billing-unknown": ({"billing": "later"}, "tokens.billing:"),
    "overage-text": ({"overage": "no"}, "tokens.overage:"),
    "ceiling-without-limit": ({"ceiling": 5}, "tokens.ceiling:"),
    "ceiling-below-limit": (
        {"ceiling": 5, "limit": 10, "enforcement": "soft"},
        "tokens.ceiling:",
    ),
    "ceiling-bool": ({"ceiling": True, "limit": 1, "enforcement": "soft"}, "tokens.ceiling:"),
}


def _parse_with(extra: dict[str, Any]) -> plans_mod.Plans:
    raw = tomllib.loads(BASE)
    raw["plans"]["p"]["features"]["tokens"].update(extra)
    return plans_file.parse(raw, "bad.toml")


@pytest.mark.parametrize("case", sorted(BAD_KEYS))
def test_a_bad_value_of_a_credits_key_is_a_plans_error_naming_the_key(case: str) -> None:
    extra, key = BAD_KEYS[case]
    with pytest.raises(plans_mod.PlansError, match=re.escape(f"bad.toml: plans.p.features.{key}")):
        _parse_with(extra)


def test_an_unknown_key_in_a_grant_table_is_a_plans_error_listing_the_keys() -> None:
    with pytest.raises(plans_mod.PlansError, match=r"tokens\.grant\.every: unknown key .*amount"):
        _parse_with({"grant": {"amount": 1, "every": "month"}})


PAST_INT64 = 2**63  # tomllib reads it: TOML files can hold it


@pytest.mark.parametrize(
    "extra",
    [
        {"grant": {"amount": PAST_INT64}},
        {"grant": {"amount": 1, "rollover_cap": PAST_INT64}},
        {"ceiling": PAST_INT64, "limit": 1, "enforcement": "soft"},
        {"balance_alerts": [PAST_INT64]},
    ],
    ids=["grant-amount", "rollover-cap", "ceiling", "balance-alerts"],
)
def test_a_credits_value_past_int64_is_a_plans_error(extra: dict[str, Any]) -> None:
    with pytest.raises(plans_mod.PlansError, match=r"largest total|int64|too large"):
        _parse_with(extra)


def test_a_zero_grant_amount_is_refused_with_its_real_bound() -> None:
    with pytest.raises(plans_mod.PlansError, match=r"grant\.amount: must be a whole number >= 1"):
        _parse_with({"grant": {"amount": 0}})


# --- at the store, with times chosen by the test ---

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)  # monthly periods: Mar 1, Apr 1, May 1
APR = dt.datetime(2026, 4, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.fixture
async def st(dsn: str, plans: plans_mod.Plans) -> AsyncIterator[store.Store]:
    s = store.Store(await connections.create_pool(dsn, size=8), plans=plans)
    s.clock = lambda: T0
    yield s
    await s.close()


def _customer(
    plan_id: str, start: dt.datetime = T0, end: dt.datetime = APR, customer_id: str = "c1"
) -> domain.Customer:
    return domain.Customer(
        customer_id=customer_id,
        plan_id=plan_id,
        subscription_status=domain.SubscriptionStatus.ACTIVE,
        period_start=start,
        period_end=end,
        cadence=periods.Cadence(periods.Interval.MONTH, 1, T0),
    )


async def _upsert(st: store.Store, c: domain.Customer, now: dt.datetime) -> domain.Customer:
    saved, _ = await st.upsert_customer(c, history.CadenceRequest(), now)
    return saved


def _event(
    quantity: int, when: dt.datetime, meter: str = "tokens", customer_id: str = "c1"
) -> domain.UsageEvent:
    return domain.UsageEvent(
        event_id=str(uuid.uuid4()),
        customer_id=customer_id,
        meter=meter,
        quantity=quantity,
        idempotency_key=_key(),
        event_time=when,
        properties={},
        payload_hash=domain.payload_hash(meter, quantity, when, {}),
    )


async def _consume_at(
    st: store.Store, plans: plans_mod.Plans, quantity: int, when: dt.datetime
) -> store.Consumed:
    event = _event(quantity, when)

    def decide(c: domain.Customer, totals: domain.Totals, balance: int | None) -> domain.Decision:
        feature = plans.plans[c.plan_id].metered["tokens"]
        return domain.decide(feature, plans.meters["tokens"].aggregation, totals, quantity, balance)

    return await st.consume(
        event, lambda c: domain.gate(c, plans, "tokens"), decide, tuple(plans.plans)
    )


async def _covered_in(pool: asyncpg.Pool, start: dt.datetime, end: dt.datetime) -> int:
    """Units of tokens grants paid for among the events timed in [start, end)."""
    value = await pool.fetchval(
        "SELECT coalesce(sum(covered), 0) FROM usage_events "
        "WHERE meter = 'tokens' AND event_time >= $1 AND event_time < $2",
        start,
        end,
    )
    return int(value)


async def test_a_period_moved_back_and_forth_keeps_its_plan_grant(
    st: store.Store, plans: plans_mod.Plans, dsn: str
) -> None:
    await _upsert(st, _customer("flat"), T0)
    st.clock = lambda: T0 + 3 * DAY
    await st.record([_event(300, T0 + 3 * DAY)])
    # a webhook says the period began a day earlier, then the next one takes that back
    await _upsert(st, _customer("flat", T0 - DAY, APR - DAY), T0 + 4 * DAY)
    await _upsert(st, _customer("flat"), T0 + 5 * DAY)
    later = await _consume_at(st, plans, 1, T0 + 6 * DAY)
    assert later.decision is not None
    assert (later.decision.covered, later.decision.balance) == (1, 1000 - 300)  # before it
    assert await differences(dsn) == []


async def test_a_period_start_moved_back_pays_no_more_than_the_plan_grants(
    st: store.Store, plans: plans_mod.Plans, dsn: str
) -> None:
    await _upsert(st, _customer("flat"), T0)
    st.clock = lambda: T0 + 3 * DAY
    await st.record([_event(300, T0 + 3 * DAY)])
    await _upsert(st, _customer("flat", T0 - DAY, APR - DAY), T0 + 4 * DAY)
    st.clock = lambda: T0 + 5 * DAY
    await st.record([_event(5000, T0 + 5 * DAY)])
    assert await _covered_in(st.pool, T0 - DAY, APR - DAY) <= 1000
    assert await differences(dsn) == []


@pytest.mark.xfail(
    strict=True,
    reason="a period cut by a webhook and then restored by the next one pays for more than its "
    "plan grant: the grant of the cut-off part is voided with its burned units kept paid, "
    "and the restored period's grant is extended with its remainder",
)
async def test_a_period_cut_and_restored_pays_no_more_than_its_plan_grant(
    st: store.Store, plans: plans_mod.Plans, dsn: str
) -> None:
    await _upsert(st, _customer("flat"), T0)
    st.clock = lambda: T0 + 3 * DAY
    await st.record([_event(300, T0 + 3 * DAY)])
    mid = T0 + 14 * DAY
    await _upsert(st, _customer("flat", mid, APR + 14 * DAY), mid)
    st.clock = lambda: mid + DAY
    await st.record([_event(900, mid + DAY)])  # the cut-off part's own grant pays for it
    await _upsert(st, _customer("flat"), mid + 2 * DAY)  # the period is [T0, APR) again
    st.clock = lambda: mid + 3 * DAY
    await st.record([_event(5000, mid + 3 * DAY)])
    assert await _covered_in(st.pool, T0, APR) <= 1000
    assert await differences(dsn) == []


async def test_an_extended_then_shortened_period_keeps_one_grant_and_rolls_over_from_it(
    st: store.Store, plans: plans_mod.Plans, dsn: str
) -> None:
    await _upsert(st, _customer("pre"), T0)
    st.clock = lambda: T0 + 3 * DAY
    await st.record([_event(300, T0 + 3 * DAY)])
    await _upsert(st, _customer("pre", T0, APR + 5 * DAY), T0 + 4 * DAY)
    await _upsert(st, _customer("pre", T0, APR - 5 * DAY), T0 + 5 * DAY)
    st.clock = lambda: APR - 4 * DAY
    await st.record([_event(10, APR - 4 * DAY)])
    rows = await st.pool.fetch(
        "SELECT source, amount, burned, effective_at, expires_at, voided_at FROM credit_grants "
        "ORDER BY effective_at, source"
    )
    assert [(r["source"], r["amount"], r["effective_at"], r["expires_at"]) for r in rows] == [
        ("plan", 1000, T0, APR - 5 * DAY),
        ("plan", 1000, APR - 5 * DAY, APR + 26 * DAY),
        ("rollover", 700, APR - 5 * DAY, APR + 26 * DAY),  # what the cut grant left
    ]
    assert rows[0]["burned"] == 300 and sum(r["burned"] for r in rows[1:]) == 10
    assert all(r["voided_at"] is None for r in rows)
    assert await differences(dsn) == []


def _plan_grant(grant_id: str, feature: str, amount: int) -> Grant:
    return Grant(
        customer_id="c1",
        grant_id=grant_id,
        feature=feature,
        amount=amount,
        priority=0,
        effective_at=T0,
        expires_at=APR,
        source=GrantSource.PLAN,
        idempotency_key=plan_key(feature, GrantSource.PLAN, Period(T0, APR)),
        created_at=T0,
    )


async def _waiters_reach(dsn: str, count: int) -> None:
    db = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    assert db is not None

    async def reached() -> bool:
        return await lock_waiters(db) >= count

    try:
        await wait_for(reached, f"{count} sessions waiting for a lock")
    finally:
        await db.close()


async def test_list_grants_and_a_period_webhook_never_deadlock(
    st: store.Store, plans: plans_mod.Plans, dsn: str
) -> None:
    customer = await _upsert(st, _customer("duo"), T0)
    period = Period(T0, APR)
    low, high = "00000000-0000-4000-8000-000000000001", "ffffffff-ffff-4fff-bfff-ffffffffffff"
    await st.create_grant(_plan_grant(low, "tokens", 300), b"", customer, period)
    await st.create_grant(_plan_grant(high, "calls", 20), b"", customer, period)
    made = dict(plans.plans["duo"].metered)
    now = T0 + DAY
    async with st.pool.acquire() as holder:
        blocking = holder.transaction()
        await blocking.start()
        # a consumer of calls holds its grants for a moment: both callers queue behind it
        await holder.execute(
            "SELECT 1 FROM credit_grants WHERE customer_id = $1 AND grant_id = $2 FOR UPDATE",
            customer.customer_id,
            high,
        )
        listing = asyncio.create_task(st.list_grants(customer, made, period, "", now))
        await _waiters_reach(dsn, 1)
        webhook = asyncio.create_task(_upsert(st, _customer("duo"), now))
        await _waiters_reach(dsn, 2)
        await blocking.rollback()
    results = await asyncio.gather(listing, webhook, return_exceptions=True)
    assert [type(r).__name__ for r in results if isinstance(r, BaseException)] == []


def _grant_of(grant_id: str, source: GrantSource, amount: int, period: Period) -> Grant:
    return Grant(
        customer_id="c1",
        grant_id=grant_id,
        feature="tokens",
        amount=amount,
        priority=0,
        effective_at=period.start,
        expires_at=period.end,
        source=source,
        idempotency_key=plan_key("tokens", source, period),
        created_at=period.start,
    )


async def test_writers_making_a_new_periods_grants_never_deadlock(
    st: store.Store, plans: plans_mod.Plans, dsn: str
) -> None:
    customer = await _upsert(st, _customer("pre"), T0)
    march, april = Period(T0, APR), Period(APR, APR + 30 * DAY)
    made = "80000000-0000-4000-8000-000000000000"
    await st.create_grant(_grant_of(made, GrantSource.PLAN, 1000, march), b"", customer, march)
    st.clock = lambda: T0 + DAY
    await st.record([_event(300, T0 + DAY)])
    now = APR + dt.timedelta(hours=1)
    st.clock = lambda: now
    rollover = _grant_of("00000000-0000-4000-8000-000000000001", GrantSource.ROLLOVER, 700, april)
    plan = _grant_of("00000000-0000-4000-8000-000000000002", GrantSource.PLAN, 1000, april)
    feature = plans.plans["pre"].metered["tokens"]
    async with st.pool.acquire() as one, st.pool.acquire() as two:
        # two other writers make April's grants: one its rollover, one its plan grant (say an
        # event a minute ahead of the boundary made it)
        making_rollover, making_plan = one.transaction(), two.transaction()
        await making_rollover.start()
        await making_plan.start()
        await one.execute(
            "INSERT INTO credit_grants (customer_id, grant_id, feature, amount, priority, "
            "effective_at, expires_at, source, idempotency_key, payload_hash, created_at) "
            "VALUES ('c1', $1::uuid, 'tokens', 700, 0, $2, $3, 'rollover', $4, '', $2)",
            rollover.grant_id,
            APR,
            april.end,
            rollover.idempotency_key,
        )
        await two.execute(
            "INSERT INTO credit_grants (customer_id, grant_id, feature, amount, priority, "
            "effective_at, expires_at, source, idempotency_key, payload_hash, created_at) "
            "VALUES ('c1', $1::uuid, 'tokens', 1000, 0, $2, $3, 'plan', $4, '', $2)",
            plan.grant_id,
            APR,
            april.end,
            plan.idempotency_key,
        )
        # an April consume locks March's grant and waits to make April's plan grant
        consuming = asyncio.create_task(_consume_at(st, plans, 5, now))
        await _waiters_reach(dsn, 1)
        await making_rollover.commit()
        # ListGrants locks the rollover, then waits for March's grant
        listing = asyncio.create_task(st.list_grants(customer, {"tokens": feature}, april, "", now))
        await _waiters_reach(dsn, 2)
        await making_plan.commit()
    results = await asyncio.gather(consuming, listing, return_exceptions=True)
    assert [type(r).__name__ for r in results if isinstance(r, BaseException)] == []
    assert await differences(dsn) == []


# --- WatchUsage's credit figures against GetUsageSummary ---

Figures = tuple[int, int, int, int, int, int]


def _figures(m: usage_pb2.MeterUsage) -> Figures:
    return (m.used, m.granted, m.burned, m.balance, m.covered, m.billable_overage)


class _Stream:
    def __init__(self, service: Service, customer_id: str, **request: Any) -> None:
        self.call = service.usage.WatchUsage(
            usage_pb2.WatchUsageRequest(customer_id=customer_id, **request)
        )
        self.messages = self.call.__aiter__()

    async def next(self) -> usage_pb2.WatchUsageResponse:
        async with asyncio.timeout(30):
            message = await self.messages.__anext__()
        assert isinstance(message, usage_pb2.WatchUsageResponse)
        return message


def _tokens(message: usage_pb2.WatchUsageResponse | usage_pb2.GetUsageSummaryResponse) -> Figures:
    (tokens,) = [m for m in message.meters if m.meter == "tokens"]
    return _figures(tokens)


async def _summary_of(service: Service, customer_id: str) -> Figures:
    answer = await service.usage.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(customer_id=customer_id, meter="tokens")
    )
    return _tokens(answer)


async def test_the_stream_shows_the_summarys_credit_after_every_kind_of_change(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.add_customer("c1", "pre")
    await service.add_customer("c2", "pre")
    stream = _Stream(service, "c1")
    seen = [await stream.next()]
    assert _tokens(seen[0]) == await _summary_of(service, "c1") == (0, 1000, 0, 1000, 0, 0)

    async def step() -> Figures:
        message = await stream.next()
        seen.append(message)
        return _tokens(message)

    await service.usage.RecordUsage(_record("c1", 300))
    assert await step() == await _summary_of(service, "c1")
    await service.usage.CheckEntitlement(_consume("c1", 200))
    assert await step() == await _summary_of(service, "c1")
    batch = [_record(c, 50 + i) for i in range(6) for c in ("c2", "c1")]
    await service.usage.BatchRecordUsage(usage_pb2.BatchRecordUsageRequest(requests=batch))
    assert await step() == await _summary_of(service, "c1")
    pack = (await grants.CreateGrant(_grant_request("c1", 400))).grant
    assert await step() == await _summary_of(service, "c1")
    await service.usage.RecordUsage(_record("c1", 500))  # past the plan grant, into the pack
    assert await step() == await _summary_of(service, "c1")
    await grants.VoidGrant(credit_pb2.VoidGrantRequest(customer_id="c1", grant_id=pack.grant_id))
    assert await step() == await _summary_of(service, "c1")
    await service.usage.RecordUsage(_record("c1", 80))  # overage
    assert await step() == await _summary_of(service, "c1")
    await service.add_customer("c1", "arrears")
    assert await step() == await _summary_of(service, "c1")
    await service.add_customer("c1", "pre")
    assert await step() == await _summary_of(service, "c1")
    kinds = [m.kind for m in seen]
    assert kinds.count(usage_pb2.USAGE_CHANGE_KIND_CREDIT) == 2
    assert kinds.count(usage_pb2.USAGE_CHANGE_KIND_CUSTOMER) == 2
    stream.call.cancel()


async def test_a_resumed_stream_shows_each_changes_credit_as_it_was(service: Service) -> None:
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - DAY
    await service.add_customer("c1", "pre", start=start, end=start + 30 * DAY)
    first = await service.usage.CheckEntitlement(_consume("c1", 100))
    # the same period confirmed again: a 'customer' change that moves no grant
    await service.add_customer("c1", "pre", start=start, end=start + 30 * DAY)
    after_webhook = await _summary_of(service, "c1")
    await service.usage.CheckEntitlement(_consume("c1", 200))
    stream = _Stream(service, "c1", resume_after_version=first.totals_version)
    webhook = await stream.next()
    assert webhook.kind == usage_pb2.USAGE_CHANGE_KIND_CUSTOMER
    assert _tokens(webhook) == after_webhook == (100, 1000, 100, 900, 100, 0)
    consumed = await stream.next()
    assert _tokens(consumed) == await _summary_of(service, "c1")
    stream.call.cancel()


async def test_a_stream_rolls_over_into_the_next_periods_plan_grants_as_the_summary(
    service: Service,
) -> None:
    now = dt.datetime.now(dt.UTC)
    start, end = now - DAY, now + dt.timedelta(seconds=2)
    await service.add_customer("c1", "pre", start=start, end=end)
    stream = _Stream(service, "c1")
    await stream.next()
    await service.usage.CheckEntitlement(_consume("c1", 300))
    assert _tokens(await stream.next()) == (300, 1000, 300, 700, 300, 0)
    rollover = await stream.next()  # when the period ends
    assert rollover.kind == usage_pb2.USAGE_CHANGE_KIND_ROLLOVER
    assert _tokens(rollover) == await _summary_of(service, "c1") == (0, 1700, 0, 1700, 0, 0)
    stream.call.cancel()


# --- credits running low ---


async def _low_alerts(db: asyncpg.Pool, customer_id: str) -> list[tuple[str, dt.datetime]]:
    rows = await db.fetch(
        "SELECT threshold, period_start FROM usage_alerts WHERE customer_id = $1 "
        "ORDER BY created_at, threshold",
        customer_id,
    )
    return [(r["threshold"], r["period_start"]) for r in rows]


async def test_sixty_four_consumers_across_the_levels_raise_each_alert_once(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub, plans: plans_mod.Plans, dsn: str
) -> None:
    """A plan with balance alerts and no usage thresholds is watched."""
    await service.add_customer("c1", "low")
    await grants.CreateGrant(_grant_request("c1", 640))
    async with alerts_support.pool(dsn) as db:
        alerter = alerts_support.alerter(db, plans)

        async def consumer() -> None:
            for _ in range(2):
                await service.usage.CheckEntitlement(_consume("c1", 5))
                await alerter.catch_up()

        await asyncio.gather(*(consumer() for _ in range(64)))
        await alerter.catch_up()
        alerts = await _low_alerts(db, "c1")
        assert sorted(t for t, _ in alerts) == ["balance 0", "balance 500"]
        denied = await service.usage.CheckEntitlement(_consume("c1", 1))
        assert not denied.allowed and denied.balance == 0
        assert await alerter.catch_up() == 0


async def test_a_void_alerts_a_top_up_does_not_rearm_and_a_new_period_does(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub, plans: plans_mod.Plans, dsn: str
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    first = now - DAY
    await service.add_customer("c1", "low", start=first, end=first + 30 * DAY)
    await grants.CreateGrant(_grant_request("c1", 600))
    pack = (await grants.CreateGrant(_grant_request("c1", 300))).grant
    async with alerts_support.pool(dsn) as db:
        alerter = alerts_support.alerter(db, plans)
        await service.usage.CheckEntitlement(_consume("c1", 100))  # 800 left
        assert await alerter.catch_up() == 0
        await grants.VoidGrant(
            credit_pb2.VoidGrantRequest(customer_id="c1", grant_id=pack.grant_id)
        )  # 500 left: running low
        assert await alerter.catch_up() == 1
        await grants.CreateGrant(_grant_request("c1", 1000))  # 1500: well above
        await service.usage.CheckEntitlement(_consume("c1", 1100))  # 400: low again, said
        assert await alerter.catch_up() == 0
        # the next period (a webhook starts it now): the same balance alerts again
        await service.add_customer("c1", "low", start=now, end=now + 30 * DAY)
        await service.usage.CheckEntitlement(_consume("c1", 1))
        assert await alerter.catch_up() == 1
        assert await _low_alerts(db, "c1") == [("balance 500", first), ("balance 500", now)]


# --- the record path under load ---


async def test_a_thousand_events_over_fifty_prepaid_customers_with_consumers_alongside(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub, dsn: str
) -> None:
    customers = [f"c{i:02d}" for i in range(50)]
    for c in customers:
        await service.add_customer(c, "duo")
    for c in customers[:10]:
        await grants.CreateGrant(_grant_request(c, 50))
        await grants.CreateGrant(_grant_request(c, 5, feature="calls"))
    batches = []
    for b in range(3):
        items = []
        for i in range(1000):
            c = customers[(i * 7 + b) % 50]
            meter = "calls" if i % 3 == 0 else "tokens"
            key = f"b{b}-{i // 2}" if i % 10 < 2 else f"b{b}-{i}"  # pairs of twins
            items.append(_record(c, 1 + i % 13 if meter == "tokens" else 1, meter, key))
        # a twin must be the same event: make each pair's second a copy of its first
        for i in range(1, 1000):
            if i % 10 == 1:
                items[i] = items[i - 1]
        batches.append(usage_pb2.BatchRecordUsageRequest(requests=items))
    failures: list[str] = []

    async def batch(request: usage_pb2.BatchRecordUsageRequest) -> None:
        try:
            answer = await service.usage.BatchRecordUsage(request)
        except grpc.aio.AioRpcError as exc:
            failures.append(f"{exc.code()}: {exc.details()}")
            return
        assert [a.duplicate for a in answer.responses] == [i % 10 == 1 for i in range(1000)]

    async def consumer(c: str) -> None:
        for j in range(6):
            try:
                await service.usage.CheckEntitlement(_consume(c, 1 + j, "tokens"))
                await service.usage.CheckEntitlement(_consume(c, 1, "calls"))
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")

    await asyncio.gather(*(batch(b) for b in batches), *(consumer(c) for c in customers[::5]))
    assert failures == []
    assert await differences(dsn) == []
    rows = await service.db.fetch(
        "SELECT g.customer_id, g.feature, sum(g.amount) AS granted, sum(g.burned) AS burned "
        "FROM credit_grants g GROUP BY 1, 2"
    )
    for r in rows:
        covered = await service.db.fetchval(
            "SELECT coalesce(sum(CASE WHEN meter = 'calls' AND covered > 0 THEN 1 "
            "ELSE covered END), 0) FROM usage_events WHERE customer_id = $1 AND meter = $2",
            r["customer_id"],
            r["feature"],
        )
        assert r["burned"] == covered <= r["granted"], dict(r)
    assert len(rows) == 100 and any(r["burned"] == r["granted"] for r in rows)


async def test_list_grants_beside_consumes_across_a_period_boundary(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub, dsn: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    boundary = now + dt.timedelta(seconds=1.5)
    await service.add_customer("c1", "pre", start=now - DAY, end=boundary)
    failures: list[str] = []
    past = asyncio.Event()

    async def guarded(call: Any) -> None:
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            failures.append(f"{exc.code()}: {exc.details()}")

    async def consumer() -> None:
        while not past.is_set():
            await guarded(service.usage.CheckEntitlement(_consume("c1", 3)))
            await guarded(service.usage.RecordUsage(_record("c1", 2)))

    async def lister() -> None:
        while not past.is_set():
            await guarded(grants.ListGrants(credit_pb2.ListGrantsRequest(customer_id="c1")))

    async def clock() -> None:
        async def over() -> bool:
            return dt.datetime.now(dt.UTC) > boundary + dt.timedelta(milliseconds=500)

        await wait_for(over, "the period to end")
        past.set()

    await asyncio.gather(clock(), *(consumer() for _ in range(4)), *(lister() for _ in range(2)))
    # ABORTED answers do happen here: the deadlock that
    # test_writers_making_a_new_periods_grants_never_deadlock shows step by step
    assert [f for f in failures if not f.startswith("StatusCode.ABORTED")] == []
    assert await differences(dsn) == []
    rows = await service.db.fetch(
        "SELECT source, amount, burned, effective_at, expires_at FROM credit_grants "
        "ORDER BY effective_at, source"
    )
    old, new = rows[0], rows[1]
    left = old["amount"] - old["burned"]
    # nothing left of the old grant (the consumers may spend it all first): no rollover
    assert [r["source"] for r in rows] == ["plan", "plan"] + (["rollover"] if left else [])
    assert (old["expires_at"], new["effective_at"]) == (boundary,) * 2
    if left:
        rollover = rows[2]
        assert rollover["effective_at"] == boundary
        assert rollover["amount"] == min(1000, left)
    burned = await service.db.fetchval("SELECT sum(amount) FROM credit_burns")
    assert burned == sum(r["burned"] for r in rows)


@pytest.mark.xfail(
    strict=True,
    reason="a late event (timed in the period before) that spends the balance raises no "
    "credits-running-low alert: its change is logged in the ended period, which crossings "
    "pass over whole, though the credit it carries is today's balance; with overage = false "
    "every later consume is denied and logs nothing, so the alert is never raised",
)
async def test_a_late_event_that_spends_the_balance_alerts_in_the_current_period(
    st: store.Store, plans: plans_mod.Plans, dsn: str
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    st.clock = lambda: dt.datetime.now(dt.UTC)
    current = now - 10 * DAY
    before = Period(current - 30 * DAY, current)
    await _upsert(st, _customer("low", before.start, before.end), before.start)
    customer = await _upsert(st, _customer("low", current, current + 30 * DAY), now)
    pack = Grant(
        customer_id="c1",
        grant_id=str(uuid.uuid4()),
        feature="tokens",
        amount=800,
        priority=0,
        effective_at=before.start,
        expires_at=None,
        source=GrantSource.TOP_UP,
        idempotency_key=_key(),
        created_at=before.start,
    )
    await st.create_grant(pack, b"pack", customer, before)
    async with alerts_support.pool(dsn) as db:
        alerter = alerts_support.alerter(db, plans)
        await st.record([_event(800, current - 5 * DAY)])  # late: paid by the pack
        denied = await _consume_at(st, plans, 1, dt.datetime.now(dt.UTC))
        assert denied.decision is not None and not denied.decision.allowed
        assert denied.decision.balance == 0
        await alerter.catch_up()
        assert await _low_alerts(db, "c1") == [("balance 0", current), ("balance 500", current)]
