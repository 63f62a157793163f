"""Consumes of one customer's meter, grouped into one transaction (Store.consume): decided in
arrival order against the locked totals row exactly as if each ran alone after the ones before
it, each with its own change version and kept decision."""

from __future__ import annotations

import asyncio
import datetime as dt
import tomllib
from collections.abc import AsyncIterator, Mapping

import grpc
import pytest
from conftest import Service
from helpers import lock_waiters, record, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usage.v1 import usage_pb2
from usage_service import domain
from usage_service.domain import credits as credits_model
from usage_service.domain import ids, periods
from usage_service.domain import plans as plans_mod
from usage_service.domain.errors import KeyConflict, TotalOutOfRange
from usage_service.settings import plans_file
from usage_service.storage import changes, connections, consuming, history, store


def consume(
    key: str, quantity: int, customer_id: str = "cus_1"
) -> usage_pb2.CheckEntitlementRequest:
    return usage_pb2.CheckEntitlementRequest(
        customer_id=customer_id,
        feature="tokens",
        quantity=quantity,
        consume=True,
        idempotency_key=key,
    )


def request(
    plans: plans_mod.Plans,
    key: str,
    quantity: int,
    customer_id: str = "cus_1",
    feature: str = "tokens",
    when: dt.datetime | None = None,
    properties: Mapping[str, str] | None = None,
) -> consuming.Request:
    """A consume as CheckEntitlement makes it."""
    props = dict(properties or {})
    event = domain.UsageEvent(
        event_id=ids.new_event_id(),
        customer_id=customer_id,
        meter=feature,
        quantity=quantity,
        idempotency_key=key,
        event_time=when or dt.datetime.now(dt.UTC),
        properties=props,
        payload_hash=domain.payload_hash(feature, quantity, None, props),
    )
    aggregation = plans.meters[feature].aggregation

    def gate(customer: domain.Customer | None) -> domain.Decision | None:
        return domain.gate(customer, plans, feature)

    def decide(c: domain.Customer, totals: domain.Totals, balance: int | None) -> domain.Decision:
        rule = plans.plans[c.plan_id].metered[feature]
        return domain.decide(rule, aggregation, totals, quantity, balance)

    metering = [p for p, plan in plans.plans.items() if feature in plan.metered]
    return consuming.Request(event, gate, decide, metering, lambda c: b"kept")


@pytest.fixture
async def direct(dsn: str, plans: plans_mod.Plans) -> AsyncIterator[store.Store]:
    """A second store on the service's database, to hand it groups directly."""
    st = store.Store(await connections.create_pool(dsn, size=4), plans=plans)
    yield st
    await st.close()


async def test_a_hot_rows_consumes_hold_the_hard_limit_exactly(service: Service) -> None:
    """300 concurrent consumes of 7 against a hard limit of 1000: exactly 142 are allowed, in
    groups (several share a transaction), each at its own version whose logged figures are
    its own; every denial saw all 142 and is at the last one's version."""
    await service.add_customer()
    answers = await asyncio.gather(
        *(service.usage.CheckEntitlement(consume(f"k{i}", 7)) for i in range(300))
    )
    allowed = sorted((a for a in answers if a.allowed), key=lambda a: a.used)
    denied = [a for a in answers if not a.allowed]
    assert len(allowed) == 142
    assert [a.used for a in allowed] == [7 * (n + 1) for n in range(142)]
    assert len({a.totals_version for a in allowed}) == 142
    assert [a.totals_version for a in allowed] == sorted(a.totals_version for a in allowed)
    last = allowed[-1].totals_version
    assert all(
        d.reason == usage_pb2.ENTITLEMENT_REASON_LIMIT_EXCEEDED
        and d.used == 994
        and d.totals_version == last
        for d in denied
    )
    logged = {c.version: c.change for c in await changes.since(service.db, "cus_1", 0, 1000)}
    assert [logged[a.totals_version].figures["tokens"].quantity_sum for a in allowed] == [
        a.used for a in allowed
    ]
    transactions = await service.db.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM usage_events WHERE customer_id = 'cus_1'"
    )
    assert transactions < 142  # grouped: some transaction stored several
    assert await service.db.fetchval("SELECT count(*) FROM decisions") == 142
    assert await service.db.fetchval("SELECT quantity_sum FROM usage_totals") == 994


