"""Checks answered from the read model: a write through the same replica is seen by the very
next check, another replica's within the bound, a dropped LISTEN connection leaves no stale
answer, and a kept read never outlives its period."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import random
import time
import tomllib
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import grpc
import pytest
from conftest import Service
from helpers import record, wait_for

from usage.v1 import (
    credit_pb2,
    credit_pb2_grpc,
    customer_pb2,
    customer_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from usage_service.api.server import start_server
from usage_service.domain import plans as plans_mod
from usage_service.settings import plans_file
from usage_service.storage import connections, queries, readmodel, store

R = usage_pb2
ACTIVE = customer_pb2.SUBSCRIPTION_STATUS_ACTIVE
CANCELED = customer_pb2.SUBSCRIPTION_STATUS_CANCELED
MAX_LAG = 1.0  # seconds: the read model's bound in these tests (the default)

PREPAID = """
[meters.tokens]
aggregation = "sum"

[plans.basic]
[plans.basic.features.tokens]
included = 100
limit = 1000
enforcement = "hard"

[plans.credits_only]
[plans.credits_only.features.tokens]
billing = "prepaid"
overage = false
"""


def check(customer_id: str = "cus_1", quantity: int = 0) -> usage_pb2.CheckEntitlementRequest:
    return usage_pb2.CheckEntitlementRequest(
        customer_id=customer_id, feature="tokens", quantity=quantity
    )


def consume(customer_id: str, quantity: int) -> usage_pb2.CheckEntitlementRequest:
    return usage_pb2.CheckEntitlementRequest(
        customer_id=customer_id,
        feature="tokens",
        quantity=quantity,
        consume=True,
        idempotency_key=uuid.uuid4().hex,
    )


def customer(
    customer_id: str = "cus_1", status: int = ACTIVE, plan_id: str = "basic"
) -> customer_pb2.UpsertCustomerRequest:
    now = dt.datetime.now(dt.UTC)
    c = customer_pb2.Customer(customer_id=customer_id, plan_id=plan_id, subscription_status=status)
    c.current_period_start_time.FromDatetime(now - dt.timedelta(days=1))
    c.current_period_end_time.FromDatetime(now + dt.timedelta(days=29))
    return customer_pb2.UpsertCustomerRequest(customer=c)


class Deaf(readmodel.ReadModel[store.Kept]):
    """A read model that hears its fences but no change: only the store's own forgets keep it
    fresh, so a write path that forgot to forget shows up as a stale check."""

    def notified(self, payload: object) -> None:
        pass


class Muffled(readmodel.ReadModel[store.Kept]):
    """A read model whose listening connection stops delivering (as a half-open one would)
    once `muffled` is set: neither changes nor fences are heard."""

    muffled = False

    def notified(self, payload: object) -> None:
        if not self.muffled:
            super().notified(payload)

    def _heard(self, conn: object, pid: int, channel: str, payload: object) -> None:
        if not self.muffled:
            super()._heard(conn, pid, channel, payload)


@dataclasses.dataclass
class Replica:
    usage: usage_pb2_grpc.UsageServiceStub
    customers: customer_pb2_grpc.CustomerServiceStub
    credits: credit_pb2_grpc.CreditServiceStub
    store: store.Store
    model: readmodel.ReadModel[store.Kept]
    statements: list[str]

    def check_reads(self) -> int:
        """Reads of checks the database ran for this replica so far."""
        return sum(1 for s in self.statements if s == queries.CHECK_READS)


@contextlib.asynccontextmanager
async def replica(
    dsn: str, plans: plans_mod.Plans, kind: type[readmodel.ReadModel[store.Kept]] | None = None
) -> AsyncIterator[Replica]:
    """A server on the database with a read model, once the model is fresh."""
    statements: list[str] = []

    async def init(conn: asyncpg.Connection) -> None:
        await connections.init_connection(conn)
        conn.add_query_logger(lambda q: statements.append(q.query))

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=10, init=init)
    assert pool is not None
    model = (kind or readmodel.ReadModel)(pool, max_lag=MAX_LAG)
    st = store.Store(pool, read_model=model)
    running = await start_server(st, plans, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:

            async def fresh() -> bool:
                return model.fresh()

            await wait_for(fresh, "the read model to hear its first fence")
            yield Replica(
                usage_pb2_grpc.UsageServiceStub(channel),
                customer_pb2_grpc.CustomerServiceStub(channel),
                credit_pb2_grpc.CreditServiceStub(channel),
                st,
                model,
                statements,
            )
    finally:
        await running.stop(0)
        await st.close()


@pytest.fixture
def prepaid() -> plans_mod.Plans:
    return plans_file.parse(tomllib.loads(PREPAID), "prepaid.toml")


# --- the model itself, without a database ---


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bare(max_entries: int = 100) -> tuple[readmodel.ReadModel[int], Clock]:
    clock = Clock()
    return readmodel.ReadModel(cast(asyncpg.Pool, None), max_entries, clock=clock), clock


async def test_a_read_that_races_a_forget_is_not_kept() -> None:
    model, _ = bare()
    gate = asyncio.Event()

    async def slow() -> int:
        await gate.wait()
        return 1

    reading = asyncio.create_task(model.read("c", "k", slow))
    await asyncio.sleep(0)
    model.forget(["c"])  # a commit lands while the read is under way
    gate.set()
    assert await reading == 1
    assert model.get("c", "k") is None

    async def fast() -> int:
        return 2

    assert await model.read("c", "k", fast) == 2  # begun after the forget: kept
    assert model.get("c", "k") == 2
    model.forget(["other"])
    assert model.get("c", "k") == 2


async def test_a_forget_of_everything_and_a_notify_naming_any_drop_every_read() -> None:
    model, _ = bare()

    async def one() -> int:
        return 1

    for c in ("a", "b"):
        await model.read(c, "k", one)
    model.notified('["a"]')
    assert (model.get("a", "k"), model.get("b", "k")) == (None, 1)
    model.notified("*")
    assert model.get("b", "k") is None
    gate = asyncio.Event()

    async def slow() -> int:
        await gate.wait()
        return 3

    reading = asyncio.create_task(model.read("b", "k", slow))
    await asyncio.sleep(0)
    model.forget(None)
    gate.set()
    await reading
    assert model.get("b", "k") is None and len(model) == 0


async def test_memory_is_bounded_and_old_reads_expire() -> None:
    model, clock = bare(max_entries=10)

    async def value() -> int:
        return 7

    for i in range(50):
        await model.read(f"c{i}", "k", value)
        assert model.get("c0", "k") is not None or i >= 1  # touched: stays while it is used
    assert len(model) == 10
    assert model.get("c49", "k") == 7 and model.get("c10", "k") is None
    clock.now += readmodel.MAX_AGE + 1
    assert model.get("c49", "k") is None
    assert len(model) == 9


def test_memory_is_not_trusted_before_a_fence_is_heard() -> None:
    model, _ = bare()
    assert not model.fresh()


# --- through a server ---


async def test_checks_are_answered_from_memory(
    service: Service, dsn: str, plans: plans_mod.Plans
) -> None:
    await service.add_customer()
    await service.usage.RecordUsage(record(quantity=7, key="k"))
    async with replica(dsn, plans) as r:
        first = await r.usage.CheckEntitlement(check())
        reads = r.check_reads()
        assert reads >= 1
        answers = await asyncio.gather(*(r.usage.CheckEntitlement(check()) for _ in range(50)))
        assert r.check_reads() == reads  # no read of the database
        for a in answers:
            assert (a.allowed, a.used, a.totals_version) == (True, 7, first.totals_version)
            assert (a.period_start_time, a.period_end_time) == (
                first.period_start_time,
                first.period_end_time,
            )


async def test_writes_through_the_replica_are_seen_by_its_next_check(
    dsn: str, plans: plans_mod.Plans
) -> None:
    async with replica(dsn, plans, Deaf) as r:
        await r.customers.UpsertCustomer(customer())
        assert (await r.usage.CheckEntitlement(check())).used == 0
        for i in range(1, 6):
            await r.usage.RecordUsage(record(quantity=1, key=f"r{i}"))
            assert (await r.usage.CheckEntitlement(check())).used == i
        batch = usage_pb2.BatchRecordUsageRequest(
            requests=[record(quantity=10, key=f"b{i}") for i in range(3)]
        )
        await r.usage.BatchRecordUsage(batch)
        assert (await r.usage.CheckEntitlement(check())).used == 35
        assert (await r.usage.CheckEntitlement(consume("cus_1", 5))).allowed
        assert (await r.usage.CheckEntitlement(check())).used == 40
        for _ in range(3):
            await r.customers.UpsertCustomer(customer(status=CANCELED))
            answer = await r.usage.CheckEntitlement(check())
            assert answer.reason == R.ENTITLEMENT_REASON_SUBSCRIPTION_INACTIVE
            await r.customers.UpsertCustomer(customer())
            answer = await r.usage.CheckEntitlement(check())
            assert answer.reason == R.ENTITLEMENT_REASON_WITHIN_LIMIT
        assert r.model.fresh() and len(r.model) > 0  # answers came from memory


async def test_grants_through_the_replica_are_seen_by_its_next_check(
    dsn: str, prepaid: plans_mod.Plans
) -> None:
    async with replica(dsn, prepaid, Deaf) as r:
        await r.customers.UpsertCustomer(customer(plan_id="credits_only"))
        assert not (await r.usage.CheckEntitlement(check(quantity=1))).allowed
        made = await r.credits.CreateGrant(
            credit_pb2.CreateGrantRequest(
                customer_id="cus_1", feature="tokens", amount=100, idempotency_key="g1"
            )
        )
        answer = await r.usage.CheckEntitlement(check(quantity=1))
        assert (answer.allowed, answer.balance) == (True, 100)
        assert (await r.usage.CheckEntitlement(consume("cus_1", 30))).allowed
        assert (await r.usage.CheckEntitlement(check(quantity=1))).balance == 70
        await r.usage.RecordUsage(record(quantity=20, key="r1"))
        assert (await r.usage.CheckEntitlement(check(quantity=1))).balance == 50
        await r.credits.VoidGrant(
            credit_pb2.VoidGrantRequest(customer_id="cus_1", grant_id=made.grant.grant_id)
        )
        answer = await r.usage.CheckEntitlement(check(quantity=1))
        assert (answer.allowed, answer.balance) == (False, 0)


async def test_no_check_shows_figures_older_than_a_write_acknowledged_before_it(
    dsn: str, plans: plans_mod.Plans
) -> None:
    """Records, consumes and checks race through one replica; each check is sent after some
    writes were acknowledged and must count at least those (the model hears no NOTIFY: the
    store's forgets alone keep it right)."""
    async with replica(dsn, plans, Deaf) as r:
        await r.customers.UpsertCustomer(customer())
        acknowledged = 0
        rng = random.Random(16)

        async def writer(n: int) -> None:
            nonlocal acknowledged
            for i in range(25):
                if rng.random() < 0.5:
                    await r.usage.RecordUsage(record(quantity=1, key=f"w{n}-{i}"))
                else:
                    assert (await r.usage.CheckEntitlement(consume("cus_1", 1))).allowed
                acknowledged += 1
                await asyncio.sleep(0)

        async def checker() -> int:
            stale = 0
            for _ in range(60):
                floor = acknowledged
                answer = await r.usage.CheckEntitlement(check())
                stale += answer.used < floor
            return stale

        checkers = [checker() for _ in range(8)]
        results = await asyncio.gather(*(writer(n) for n in range(8)), *checkers)
        assert results[8:] == [0] * 8
        assert (await r.usage.CheckEntitlement(check())).used == 200


async def test_another_replicas_cancel_is_seen_within_the_bound(
    service: Service, dsn: str, plans: plans_mod.Plans
) -> None:
    await service.add_customer()
    async with replica(dsn, plans) as r:
        for _ in range(5):
            for status, allowed in ((CANCELED, False), (ACTIVE, True)):
                assert (await r.usage.CheckEntitlement(check())).allowed != allowed  # cached
                await service.add_customer(status=status)
                assert await _until(r, allowed) < 2 * MAX_LAG  # generous: the machine is shared


async def _until(r: Replica, allowed: bool) -> float:
    """Seconds until the replica's checks answer `allowed`, every check after agreeing. A check
    started more than MAX_LAG after the change was acknowledged must see it."""
    acknowledged = time.monotonic()
    while True:
        sent = time.monotonic()
        if (await r.usage.CheckEntitlement(check())).allowed == allowed:
            break
        assert sent - acknowledged < MAX_LAG, "a check started past the bound was stale"
    lag = time.monotonic() - acknowledged
    for _ in range(5):
        assert (await r.usage.CheckEntitlement(check())).allowed == allowed
    return lag


async def settled(r: Replica) -> None:
    """Waits until every NOTIFY committed so far has reached the replica's model (a fence sent
    after now was heard)."""
    sent_after = time.monotonic()

    async def heard() -> bool:
        return r.model.trusted_until > sent_after + MAX_LAG

    await wait_for(heard, "a fence sent after the writes")


async def _listening_backend(db: asyncpg.Pool, model: readmodel.ReadModel[Any]) -> int:
    pid = await db.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE query = $1", f'LISTEN "{model.channel}"'
    )
    assert pid is not None
    return int(pid)


