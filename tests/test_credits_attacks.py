"""Prepaid credits under attack: races between every writer of a customer's grants, group
commit, period boundaries, operators' backlog moves, the drain and hostile CreditService input.
Tests marked xfail show a bug that is still there."""

from __future__ import annotations

import asyncio
import datetime as dt
import tomllib
import uuid
from collections.abc import AsyncIterator, Awaitable

import asyncpg
import grpc
import pytest
from conftest import Service, differences
from fakes.world import Fakes
from helpers import RECOUNT_DRAIN_COUNTERS, Drains, details, lock_waiters, wait_for
from test_drain import FAST, drain_until_quiet

from usage.v1 import credit_pb2, credit_pb2_grpc, customer_pb2, usage_pb2
from usage_service import domain, providers
from usage_service.domain import periods
from usage_service.domain import plans as plans_mod
from usage_service.domain.credits import Grant, GrantSource
from usage_service.domain.errors import KeyConflict
from usage_service.domain.periods import Period
from usage_service.providers.config import ProviderSettings
from usage_service.reconcile.reconciler import Reconciler, Verdict
from usage_service.settings import plans_file
from usage_service.storage import backlog, connections, history, ops, store
from usage_service.storage.reconcile_store import ReconcileStore

PLANS = """
[meters.tokens]
aggregation = "sum"
[meters.tokens.stripe]
event_name = "llm_tokens"
[meters.calls]
aggregation = "count"

[plans.pre]
[plans.pre.features.tokens]
billing = "prepaid"
[plans.pre.features.tokens.grant]
amount = 1000
rollover_cap = 1000
[plans.pre.features.calls]
billing = "prepaid"

[plans.flat]
[plans.flat.features.tokens]
billing = "prepaid"
[plans.flat.features.tokens.grant]
amount = 1000

[plans.duo]
[plans.duo.features.tokens]
billing = "prepaid"
[plans.duo.features.tokens.grant]
amount = 300
[plans.duo.features.calls]
billing = "prepaid"
[plans.duo.features.calls.grant]
amount = 20

[plans.strict]
[plans.strict.features.tokens]
billing = "prepaid"
overage = false
[plans.strict.features.calls]
billing = "prepaid"
overage = false

[plans.arrears]
[plans.arrears.features.tokens]
included = 0
[plans.arrears.features.calls]
included = 0
"""


@pytest.fixture
def plans() -> plans_mod.Plans:
    return plans_file.parse(tomllib.loads(PLANS), "attacks.toml")


@pytest.fixture
def grants(service: Service) -> credit_pb2_grpc.CreditServiceStub:
    return credit_pb2_grpc.CreditServiceStub(service.channel)


def _key() -> str:
    return uuid.uuid4().hex


def _grant_request(
    customer_id: str, amount: int, feature: str = "tokens", priority: int = 0, key: str = ""
) -> credit_pb2.CreateGrantRequest:
    return credit_pb2.CreateGrantRequest(
        customer_id=customer_id,
        feature=feature,
        amount=amount,
        priority=priority,
        idempotency_key=key or _key(),
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


async def _summary(service: Service, customer_id: str, meter: str) -> usage_pb2.MeterUsage:
    answer = await service.usage.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(customer_id=customer_id, meter=meter)
    )
    (found,) = answer.meters
    assert isinstance(found, usage_pb2.MeterUsage)
    return found


async def _burn_figures(db: asyncpg.Pool) -> tuple[int, int]:
    """(units burned over all grants, units covered over all events)."""
    burned = await db.fetchval("SELECT coalesce(sum(burned), 0) FROM credit_grants")
    covered = await db.fetchval(
        "SELECT coalesce(sum(covered), 0) FROM usage_events WHERE meter = 'tokens'"
    )
    return int(burned), int(covered)


# --- hostile input and answers through a real server ---


async def test_a_count_event_of_quantity_zero_that_no_grant_pays_for_is_reported(
    service: Service,
) -> None:
    await service.add_customer(
        "c1", "pre", provider=customer_pb2.PROVIDER_STRIPE, provider_customer_id="cus_c1"
    )
    await service.usage.RecordUsage(_record("c1", 0, "calls"))
    row = await service.db.fetchrow("SELECT covered, report_state FROM usage_events")
    assert await service.db.fetchval("SELECT count(*) FROM credit_burns") == 0
    calls = await _summary(service, "c1", "calls")
    assert (calls.used, calls.covered, calls.pending, calls.billable_overage) == (1, 0, 1, 1)
    assert row is not None and (row["covered"], row["report_state"]) == (0, "pending")