async def test_a_group_decides_in_arrival_order(
    service: Service, direct: store.Store, plans: plans_mod.Plans
) -> None:
    """First fit, in order: a consume too big for what is left is denied and a later smaller
    one still fits; a key repeated in the group replays the first (another payload under it is
    a conflict); a key stored before replays that event."""
    await service.add_customer()
    stored = await service.usage.CheckEntitlement(consume("old", 900))
    group = [
        request(plans, "a", 95),  # 995
        request(plans, "b", 20),  # denied
        request(plans, "old", 900),  # replay of the stored consume
        request(plans, "a", 95),  # replay of the first
        request(plans, "a", 96),  # another payload under "a": conflict
        request(plans, "c", 5),  # 1000
        request(plans, "d", 1),  # denied
    ]
    out = await direct.consume_many(group)
    a, b, old, a_again, a_other, c, d = out
    assert isinstance(a, consuming.Consumed) and a.decision and a.decision.allowed
    assert isinstance(b, consuming.Consumed) and b.decision and not b.decision.allowed
    assert b.totals.quantity_sum == 995 and b.version == a.version
    assert isinstance(old, consuming.Consumed) and old.duplicate
    assert old.event_id == stored.event_id and old.decision_id == stored.decision_id
    assert isinstance(a_again, consuming.Consumed) and a_again.duplicate
    assert (a_again.event_id, a_again.decision_id, a_again.version) == (
        a.event_id,
        a.decision_id,
        a.version,
    )
    assert isinstance(a_other, KeyConflict) and a_other.event_id == a.event_id
    assert isinstance(c, consuming.Consumed) and c.decision and c.decision.allowed
    assert c.totals.quantity_sum == 995 and c.version == a.version + 1
    assert isinstance(d, consuming.Consumed) and d.decision and not d.decision.allowed
    assert d.totals.quantity_sum == 1000 and d.version == c.version
    rows = await service.db.fetch("SELECT idempotency_key, quantity FROM usage_events ORDER BY seq")
    assert [(r[0], r[1]) for r in rows] == [("old", 900), ("a", 95), ("c", 5)]
    kept = await service.db.fetchval("SELECT count(*) FROM decisions")
    assert kept == 1 + 4  # the stored consume; a, b, c, d (replays and conflicts keep none)


async def test_a_group_straddling_a_period_end_counts_each_in_its_own_period(
    service: Service, direct: store.Store, plans: plans_mod.Plans
) -> None:
    now = dt.datetime.now(dt.UTC)
    end = now + dt.timedelta(seconds=1)
    await service.add_customer(start=now - dt.timedelta(days=30), end=end)
    tick = dt.timedelta(microseconds=1)
    group = [
        request(plans, "before", 600, when=end - tick),
        request(plans, "after", 600, when=end),
        request(plans, "after2", 500, when=end + tick),
        request(plans, "before2", 500, when=end - tick),
    ]
    out = await direct.consume_many(group)
    assert all(isinstance(o, consuming.Consumed) and o.decision for o in out)
    allowed = [o.decision.allowed for o in out if isinstance(o, consuming.Consumed) and o.decision]
    assert allowed == [True, True, False, False]  # 1100 > 1000 in each period
    sums = await service.db.fetch(
        "SELECT period_start, quantity_sum FROM usage_totals ORDER BY period_start"
    )
    assert [(r[0] == end, r[1]) for r in sums] == [(False, 600), (True, 600)]