async def test_a_dropped_listen_connection_leaves_no_stale_answer(
    service: Service, dsn: str, plans: plans_mod.Plans
) -> None:
    await service.add_customer()
    async with replica(dsn, plans) as r:
        assert (await r.usage.CheckEntitlement(check())).allowed
        await service.db.execute(
            "SELECT pg_terminate_backend($1::integer)",
            await _listening_backend(service.db, r.model),
        )

        async def forgot() -> bool:
            return not r.model.fresh() and len(r.model) == 0

        await wait_for(forgot, "the model to forget what it kept")
        await service.add_customer(status=CANCELED)  # its NOTIFY reaches no one on the replica
        for _ in range(20):  # read from the database meanwhile
            answer = await r.usage.CheckEntitlement(check())
            assert answer.reason == R.ENTITLEMENT_REASON_SUBSCRIPTION_INACTIVE
        assert len(r.model) == 0

        async def fresh() -> bool:
            return r.model.fresh()

        await wait_for(fresh, "the replica to listen again")
        answer = await r.usage.CheckEntitlement(check())
        assert answer.reason == R.ENTITLEMENT_REASON_SUBSCRIPTION_INACTIVE
        await service.add_customer(status=ACTIVE)
        assert await _until(r, True) < 2 * MAX_LAG


