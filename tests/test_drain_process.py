"""The drain inside real `usage-service serve` processes: a SIGKILL between a provider accepting a
report and the report being settled, and three replicas draining 10,000 events at once."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence

import asyncpg
import grpc
import pytest
from conftest import Service
from fakes.base import Fault
from fakes.world import CUSTOMERS, LEMON_ITEMS, Fakes
from helpers import record
from process import PLANS_FILE, ServiceProcess, executable

from usage.v1 import customer_pb2, customer_pb2_grpc, usage_pb2, usage_pb2_grpc

pytestmark = pytest.mark.process

SETTLE_TIMEOUT = 90.0  # seconds
METERS = ("tokens", "calls")


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    started = Fakes.start()
    yield started
    started.stop()


def service_env(dsn: str, fakes: Fakes, lease: float) -> dict[str, str]:
    return {
        **fakes.env(timeout=2.0),
        "DATABASE_URL": dsn,
        "USAGE_DRAIN_INTERVAL_SECONDS": "0.1",
        "USAGE_DRAIN_LEASE_SECONDS": str(lease),
        "USAGE_DRAIN_BACKOFF_BASE_SECONDS": "0.05",
        "USAGE_DRAIN_BACKOFF_CAP_SECONDS": "0.5",
        "LEMONSQUEEZY_SETTLE_SECONDS": "1",  # the fake applies a write at once or never
    }


def add_customers(address: str, customers: Mapping[str, tuple[int, str, dict[str, str]]]) -> None:
    now = dt.datetime.now(dt.UTC)
    with grpc.insecure_channel(address) as channel:
        stub = customer_pb2_grpc.CustomerServiceStub(channel)
        for customer_id, (provider, provider_id, items) in customers.items():
            c = customer_pb2.Customer(
                customer_id=customer_id,
                plan_id="basic",
                subscription_status=customer_pb2.SUBSCRIPTION_STATUS_ACTIVE,
                provider=provider,
                provider_customer_id=provider_id,
                subscription_items=items,
            )
            c.current_period_start_time.FromDatetime(now - dt.timedelta(days=1))
            c.current_period_end_time.FromDatetime(now + dt.timedelta(days=29))
            stub.UpsertCustomer(customer_pb2.UpsertCustomerRequest(customer=c), timeout=10)


def record_events(address: str, events: Sequence[tuple[str, str, int]]) -> list[str]:
    """(customer_id, meter, quantity) each, 1,000 a call; returns the event ids."""
    start = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    ids: list[str] = []
    with grpc.insecure_channel(address) as channel:
        stub = usage_pb2_grpc.UsageServiceStub(channel)
        for i in range(0, len(events), 1000):
            chunk = [
                record(c, m, q, uuid.uuid4().hex, start + dt.timedelta(microseconds=i + j))
                for j, (c, m, q) in enumerate(events[i : i + 1000])
            ]
            answer = stub.BatchRecordUsage(
                usage_pb2.BatchRecordUsageRequest(requests=chunk), timeout=30
            )
            ids += [r.event_id for r in answer.responses]
    return ids


def wait_until_reported(dsn: str, total: int, procs: Sequence[ServiceProcess]) -> None:
    async def poll() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            deadline = time.monotonic() + SETTLE_TIMEOUT
            while time.monotonic() < deadline:
                done = await conn.fetchval(
                    "SELECT count(*) FROM usage_events WHERE report_state = 'reported'"
                )
                if done == total:
                    return
                await asyncio.sleep(0.1)
            logs = "\n".join("".join(p.output[-30:]) for p in procs)
            raise AssertionError(f"{done}/{total} reported after {SETTLE_TIMEOUT}s\n{logs}")
        finally:
            await conn.close()

    asyncio.run(poll())


def assert_each_event_held_once(
    fakes: Fakes, expected: Mapping[tuple[str, str], list[int]]
) -> None:
    """`expected`: (customer_id, meter) -> quantities recorded."""
    assert fakes.violations() == []
    by_id = {c.customer_id: c for c in CUSTOMERS.values()}
    stripe_sum = fakes.stripe.totals()
    stripe_count = fakes.stripe.counts()
    for (customer_id, meter), qs in expected.items():
        provider = customer_id.split("_")[1]
        provider_id = by_id[customer_id].provider_customer_id if customer_id in by_id else ""
        if provider == "stripe":
            if meter == "tokens":
                assert stripe_sum[(provider_id, "llm_tokens")] == sum(qs)
            else:
                assert stripe_count[(provider_id, meter)] == len(qs)
        elif provider == "lemon":
            got = fakes.lemon_squeezy.usage[LEMON_ITEMS[meter]]
            assert got == (sum(qs) if meter == "tokens" else len(qs)), meter
        else:
            fake = {"polar": fakes.polar, "dodo": fakes.dodo_payments, "creem": fakes.creem}
            assert fake[provider].totals().get((provider_id, meter)) == sum(qs), (provider, meter)


def customers_table() -> dict[str, tuple[int, str, dict[str, str]]]:
    return {
        c.customer_id: (c.provider, c.provider_customer_id, c.subscription_items)
        for c in CUSTOMERS.values()
    }


def test_sigkill_after_a_provider_accepted_a_report_delivers_each_event_once(
    dsn: str, fakes: Fakes
) -> None:
    for fake in fakes.all():
        fake.inject(Fault("block"))  # store the first write, then never answer it
    first = ServiceProcess(service_env(dsn, fakes, lease=2))
    try:
        add_customers(first.address, customers_table())
        events = [
            (c.customer_id, meter, q)
            for c in CUSTOMERS.values()
            for meter in METERS
            for q in (3, 4, 5)
        ]
        record_events(first.address, events)
        for fake in fakes.all():
            assert fake.blocked.wait(30), f"{type(fake).__name__} got no report"
    finally:
        first.kill()  # SIGKILL: the accepted reports are not settled
    for fake in fakes.all():
        fake.release()
    pending = asyncio.run(
        _count(dsn, "SELECT count(*) FROM usage_events WHERE report_state <> 'reported'")
    )
    assert pending > 0  # the kill really came before settling
    second = ServiceProcess(service_env(dsn, fakes, lease=2))
    try:
        wait_until_reported(dsn, len(events), [second])
    finally:
        second.terminate()
    expected: dict[tuple[str, str], list[int]] = {}
    for c, m, q in events:
        expected.setdefault((c, m), []).append(q)
    assert_each_event_held_once(fakes, expected)
    assert len(fakes.stripe.writes()) > len(fakes.stripe.events)  # the restart re-sent ...
    assert fakes.stripe.events  # ... and Stripe kept each identifier once


def test_three_replicas_drain_ten_thousand_events_once(dsn: str, fakes: Fakes) -> None:
    customers = customers_table()
    extra = {
        "c_stripe_2": (customer_pb2.PROVIDER_STRIPE, "cus_s2", {}),
        "c_lemon_2": (
            customer_pb2.PROVIDER_LEMON_SQUEEZY,
            "",
            {m: f"{item}_2" for m, item in LEMON_ITEMS.items()},
        ),
        "c_polar_2": (customer_pb2.PROVIDER_POLAR, "", {}),  # sent as external_customer_id
        "c_dodo_2": (customer_pb2.PROVIDER_DODO_PAYMENTS, "dodo_2", {}),
        "c_creem_2": (customer_pb2.PROVIDER_CREEM, "creem_2", {}),
    }
    customers.update(extra)
    fakes.dodo_payments.customers.add("dodo_2")
    fakes.creem.customers.add("creem_2")
    for item in LEMON_ITEMS.values():
        fakes.lemon_squeezy.add_item(f"{item}_2")
    procs = [ServiceProcess(service_env(dsn, fakes, lease=10)) for _ in range(3)]
    try:
        add_customers(procs[0].address, customers)
        events = [
            (customer_id, "calls" if i % 10 == 0 else "tokens", 1 + i % 7)
            for customer_id in customers
            for i in range(1000)
        ]
        assert len(events) == 10_000
        for k, proc in enumerate(procs):  # record through every replica while they drain
            record_events(proc.address, events[k::3])
        wait_until_reported(dsn, len(events), procs)
    finally:
        for proc in procs:
            proc.terminate()
    assert fakes.violations() == []
    for fake in (fakes.polar, fakes.dodo_payments, fakes.creem):
        assert len(fake.accepted) == 2000
    expected: dict[tuple[str, str], list[int]] = {}
    for c, m, q in events:
        expected.setdefault((c, m), []).append(q)
    assert fakes.stripe.totals()[("cus_s", "llm_tokens")] == sum(expected[("c_stripe", "tokens")])
    assert fakes.stripe.totals()[("cus_s2", "llm_tokens")] == sum(
        expected[("c_stripe_2", "tokens")]
    )
    assert fakes.stripe.counts()[("cus_s", "calls")] == 100
    for suffix, customer in (("", "c_lemon"), ("_2", "c_lemon_2")):
        usage = fakes.lemon_squeezy.usage
        assert usage[LEMON_ITEMS["tokens"] + suffix] == sum(expected[(customer, "tokens")])
        assert usage[LEMON_ITEMS["calls"] + suffix] == 100
    assert fakes.polar.totals()[("c_polar_2", "tokens")] == sum(expected[("c_polar_2", "tokens")])
    assert fakes.dodo_payments.totals()[("dodo_2", "calls")] == sum(expected[("c_dodo_2", "calls")])
    assert fakes.creem.totals()[("creem_1", "tokens")] == sum(expected[("c_creem", "tokens")])


async def _count(dsn: str, sql: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def test_operator_commands_drain_once_status_and_requeue(
    service: Service, dsn: str, fakes: Fakes
) -> None:
    for name in ("stripe", "polar"):
        c = CUSTOMERS[name]
        await service.add_customer(
            c.customer_id, provider=c.provider, provider_customer_id=c.provider_customer_id
        )
    await service.add_customer("c_nostripe", provider=customer_pb2.PROVIDER_STRIPE)
    for customer_id, key in (("c_stripe", "a"), ("c_polar", "b"), ("c_nostripe", "c")):
        await service.usage.RecordUsage(record(customer_id, "tokens", 5, key))
    env = {k: v for k, v in service_env(dsn, fakes, lease=10).items() if "POLAR" not in k}

    out = await cli(env, "drain", "--once")
    assert "drain: 2 reports handled; no credentials: polar" in out
    assert fakes.stripe.totals() == {("cus_s", "llm_tokens"): 5}
    out = await cli(env, "status")
    assert "polar (no credentials: waiting): pending 1 (oldest 0m" in out
    assert "stripe: pending 0 (oldest -), parked 1" in out
    assert "parked 1: the customer has no Stripe customer id" in out
    assert "requeued 1 events" in await cli(env, "requeue", "--provider", "stripe")
    assert "stripe: pending 1" in await cli(env, "status")


async def cli(env: Mapping[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *executable(),
        *args,
        env={**os.environ, "USAGE_PLANS_FILE": str(PLANS_FILE), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    return out.decode()