async def test_a_total_out_of_range_fails_only_its_own_consume(
    service: Service, direct: store.Store, plans: plans_mod.Plans
) -> None:
    await service.add_customer(plan_id="metered")  # tokens without a limit
    await service.usage.RecordUsage(record(quantity=2**62, key="big"))
    out = await direct.consume_many(
        [request(plans, "x", 1), request(plans, "y", 2**62), request(plans, "z", 2)]
    )
    assert isinstance(out[1], TotalOutOfRange)
    assert all(isinstance(o, consuming.Consumed) and o.event_id for o in (out[0], out[2]))
    total = await service.db.fetchval("SELECT quantity_sum FROM usage_lifetime")
    assert total == 2**62 + 3


async def test_a_key_recorded_while_the_group_waits_is_a_replay_not_a_second_event(
    service: Service, direct: store.Store, plans: plans_mod.Plans
) -> None:
    """The group reads keys before its lock is granted; a RecordUsage (on another meter) takes
    one of them meanwhile. The group starts again: that consume answers as a conflict with the
    recorded event, the other is stored once."""
    await service.add_customer()
    await service.usage.CheckEntitlement(consume("first", 1))  # the totals row exists
    async with service.db.acquire() as blocker, blocker.transaction():
        await blocker.execute(
            "SELECT 1 FROM usage_totals WHERE customer_id = 'cus_1' AND meter = 'tokens' FOR UPDATE"
        )
        group = asyncio.ensure_future(
            direct.consume_many([request(plans, "a", 10), request(plans, "b", 10)])
        )
        await wait_for(lambda: _waiters(service, 1), "the group waiting on the totals row")
        recorded = await service.usage.RecordUsage(record(meter="calls", quantity=1, key="b"))
    a, b = await group
    assert isinstance(a, consuming.Consumed) and a.decision and a.decision.allowed
    assert isinstance(b, KeyConflict) and b.event_id == recorded.event_id
    keys = await service.db.fetch("SELECT idempotency_key FROM usage_events ORDER BY seq")
    assert [k[0] for k in keys] == ["first", "b", "a"]


async def _waiters(service: Service, n: int) -> bool:
    return await lock_waiters(service.db) == n


async def test_callers_that_all_give_up_store_nothing(service: Service) -> None:
    """Consumes of one row waiting behind a lock, every caller past its deadline: the group is
    abandoned with them, and nothing is stored."""
    await service.add_customer()
    async with service.db.acquire() as blocker:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM customers WHERE customer_id = 'cus_1' FOR UPDATE")
            calls = [
                service.usage.CheckEntitlement(consume(f"k{i}", 1), timeout=0.5) for i in range(4)
            ]
            for outcome in await asyncio.gather(*calls, return_exceptions=True):
                assert isinstance(outcome, grpc.aio.AioRpcError)
                assert outcome.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_for(lambda: _waiters(service, 0), "the abandoned group to leave the lock")
    assert await service.count_events() == 0
    again = await service.usage.CheckEntitlement(consume("k0", 1))
    assert again.allowed and not again.duplicate


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(
        st.tuples(st.sampled_from("abcdefgh"), st.integers(min_value=1, max_value=400)),
        min_size=1,
        max_size=12,
    )
)
async def test_a_group_answers_as_the_same_consumes_one_at_a_time(
    service: Service, direct: store.Store, plans: plans_mod.Plans, drawn: list[tuple[str, int]]
) -> None:
    """The same consumes (keys repeat, payloads may differ) decided as one group for one
    customer and one by one for another give the same answers and the same figures."""
    run = ids.new_event_id()[:8]
    grouped, alone = f"g{run}", f"s{run}"
    for c in (grouped, alone):
        await service.add_customer(customer_id=c)
    out = await direct.consume_many([request(plans, k, q, grouped) for k, q in drawn])
    one_by_one = [(await direct.consume_many([request(plans, k, q, alone)]))[0] for k, q in drawn]

    def shape(o: consuming.Consumed | BaseException) -> object:
        if not isinstance(o, consuming.Consumed):
            return type(o).__name__
        allowed = o.decision.allowed if o.decision else None
        return allowed, o.duplicate, o.totals.quantity_sum, bool(o.event_id)

    assert [shape(o) for o in out] == [shape(o) for o in one_by_one]
    figures = await service.db.fetch(
        "SELECT customer_id, event_count, quantity_sum FROM usage_totals"
        " WHERE customer_id = ANY($1::text[]) ORDER BY customer_id",
        [grouped, alone],
    )
    assert len(figures) == 2 and tuple(figures[0])[1:] == tuple(figures[1])[1:]
    versions = [o.version for o in out if isinstance(o, consuming.Consumed) and o.decision]
    assert versions == sorted(versions)
    logged = await changes.since(service.db, grouped, 0, 100)
    sums = {c.version: c.change.figures["tokens"].quantity_sum for c in logged if c.change.figures}
    for (_, quantity), o in zip(drawn, out, strict=True):
        if isinstance(o, consuming.Consumed) and o.decision and o.decision.allowed:
            assert sums[o.version] == o.totals.quantity_sum + quantity