async def test_a_kill_racing_a_cancel_is_still_seen_within_the_bound(
    service: Service, dsn: str, plans: plans_mod.Plans
) -> None:
    await service.add_customer()
    async with replica(dsn, plans) as r:
        assert (await r.usage.CheckEntitlement(check())).allowed
        pid = await _listening_backend(service.db, r.model)
        await asyncio.gather(
            service.db.execute("SELECT pg_terminate_backend($1::integer)", pid),
            service.add_customer(status=CANCELED),
        )
        assert await _until(r, False) < 2 * MAX_LAG


async def test_a_kept_read_ends_with_its_period(dsn: str, plans: plans_mod.Plans) -> None:
    async with replica(dsn, plans) as r:
        await r.customers.UpsertCustomer(customer())
        await r.usage.RecordUsage(record(quantity=9, key="k"))
        await settled(r)
        now = dt.datetime.now(dt.UTC)
        first = await r.store.check_read("cus_1", "tokens", now)
        assert first.totals.quantity_sum == 9 and first.period is not None
        assert await r.store.check_read("cus_1", "tokens", now) is first  # kept
        later = first.period.end + dt.timedelta(hours=1)
        rolled = await r.store.check_read("cus_1", "tokens", later)
        assert rolled.period is not None and rolled.period.start == first.period.end
        assert rolled.totals.quantity_sum == 0
        assert await r.store.check_read("cus_1", "tokens", later) is rolled