async def test_voiding_a_pending_grant_answers_the_units_it_removed(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.add_customer("c1", "strict")
    request = _grant_request("c1", 50)
    request.effective_time.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    made = (await grants.CreateGrant(request)).grant
    assert made.state == credit_pb2.GRANT_STATE_PENDING and made.remaining == 50
    voided = await grants.VoidGrant(
        credit_pb2.VoidGrantRequest(customer_id="c1", grant_id=made.grant_id)
    )
    assert voided.grant.state == credit_pb2.GRANT_STATE_VOIDED
    assert voided.grant.forfeited == 50
    assert voided.voided == 50


async def test_a_balance_past_int64_is_refused_or_answered_never_internal(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.add_customer("c1", "pre")
    try:
        await grants.CreateGrant(_grant_request("c1", 2**63 - 1))
    except grpc.aio.AioRpcError as exc:  # refusing the grant is a fine answer
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)
        return
    failed: dict[str, grpc.StatusCode] = {}
    calls: dict[str, Awaitable[object]] = {
        "summary": _summary(service, "c1", "tokens"),
        "check": service.usage.CheckEntitlement(
            usage_pb2.CheckEntitlementRequest(customer_id="c1", feature="tokens", quantity=1)
        ),
        "consume": service.usage.CheckEntitlement(_consume("c1", 1)),
    }
    for name, call in calls.items():
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            failed[name] = exc.code()
    consumed = await service.count_events("c1")
    assert (failed, consumed) == ({}, 1)


async def test_hostile_grant_requests_are_refused_by_field_and_store_nothing(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.add_customer("c1", "strict")
    now = dt.datetime.now(dt.UTC)
    bad: list[tuple[credit_pb2.CreateGrantRequest, str]] = []
    for key in ("k\x00ey", "plan:tokens:x", "rollover:", "plan:"):
        bad.append((_grant_request("c1", 5, key=key), "idempotency_key"))
    same = _grant_request("c1", 5)  # expiry equal to the effective time, to the microsecond
    same.effective_time.FromDatetime(now + dt.timedelta(hours=1))
    same.expire_time.FromDatetime(now + dt.timedelta(hours=1))
    same.expire_time.nanos += 999 - same.expire_time.nanos % 1000  # same microsecond
    bad.append((same, "expire_time"))
    beyond = _grant_request("c1", 5)
    beyond.effective_time.seconds = 253402300800  # year 10000: past every period
    bad.append((beyond, "effective_time"))
    for request, field in bad:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await grants.CreateGrant(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in details(caught.value).fields
    assert await service.db.fetchval("SELECT count(*) FROM credit_grants") == 0

    for grant_id in ("nope", "", "0" * 36):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await grants.VoidGrant(credit_pb2.VoidGrantRequest(customer_id="c1", grant_id=grant_id))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for listing in (
        credit_pb2.ListGrantsRequest(customer_id="c1", feature="ghost"),
        credit_pb2.ListGrantsRequest(customer_id="c\x001"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await grants.ListGrants(listing)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_grant_ids_are_private_to_their_customer_and_priority_takes_int32_max(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.add_customer("c1", "strict")
    await service.add_customer("c2", "strict")
    last = (await grants.CreateGrant(_grant_request("c1", 5, priority=2**31 - 1))).grant
    first = (await grants.CreateGrant(_grant_request("c1", 5, priority=0))).grant
    theirs = (await grants.CreateGrant(_grant_request("c2", 5, key="same"))).grant
    mine = (await grants.CreateGrant(_grant_request("c1", 7, key="same"))).grant
    assert theirs.grant_id != mine.grant_id  # keys are per customer
    for customer_id, grant_id in (
        ("c1", theirs.grant_id),
        ("c2", first.grant_id),
        ("c1", str(uuid.uuid4())),
        ("nobody", first.grant_id),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await grants.VoidGrant(
                credit_pb2.VoidGrantRequest(customer_id=customer_id, grant_id=grant_id)
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    upper = await grants.VoidGrant(
        credit_pb2.VoidGrantRequest(customer_id="c1", grant_id=mine.grant_id.upper())
    )
    assert upper.voided == 7 and upper.grant.grant_id == mine.grant_id
    answer = await service.usage.CheckEntitlement(_consume("c1", 7))
    assert answer.allowed and (answer.covered, answer.balance) == (7, 3)
    burned = {
        g.grant_id: g.burned
        for g in (
            await grants.ListGrants(
                credit_pb2.ListGrantsRequest(customer_id="c1", include_inactive=True)
            )
        ).grants
    }
    assert (burned[first.grant_id], burned[last.grant_id], burned[mine.grant_id]) == (5, 2, 0)
    listed = await grants.ListGrants(credit_pb2.ListGrantsRequest(customer_id="c2"))
    assert [g.remaining for g in listed.grants] == [5]


async def test_a_check_shows_the_balance_a_consume_then_burns_on_both_meter_kinds(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.add_customer("c1", "pre")
    await grants.CreateGrant(_grant_request("c1", 3, feature="calls"))
    for feature, quantity, balance, covered in (
        ("tokens", 400, 1000, 400),
        ("calls", 9, 3, 1),
        ("tokens", 0, 600, 0),
    ):
        check = await service.usage.CheckEntitlement(
            usage_pb2.CheckEntitlementRequest(customer_id="c1", feature=feature, quantity=quantity)
        )
        assert check.allowed and check.balance == balance
        if quantity:
            consumed = await service.usage.CheckEntitlement(_consume("c1", quantity, feature))
            assert consumed.allowed and consumed.covered == covered
            assert consumed.balance == balance - covered
    calls = await _summary(service, "c1", "calls")
    assert (calls.used, calls.covered, calls.balance, calls.billable_overage) == (1, 1, 2, 0)


async def test_a_check_without_consume_answers_that_it_covered_nothing(
    service: Service,
) -> None:
    await service.add_customer("c1", "pre")
    check = await service.usage.CheckEntitlement(
        usage_pb2.CheckEntitlementRequest(customer_id="c1", feature="tokens", quantity=400)
    )
    assert check.allowed and check.balance == 1000
    assert check.covered == 0


async def test_usage_before_the_first_webhook_is_never_reported_on_a_plan_without_overage(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.usage.RecordUsage(_record("c1", 100))  # c1 is not known yet
    await service.add_customer(
        "c1", "strict", provider=customer_pb2.PROVIDER_STRIPE, provider_customer_id="cus_c1"
    )
    row = await service.db.fetchrow("SELECT covered, report_state FROM usage_events")
    assert row is not None
    tokens = await _summary(service, "c1", "tokens")
    assert (tokens.used, tokens.pending) == (100, 0)
    assert row["report_state"] in ("unbilled", "covered")


async def test_a_replayed_consume_answers_what_grants_paid_for(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.add_customer("c1", "strict")
    await grants.CreateGrant(_grant_request("c1", 50))
    request = _consume("c1", 10)
    first = await service.usage.CheckEntitlement(request)
    assert first.allowed and (first.covered, first.balance) == (10, 40)
    again = await service.usage.CheckEntitlement(request)
    assert again.duplicate and again.event_id == first.event_id
    assert again.HasField("balance") and again.balance == 40
    assert again.covered == 10


async def test_the_summary_counts_spent_grants_alike_whether_they_expire_or_not(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub
) -> None:
    await service.add_customer("c1", "strict")
    await grants.CreateGrant(_grant_request("c1", 100))
    expiring = _grant_request("c1", 100)
    expiring.expire_time.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    await grants.CreateGrant(expiring)
    assert (await service.usage.CheckEntitlement(_consume("c1", 200))).allowed
    tokens = await _summary(service, "c1", "tokens")
    assert tokens.balance == 0
    assert (tokens.granted, tokens.burned) in ((200, 200), (0, 0))  # both spent grants, or none


# --- races through a real server ---


async def test_every_writer_at_once_never_spends_a_unit_twice_nor_deadlocks(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub, dsn: str
) -> None:
    """Consumes, RecordUsage, BatchRecordUsage over two customers in both orders, CreateGrant
    and VoidGrant on the same customers and features, all at once."""
    await service.add_customer(
        "c1", "duo", provider=customer_pb2.PROVIDER_STRIPE, provider_customer_id="cus_c1"
    )
    await service.add_customer("c2", "strict")
    voidable = [
        (await grants.CreateGrant(_grant_request(c, 40, feature=f))).grant
        for c in ("c1", "c2")
        for f in ("tokens", "calls")
    ]
    errors: list[BaseException] = []

    async def guarded(call: Awaitable[object]) -> None:
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            errors.append(exc)

    strict: list[usage_pb2.CheckEntitlementResponse] = []

    async def consumer(customer_id: str, feature: str, n: int) -> None:
        for j in range(12):
            answer = await service.usage.CheckEntitlement(
                _consume(customer_id, 1 + (n + j) % 7, feature)
            )
            if customer_id == "c2":
                strict.append(answer)

    async def recorder(n: int) -> None:
        for j in range(6):
            await guarded(service.usage.RecordUsage(_record("c1", 1 + (n * j) % 50)))

    async def batcher(n: int) -> None:
        for j in range(4):
            items = [
                _record(c, 1 + (n + j + i) % 9, f)
                for i, (c, f) in enumerate(
                    [("c1", "tokens"), ("c2", "tokens"), ("c1", "calls"), ("c2", "calls")]
                )
            ]
            if (n + j) % 2:
                items.reverse()
            await guarded(
                service.usage.BatchRecordUsage(usage_pb2.BatchRecordUsageRequest(requests=items))
            )

    async def granter() -> None:
        for j in range(6):
            for c in ("c1", "c2"):
                await guarded(grants.CreateGrant(_grant_request(c, 10 + j, feature="tokens")))
                await guarded(grants.CreateGrant(_grant_request(c, 2, feature="calls")))

    async def voider() -> None:
        for g in voidable:
            await guarded(
                grants.VoidGrant(
                    credit_pb2.VoidGrantRequest(customer_id=g.customer_id, grant_id=g.grant_id)
                )
            )

    async def lister() -> None:
        for _ in range(6):
            for c in ("c1", "c2"):
                await guarded(grants.ListGrants(credit_pb2.ListGrantsRequest(customer_id=c)))

    await asyncio.gather(
        *(consumer(c, f, i) for i in range(4) for c in ("c1", "c2") for f in ("tokens", "calls")),
        *(recorder(i) for i in range(4)),
        *(batcher(i) for i in range(4)),
        granter(),
        voider(),
        lister(),
    )
    assert errors == []
    assert all(a.covered > 0 for a in strict if a.allowed)
    assert any(a.allowed for a in strict) and not all(a.allowed for a in strict)
    assert await differences(dsn) == []
    burns = await service.db.fetchval("SELECT coalesce(sum(amount), 0) FROM credit_burns")
    assert burns == await service.db.fetchval("SELECT sum(burned) FROM credit_grants")
    unpaid = await service.db.fetchval(
        "SELECT count(*) FROM usage_events e JOIN customers c USING (customer_id) "
        "WHERE c.plan_id = 'strict' AND e.report_state NOT IN ('covered', 'unbilled')"
    )
    assert unpaid == 0


# --- at the store, with times chosen by the test ---

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)  # monthly periods: Mar 1, Apr 1, May 1, Jun 1
APR = dt.datetime(2026, 4, 1, tzinfo=dt.UTC)
MAY = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)


@pytest.fixture
async def st(dsn: str, plans: plans_mod.Plans) -> AsyncIterator[store.Store]:
    s = store.Store(await connections.create_pool(dsn, size=8), plans=plans)
    s.clock = lambda: T0  # what recording takes as now, unless a test moves it
    yield s
    await s.close()


def _customer(
    plan_id: str,
    customer_id: str = "c1",
    start: dt.datetime = T0,
    end: dt.datetime = APR,
    provider: domain.Provider = domain.Provider.NONE,
) -> domain.Customer:
    return domain.Customer(
        customer_id=customer_id,
        plan_id=plan_id,
        subscription_status=domain.SubscriptionStatus.ACTIVE,
        period_start=start,
        period_end=end,
        cadence=periods.Cadence(periods.Interval.MONTH, 1, T0),
        provider=provider,
        provider_customer_id="cus_x" if provider is not domain.Provider.NONE else "",
    )


async def _upsert(st: store.Store, c: domain.Customer, now: dt.datetime) -> domain.Customer:
    saved, _ = await st.upsert_customer(c, history.CadenceRequest(), now)
    return saved


def _event(
    quantity: int, when: dt.datetime, key: str = "", meter: str = "tokens", customer_id: str = "c1"
) -> domain.UsageEvent:
    key = key or _key()
    return domain.UsageEvent(
        event_id=str(uuid.uuid4()),
        customer_id=customer_id,
        meter=meter,
        quantity=quantity,
        idempotency_key=key,
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


async def _grants(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            "SELECT source, amount, burned, effective_at, expires_at, idempotency_key "
            "FROM credit_grants ORDER BY effective_at, source"
        )
    )


async def test_a_rollover_comes_only_from_the_previous_periods_grants(
    st: store.Store, dsn: str
) -> None:
    await _upsert(st, _customer("pre"), T0)
    st.clock = lambda: T0 + dt.timedelta(days=3)
    await st.record([_event(300, T0 + dt.timedelta(days=3))])  # March: 700 left unused
    # no usage in April: April's plan grant is never made, nothing can roll into May
    now = MAY + dt.timedelta(days=1)
    st.clock = lambda: now
    await st.record([_event(5, T0 + dt.timedelta(days=4)), _event(10, now)])
    sources = [(g["source"], g["effective_at"]) for g in await _grants(st.pool)]
    assert sources == [("plan", T0), ("plan", MAY)]
    assert await differences(dsn) == []


async def test_a_rollover_from_a_batch_of_the_current_period_only_is_nothing(
    st: store.Store,
) -> None:
    """The same history as above without the late event: no rollover (the contrast)."""
    await _upsert(st, _customer("pre"), T0)
    st.clock = lambda: T0 + dt.timedelta(days=3)
    await st.record([_event(300, T0 + dt.timedelta(days=3))])
    now = MAY + dt.timedelta(days=1)
    st.clock = lambda: now
    await st.record([_event(10, now)])
    sources = [(g["source"], g["effective_at"]) for g in await _grants(st.pool)]
    assert sources == [("plan", T0), ("plan", MAY)]


async def test_a_rollover_is_never_more_than_what_the_previous_period_left(
    st: store.Store, plans: plans_mod.Plans, dsn: str
) -> None:
    await _upsert(st, _customer("pre"), T0)
    first = await _consume_at(st, plans, 300, T0 + dt.timedelta(days=3))
    assert first.decision is not None and first.decision.allowed
    tick = dt.timedelta(milliseconds=1)
    async with st.pool.acquire() as holder:
        blocking = holder.transaction()
        await blocking.start()
        # another consumer of March holds March's totals row
        await holder.execute(
            "SELECT 1 FROM usage_totals WHERE customer_id = 'c1' AND period_start = $1 FOR UPDATE",
            T0,
        )
        late = asyncio.create_task(_consume_at(st, plans, 600, APR - tick))
        db = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        assert db is not None
        try:
            await wait_for(lambda: _waiting(db), "the March consume to wait for its row")
        finally:
            await db.close()
        st.clock = lambda: APR + tick  # time goes on while the March consume waits
        # another replica (this one's consumes of the feature wait behind the March one)
        other = store.Store(await connections.create_pool(dsn, size=2), plans=plans)
        other.clock = st.clock
        try:
            april = await _consume_at(other, plans, 1, APR + tick)  # makes April's rollover
        finally:
            await other.close()
        assert april.decision is not None and april.decision.allowed
        await blocking.rollback()
    waited = await late
    assert waited.decision is not None and waited.decision.allowed
    rows = {
        g["idempotency_key"].split(":")[0] + str(g["effective_at"].month): g
        for g in await _grants(st.pool)
    }
    march, rollover = rows["plan3"], rows["rollover4"]
    assert rollover["amount"] + march["burned"] <= march["amount"]
    assert (march["burned"], rollover["amount"]) == (300, 700)  # the late consume burned none


async def _waiting(db: asyncpg.Pool) -> bool:
    return await lock_waiters(db) >= 1


async def test_voiding_an_expired_grant_removes_nothing_from_the_rollover(
    st: store.Store, plans: plans_mod.Plans
) -> None:
    await _upsert(st, _customer("pre"), T0)
    await _consume_at(st, plans, 300, T0 + dt.timedelta(days=3))
    (march,) = await st.pool.fetch("SELECT grant_id::text FROM credit_grants")
    customer = _customer("pre")
    done = await st.void_grant(
        customer, march["grant_id"], Period(APR, MAY), APR + dt.timedelta(hours=1)
    )
    assert done is not None and done[1] == 0  # expired at Apr 1: nothing left to remove
    april = await _consume_at(st, plans, 1, APR + dt.timedelta(hours=2))
    assert april.decision is not None
    assert april.decision.balance == 1000 + 700


async def test_an_event_up_to_five_minutes_ahead_burns_the_next_periods_grant(
    st: store.Store, plans: plans_mod.Plans, dsn: str
) -> None:
    await _upsert(st, _customer("pre"), T0)
    now = APR - dt.timedelta(minutes=2)
    st.clock = lambda: now
    await st.record([_event(100, now), _event(250, APR + dt.timedelta(minutes=2))])
    march, april = await _grants(st.pool)
    assert (march["effective_at"], march["burned"]) == (T0, 100)
    assert (april["effective_at"], april["burned"]) == (APR, 250)
    # once April has begun, its rollover is what March left: 900
    later = await _consume_at(st, plans, 1, APR + dt.timedelta(hours=1))
    assert later.decision is not None and later.decision.balance == 750 + 900
    rollover = [g for g in await _grants(st.pool) if g["source"] == "rollover"]
    assert [g["amount"] for g in rollover] == [900]
    assert await differences(dsn) == []


async def test_two_replicas_make_one_plan_grant_per_period(
    dsn: str, plans: plans_mod.Plans
) -> None:
    replicas = [
        store.Store(await connections.create_pool(dsn, size=6), plans=plans) for _ in range(2)
    ]
    try:
        await _upsert(replicas[0], _customer("pre"), T0)
        customer = _customer("pre")
        feature = plans.plans["pre"].metered["tokens"]
        period = periods.Period(APR, MAY)
        now = APR + dt.timedelta(hours=1)
        for r in replicas:
            r.clock = lambda: now
        calls: list[Awaitable[object]] = []
        for i in range(12):
            r = replicas[i % 2]
            calls.append(r.submit([_event(1, now - dt.timedelta(seconds=i))]))
            calls.append(_consume_at(r, plans, 1, now + dt.timedelta(seconds=i)))
            calls.append(r.list_grants(customer, {"tokens": feature}, period, "", now))
        await asyncio.gather(*calls)
        keys = [g["idempotency_key"] for g in await _grants(replicas[0].pool)]
        assert keys == [f"plan:tokens:{APR.isoformat()}"]
        assert await differences(dsn) == []
    finally:
        for r in replicas:
            await r.close()


async def test_group_commit_burns_once_per_event_whatever_the_group_holds(
    st: store.Store, dsn: str
) -> None:
    """Concurrent submits coalesce into groups: two for one prepaid customer and feature, a
    duplicate of a key in flight, and a key reused with another payload."""
    await _upsert(st, _customer("pre"), T0)
    now = T0 + dt.timedelta(days=2)
    st.clock = lambda: now
    await st.submit([_event(5, now, key="stored")])
    twin = _event(7, now, key="twin")
    calls = [st.submit([_event(40 + 3 * i, now), _event(3, now, meter="calls")]) for i in range(20)]
    calls += [st.submit([twin]) for _ in range(3)]  # one stored, two duplicates in flight
    calls.append(st.submit([_event(8, now, key="stored")]))  # another payload: a conflict
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert [type(r) for r in results if isinstance(r, BaseException)] == [KeyConflict]
    twins = [r for r in results[20:23] if isinstance(r, list)]
    assert sorted(a.duplicate for (a,) in twins) == [False, True, True]
    used = await st.pool.fetchval("SELECT sum(quantity) FROM usage_events WHERE meter = 'tokens'")
    assert used == 5 + sum(40 + 3 * i for i in range(20)) + 7  # 1382
    assert await _burn_figures(st.pool) == (1000, 1000)
    assert await differences(dsn) == []


async def test_a_period_boundary_moved_by_a_webhook_rebuilds_the_covered_counters(
    st: store.Store, dsn: str
) -> None:
    await _upsert(st, _customer("pre"), T0)
    st.clock = lambda: T0 + dt.timedelta(days=20)
    await st.record([_event(300, T0 + dt.timedelta(days=4))])
    await st.record([_event(900, T0 + dt.timedelta(days=19))])  # 700 covered, 200 over
    mid = T0 + dt.timedelta(days=14)
    await _upsert(st, _customer("pre", start=mid, end=APR + dt.timedelta(days=14)), mid)
    rows = await st.pool.fetch(
        "SELECT period_start, covered_sum, covered_count, quantity_sum FROM usage_totals "
        "WHERE meter = 'tokens' ORDER BY period_start"
    )
    assert [tuple(r) for r in rows] == [(T0, 300, 1, 300), (mid, 700, 0, 900)]
    assert await differences(dsn) == []
    # and moved back: one period again
    await _upsert(st, _customer("pre"), T0 + dt.timedelta(days=21))
    rows = await st.pool.fetch(
        "SELECT period_start, covered_sum, covered_count FROM usage_totals WHERE meter = 'tokens'"
    )
    assert [tuple(r) for r in rows] == [(T0, 1000, 1)]
    assert await differences(dsn) == []


async def test_a_moved_period_start_leaves_one_plan_grant_to_burn(
    st: store.Store, plans: plans_mod.Plans, dsn: str
) -> None:
    await _upsert(st, _customer("flat"), T0)
    st.clock = lambda: T0 + dt.timedelta(days=3)
    await st.record([_event(300, T0 + dt.timedelta(days=3))])
    mid = T0 + dt.timedelta(days=14)
    await _upsert(st, _customer("flat", start=mid, end=APR + dt.timedelta(days=14)), mid)
    later = await _consume_at(st, plans, 1, T0 + dt.timedelta(days=19))
    assert later.decision is not None
    assert later.decision.balance == 1000


async def test_plan_moves_mid_period_keep_burns_to_the_prepaid_plans_usage(
    st: store.Store, dsn: str
) -> None:
    await _upsert(st, _customer("arrears"), T0)
    st.clock = lambda: T0 + dt.timedelta(days=10)
    await st.record([_event(100, T0 + dt.timedelta(days=1))])  # arrears: no burn
    await _upsert(st, _customer("pre"), T0 + dt.timedelta(days=2))
    await st.record([_event(50, T0 + dt.timedelta(days=3))])
    await _upsert(st, _customer("arrears"), T0 + dt.timedelta(days=4))
    await st.record([_event(20, T0 + dt.timedelta(days=5))])
    await _upsert(st, _customer("strict"), T0 + dt.timedelta(days=6))
    await st.record([_event(40, T0 + dt.timedelta(days=7))])  # strict: no grant -> unbilled
    rows = await st.pool.fetch(
        "SELECT quantity, covered, report_state FROM usage_events ORDER BY event_time"
    )
    # the period's plan grant stays the customer's: 'strict' (no grant of its own) burns it
    assert [tuple(r) for r in rows] == [
        (100, 0, "unbilled"),
        (50, 50, "covered"),
        (20, 0, "unbilled"),
        (40, 40, "covered"),
    ]
    assert await differences(dsn) == []


async def test_repair_rebuilds_a_prepaid_customers_covered_counters(
    st: store.Store, dsn: str
) -> None:
    await _upsert(st, _customer("pre"), T0)
    st.clock = lambda: T0 + dt.timedelta(days=3)
    await st.record([_event(1200, T0 + dt.timedelta(days=2)), _event(4, T0, meter="calls")])
    await st.pool.execute("UPDATE usage_totals SET covered_sum = 5, covered_count = 9")
    found = await history.verify(st.pool, fix=True)
    assert {d.meter for d in found} == {"tokens", "calls"}
    assert await differences(dsn) == []
    row = await st.pool.fetchrow(
        "SELECT covered_sum, covered_count FROM usage_totals WHERE meter = 'tokens'"
    )
    assert row is not None and tuple(row) == (1000, 0)


async def test_moving_requeueing_and_pruning_partly_covered_events_keep_the_counters(
    st: store.Store, dsn: str
) -> None:
    stripe = _customer("pre", provider=domain.Provider.STRIPE)
    await _upsert(st, stripe, T0)
    st.clock = lambda: T0 + dt.timedelta(days=3)
    await st.record([_event(1200, T0 + dt.timedelta(days=2))])  # 1000 covered, 200 pending
    await st.record([_event(50, T0 + dt.timedelta(days=2, hours=1))])  # 50 pending
    # parked by the drain (set by hand), then put back
    await st.pool.execute(
        "UPDATE usage_events SET report_state = 'failed', last_error = 'x' WHERE quantity = 1200"
    )
    await st.pool.execute(RECOUNT_DRAIN_COUNTERS)
    assert await differences(dsn) == []
    ops_backlog = backlog.Backlog(st.pool)
    assert await ops_backlog.requeue() == 1
    assert await differences(dsn) == []
    # the customer leaves Stripe: the waiting parts move to no provider (unbilled)
    await _upsert(st, _customer("pre"), T0 + dt.timedelta(days=4))
    moved = await ops_backlog.move_to_current_provider()
    assert moved.events == 2
    row = await st.pool.fetchrow(
        "SELECT unbilled_sum, unbilled_count, covered_sum FROM usage_totals"
    )
    assert row is not None and tuple(row) == (250, 2, 1000)
    assert await differences(dsn) == []
    # a fully covered event in March, settled; April confirmed: March's events may be pruned
    await st.record([_event(10, T0 + dt.timedelta(days=5))])
    covered = await st.pool.fetchval(
        "SELECT count(*) FROM usage_events WHERE report_state = 'covered'"
    )
    assert covered == 0  # the plan grant is spent
    await st.create_grant(
        Grant(
            "c1",
            str(uuid.uuid4()),
            "tokens",
            10,
            0,
            T0 + dt.timedelta(days=3),
            None,
            GrantSource.TOP_UP,
            "pack",
            T0 + dt.timedelta(days=3),
        ),
        b"pack",
        _customer("pre"),
        Period(T0, APR),
    )
    await st.record([_event(10, T0 + dt.timedelta(days=6))])
    await _upsert(st, _customer("pre", start=APR, end=MAY), APR + dt.timedelta(hours=1))
    assert await ops.prune_reported(st.pool, dt.timedelta(0)) == 4
    assert await st.pool.fetchval("SELECT count(*) FROM usage_events") == 0
    assert await differences(dsn) == []


# --- the drain and reconciliation send and compare the uncovered part ---


async def test_stripe_is_sent_and_reconciled_against_what_grants_did_not_cover(
    service: Service, grants: credit_pb2_grpc.CreditServiceStub, dsn: str, plans: plans_mod.Plans
) -> None:
    fakes = Fakes.start()
    drains = Drains(dsn, plans.meters)
    adapters: dict[domain.Provider, providers.Adapter] = {}
    try:
        now = dt.datetime.now(dt.UTC)
        start = (now - dt.timedelta(days=1)).replace(second=0, microsecond=0)
        await service.add_customer(
            "c_stripe",
            "pre",
            start=start,
            end=start + dt.timedelta(days=30),
            provider=customer_pb2.PROVIDER_STRIPE,
            provider_customer_id="cus_s",
        )
        await grants.CreateGrant(_grant_request("c_stripe", 2, feature="calls"))
        for q in (600, 600, 300):  # 600 + 400 covered; 200 + 300 reported
            await service.usage.RecordUsage(_record("c_stripe", q))
        for _ in range(3):
            await service.usage.CheckEntitlement(_consume("c_stripe", 4, "calls"))
        d = await drains.make(fakes.env(), FAST)
        await drain_until_quiet([d], service.db)
        assert fakes.stripe.totals()[("cus_s", "llm_tokens")] == 500
        assert fakes.stripe.counts()[("cus_s", "calls")] == 1  # one event of 4 calls
        tokens = await _summary(service, "c_stripe", "tokens")
        assert (tokens.reported, tokens.pending, tokens.covered) == (500, 0, 1000)
        adapters = providers.adapters(ProviderSettings.from_env(fakes.env()), plans.meters)
        rows = await Reconciler(ReconcileStore(service.db), adapters, plans.meters, 600.0).run()
        found = {r.meter: (r.verdict, r.recorded, r.reported, r.held) for r in rows}
        assert found == {
            "tokens": (Verdict.MATCH, 500, 500, 500),
            "calls": (Verdict.MATCH, 1, 1, 1),
        }
        assert fakes.violations() == []
    finally:
        for adapter in adapters.values():
            await adapter.aclose()
        await drains.close()
        fakes.stop()