PREPAID = """
[meters.tokens]
aggregation = "sum"
[meters.calls]
aggregation = "count"

[plans.pack]
[plans.pack.features.tokens]
billing = "prepaid"
overage = false
[plans.pack.features.tokens.grant]
amount = 1000
[plans.pack.features.calls]
billing = "prepaid"
overage = false
[plans.pack.features.calls.grant]
amount = 5
"""


@pytest.fixture
async def prepaid(dsn: str) -> AsyncIterator[tuple[store.Store, plans_mod.Plans]]:
    plans = plans_file.parse(tomllib.loads(PREPAID), "prepaid.toml")
    st = store.Store(await connections.create_pool(dsn, size=4), plans=plans)
    yield st, plans
    await st.close()


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.sampled_from(["tokens", "calls"]),
    st.lists(
        st.tuples(st.sampled_from("abcdef"), st.integers(min_value=1, max_value=400)),
        min_size=1,
        max_size=10,
    ),
)
async def test_a_prepaid_group_burns_as_the_same_consumes_one_at_a_time(
    prepaid: tuple[store.Store, plans_mod.Plans], feature: str, drawn: list[tuple[str, int]]
) -> None:
    """Grants burn in arrival order: a group and the same consumes one by one cover the same
    units, deny the same ones (BALANCE_EXHAUSTED) and log the same balance after each."""
    st_, plans = prepaid
    run = ids.new_event_id()[:8]
    grouped, alone = f"g{run}", f"s{run}"
    now = dt.datetime.now(dt.UTC)
    for c in (grouped, alone):
        customer = domain.Customer(
            customer_id=c,
            plan_id="pack",
            subscription_status=domain.SubscriptionStatus.ACTIVE,
            period_start=now - dt.timedelta(days=1),
            period_end=now + dt.timedelta(days=29),
            cadence=periods.Cadence(periods.Interval.MONTH, 1, now - dt.timedelta(days=1)),
            provider=domain.Provider.NONE,
            provider_customer_id="",
        )
        await st_.upsert_customer(customer, history.CadenceRequest(), now)
    out = await st_.consume_many([request(plans, k, q, grouped, feature) for k, q in drawn])
    one_by_one = [
        (await st_.consume_many([request(plans, k, q, alone, feature)]))[0] for k, q in drawn
    ]

    def shape(o: consuming.Consumed | BaseException) -> object:
        if not isinstance(o, consuming.Consumed):
            return type(o).__name__
        d = o.decision
        decided = (d.allowed, d.reason, d.balance, d.covered) if d else None
        return decided, o.duplicate, o.totals.covered_sum, o.totals.event_count

    assert [shape(o) for o in out] == [shape(o) for o in one_by_one]
    logged = await changes.since(st_.pool, grouped, 0, 100)
    balances = {
        c.version: credits_model.Credit.from_json(c.change.detail["credit"][feature]).balance
        for c in logged
        if "credit" in c.change.detail and feature in c.change.detail["credit"]
    }
    for o in out:
        if isinstance(o, consuming.Consumed) and o.decision and o.decision.allowed:
            assert o.decision.balance is not None
            assert balances[o.version] == o.decision.balance - o.decision.covered