async def test_a_kept_grant_expires_at_its_instant(dsn: str, prepaid: plans_mod.Plans) -> None:
    async with replica(dsn, prepaid) as r:
        await r.customers.UpsertCustomer(customer(plan_id="credits_only"))
        grant = credit_pb2.CreateGrantRequest(
            customer_id="cus_1", feature="tokens", amount=50, idempotency_key="g"
        )
        expiry = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        grant.expire_time.FromDatetime(expiry)
        await r.credits.CreateGrant(grant)
        await settled(r)
        feature = prepaid.plans["credits_only"].metered["tokens"]
        for when in (expiry - dt.timedelta(minutes=1), expiry, expiry + dt.timedelta(days=1)):
            read = await r.store.check_read("cus_1", "tokens", when)
            assert read.customer is not None and read.period is not None
            kept = await r.store.check_credit(read, feature, when)
            fresh = await r.store.credit(read.customer, {"tokens": feature}, read.period, when)
            assert kept == fresh["tokens"]
            assert kept.balance == (50 if when < expiry else 0)


async def test_a_silent_listen_connection_sends_checks_to_the_database_within_the_bound(
    service: Service, dsn: str, plans: plans_mod.Plans
) -> None:
    await service.add_customer()
    async with replica(dsn, plans, Muffled) as r:
        assert isinstance(r.model, Muffled)
        assert (await r.usage.CheckEntitlement(check())).allowed
        r.model.muffled = True
        await service.add_customer(status=CANCELED)  # never heard by the replica
        assert await _until(r, False) < 2 * MAX_LAG
        assert not r.model.fresh()
