"""Fault injection: the real service under load while its PostgreSQL restarts or crashes, its
connections are killed, the service itself is killed or stopped, and callers give up mid-call.

Every case runs on a PostgreSQL the suite starts for itself (tests/pgcluster.py) and ends by
checking the database against what callers were told:
  - every call answered OK is stored, with the event_id it was answered with;
  - a retry of every key sent (answered or not) settles it, and nothing is stored twice;
  - the running totals equal the sum of the stored events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import random
import signal
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import grpc
import pytest
from pgcluster import Cluster
from process import ServiceProcess

from usage.v1 import customer_pb2, customer_pb2_grpc, usage_pb2, usage_pb2_grpc
from usage_service.storage import migrate

pytestmark = pytest.mark.process

CALL_TIMEOUT = 5.0  # seconds per call under load
RECOVERY_LIMIT = 15.0  # seconds the service may take to answer OK again after a fault
LOAD_LIMIT = 60.0  # seconds any load phase may run
WORKERS = 8
CUSTOMER = "cus_faults"
REFUSED = {grpc.StatusCode.UNAVAILABLE}
WAVES, WAVE_SIZE = 20, 20  # calls with short deadlines, sent wave by wave


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    pg = Cluster()
    yield pg
    pg.destroy()


@pytest.fixture
def fault_dsn(cluster: Cluster) -> Iterator[str]:
    name = f"faults_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(cluster.dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        await migrate.migrate_dsn(cluster.dsn_for(name))

    asyncio.run(create())
    yield cluster.dsn_for(name)


@dataclasses.dataclass
class Load:
    """Callers recording usage with unique keys, until stopped or a bound is reached."""

    address: str
    prefix: str = "k"
    sent: dict[str, int] = dataclasses.field(default_factory=dict)  # key -> quantity
    answered: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> event_id
    failed: dict[str, grpc.StatusCode] = dataclasses.field(default_factory=dict)
    last_ok: float = 0.0  # monotonic time of the latest OK answer
    max_calls: int = 20_000

    def __post_init__(self) -> None:
        self._stop = asyncio.Event()
        self._keys = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self.channel = grpc.aio.insecure_channel(self.address)
        stub = usage_pb2_grpc.UsageServiceStub(self.channel)
        self._tasks = [asyncio.create_task(self._worker(stub)) for _ in range(WORKERS)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self.channel.close()

    async def _worker(self, stub: usage_pb2_grpc.UsageServiceStub) -> None:
        rng = random.Random()
        deadline = time.monotonic() + LOAD_LIMIT
        while not self._stop.is_set() and time.monotonic() < deadline:
            n = next(self._keys)
            if n >= self.max_calls:
                return
            key, quantity = f"{self.prefix}{n}", rng.randint(1, 9)
            self.sent[key] = quantity
            try:
                answer = await stub.RecordUsage(_request(key, quantity), timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                self.failed[key] = exc.code()
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    await asyncio.sleep(0.01)  # a caller's backoff, not synchronisation
                continue
            self.answered[key] = answer.event_id
            self.last_ok = time.monotonic()

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        limit = time.monotonic() + LOAD_LIMIT
        while not condition():
            assert time.monotonic() < limit, f"timed out waiting for {what}"
            assert not all(t.done() for t in self._tasks), f"load ended before {what}"
            await asyncio.sleep(0.01)


def _request(key: str, quantity: int) -> usage_pb2.RecordUsageRequest:
    return usage_pb2.RecordUsageRequest(
        customer_id=CUSTOMER, meter="tokens", quantity=quantity, idempotency_key=key
    )


async def _add_customer(address: str) -> None:
    now = dt.datetime.now(dt.UTC)
    customer = customer_pb2.Customer(
        customer_id=CUSTOMER,
        plan_id="metered",
        subscription_status=customer_pb2.SUBSCRIPTION_STATUS_ACTIVE,
    )
    customer.current_period_start_time.FromDatetime(now - dt.timedelta(days=1))
    customer.current_period_end_time.FromDatetime(now + dt.timedelta(days=29))
    async with grpc.aio.insecure_channel(address) as channel:
        await customer_pb2_grpc.CustomerServiceStub(channel).UpsertCustomer(
            customer_pb2.UpsertCustomerRequest(customer=customer), timeout=CALL_TIMEOUT
        )


async def _stored(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT idempotency_key, event_id FROM usage_events WHERE customer_id = $1", CUSTOMER
        )
    finally:
        await conn.close()
    return {r["idempotency_key"]: str(r["event_id"]) for r in rows}


async def _quiet(dsn: str) -> None:
    """Waits until no session of the database is busy: work a caller gave up on may still be
    committing (its outcome is then "stored once"), and must end before we look."""
    conn = await asyncpg.connect(dsn)
    try:
        limit = time.monotonic() + RECOVERY_LIMIT
        while await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND state <> 'idle'"
        ):
            assert time.monotonic() < limit, "the database never went quiet"
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


async def settle(dsn: str, address: str, loads: list[Load]) -> dict[str, int]:
    """Checks the invariants after a fault; returns counts for the report."""
    sent = {k: q for load in loads for k, q in load.sent.items()}
    answered = {k: e for load in loads for k, e in load.answered.items()}
    await _quiet(dsn)
    before = await _stored(dsn)
    lost = {k for k in answered if before.get(k) != answered[k]}
    assert not lost, f"{len(lost)} calls answered OK are not stored as answered: {sorted(lost)[:5]}"
    async with grpc.aio.insecure_channel(address) as channel:
        stub = usage_pb2_grpc.UsageServiceStub(channel)
        keys = sorted(sent)
        retries = await asyncio.gather(
            *(stub.RecordUsage(_request(k, sent[k]), timeout=30) for k in keys)
        )
    for key, retry in zip(keys, retries, strict=True):
        # Stored before the retry: the retry is a duplicate of it; not stored: stored now.
        assert retry.duplicate == (key in before), key
        if key in before:
            assert retry.event_id == before[key], key
    after = await _stored(dsn)
    assert set(after) == set(sent)  # one event per key, none twice (and nothing unasked for)
    conn = await asyncpg.connect(dsn)
    try:
        events_sum = await conn.fetchval(
            "SELECT sum(quantity) FROM usage_events WHERE customer_id = $1", CUSTOMER
        )
        totals_sum = await conn.fetchval(
            "SELECT quantity_sum FROM usage_totals WHERE customer_id = $1 AND meter = 'tokens'",
            CUSTOMER,
        )
    finally:
        await conn.close()
    assert events_sum == totals_sum == sum(sent.values())
    failed = {k: c for load in loads for k, c in load.failed.items()}
    return {
        "sent": len(sent),
        "answered_ok": len(answered),
        "failed": len(failed),
        "failed_but_stored": len(set(failed) & set(before)),
    }


@pytest.fixture
async def service(fault_dsn: str) -> AsyncIterator[ServiceProcess]:
    proc = await asyncio.to_thread(
        ServiceProcess,
        {
            "DATABASE_URL": fault_dsn,
            "USAGE_DB_POOL_SIZE": "8",
            "USAGE_LOG_LEVEL": "WARNING",
            "USAGE_METRICS_ADDRESS": "127.0.0.1:0",
        },
    )
    await _add_customer(proc.address)
    yield proc
    proc.kill()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_restart_under_load(
    cluster: Cluster, fault_dsn: str, service: ServiceProcess, mode: str
) -> None:
    """While PostgreSQL is down, calls fail with UNAVAILABLE (never a wrong OK); the service
    answers OK again by itself within seconds; every OK is stored."""
    async with Load(service.address) as load:
        await load.until(lambda: len(load.answered) >= 100, "a first 100 OK")
        await asyncio.to_thread(cluster.restart, mode)
        back = time.monotonic()
        await load.until(lambda: load.last_ok > back, "an OK after the restart")
        recovery = load.last_ok - back
        ok_after = len(load.answered)
        await load.until(lambda: len(load.answered) >= ok_after + 100, "100 more OK")
    assert recovery < RECOVERY_LIMIT
    codes = set(load.failed.values())
    assert load.failed, "the restart went unnoticed: the fault was not injected under load"
    assert codes <= REFUSED, codes
    counts = await settle(fault_dsn, service.address, [load])
    print(f"restart -m {mode}: recovered in {recovery:.2f}s, {counts}")


async def test_connections_killed_under_load(
    cluster: Cluster, fault_dsn: str, service: ServiceProcess
) -> None:
    """pg_terminate_backend on every connection of the service, three times: the pool heals."""
    database = fault_dsn.rsplit("/", 1)[1]
    admin = await asyncpg.connect(cluster.dsn)
    killed = 0
    try:
        async with Load(service.address) as load:
            for round_ in range(3):
                target = len(load.answered) + 100
                await load.until(lambda t=target: len(load.answered) >= t, f"round {round_}")
                killed += await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()",
                    database,
                )
            cut = time.monotonic()
            await load.until(lambda: load.last_ok > cut, "an OK after the last kill")
            target = len(load.answered) + 100
            await load.until(lambda: len(load.answered) >= target, "100 OK after the kills")
    finally:
        await admin.close()
    assert killed >= 3
    assert set(load.failed.values()) <= REFUSED, "".join(service.output)[-3000:]
    counts = await settle(fault_dsn, service.address, [load])
    print(f"pg_terminate_backend x3 ({killed} connections): {counts}")


async def test_service_killed_under_load_and_restarted(
    fault_dsn: str, service: ServiceProcess
) -> None:
    """SIGKILL mid-load: every call answered OK is stored, and after a restart a retry of
    every key stores nothing twice."""
    async with Load(service.address) as load:
        await load.until(lambda: len(load.answered) >= 300, "300 OK")
        service.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(service.proc.wait, 30)
    assert set(load.failed.values()) <= REFUSED | {grpc.StatusCode.CANCELLED}
    restarted = await asyncio.to_thread(ServiceProcess, {"DATABASE_URL": fault_dsn})
    try:
        counts = await settle(fault_dsn, restarted.address, [load])
    finally:
        restarted.kill()
    print(f"SIGKILL: {counts}")


async def test_sigterm_finishes_in_flight_calls_and_releases_leases(
    fault_dsn: str, service: ServiceProcess
) -> None:
    """SIGTERM while calls wait on a lock in the database: they finish OK within the grace
    period once the lock goes; nothing answered OK is lost; no drain lease is left held."""
    conn = await asyncpg.connect(fault_dsn)
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = usage_pb2_grpc.UsageServiceStub(channel)
            tx = conn.transaction()
            await tx.start()
            await conn.execute(
                "SELECT 1 FROM customers WHERE customer_id = $1 FOR UPDATE", CUSTOMER
            )
            blocked = [
                asyncio.ensure_future(stub.RecordUsage(_request(f"held{i}", 1), timeout=20))
                for i in range(20)
            ]

            async def waiting() -> int:
                return int(
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    )
                )

            limit = time.monotonic() + 10
            # All 20 are being served (however the service groups them) and wait on the lock.
            while await waiting() < 1 or await asyncio.to_thread(_in_flight, service) < 20:
                assert time.monotonic() < limit, "calls never reached the lock"
                await asyncio.sleep(0.01)
            service.proc.send_signal(signal.SIGTERM)
            health_refused = await _wait_not_serving(channel)
            await tx.rollback()
            answers = await asyncio.gather(*blocked, return_exceptions=True)
        code = await asyncio.to_thread(service.proc.wait, 30)
    finally:
        await conn.close()
    assert health_refused
    assert code == 0
    ok = {f"held{i}": a.event_id for i, a in enumerate(answers) if not isinstance(a, Exception)}
    errors = [a for a in answers if isinstance(a, Exception)]
    assert len(ok) == 20, errors[:3]  # in flight when SIGTERM came: all finished
    stored = await _stored(fault_dsn)
    assert all(stored.get(k) == e for k, e in ok.items())
    conn = await asyncpg.connect(fault_dsn)
    try:
        held = await conn.fetchval(
            "SELECT count(*) FROM reports WHERE leased_by IS NOT NULL AND lease_until > now()"
        )
    finally:
        await conn.close()
    assert held == 0
    print(f"SIGTERM: {len(ok)} in-flight calls finished OK")


def _in_flight(service: ServiceProcess) -> float:
    """The service's own count of calls being served, from its metrics endpoint."""
    line = next(line for line in service.output if " metrics on " in line)
    with urllib.request.urlopen(f"http://{line.split()[-1]}/metrics", timeout=5) as answer:
        for sample in answer.read().decode().splitlines():
            if sample.startswith("usage_rpc_in_flight "):
                return float(sample.split()[1])
    raise AssertionError("no usage_rpc_in_flight metric")


async def _wait_not_serving(channel: grpc.aio.Channel) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    limit = time.monotonic() + 10
    while time.monotonic() < limit:
        try:
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.aio.AioRpcError:
            return True
        if answer.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            return True
        await asyncio.sleep(0.01)
    return False


async def test_callers_giving_up_mid_call(fault_dsn: str, service: ServiceProcess) -> None:
    """Callers with deadlines too short to finish: each outcome is stored once or not at all,
    and a retry with the same key settles it (records and check-and-consume alike)."""
    rng = random.Random(7)
    sent: dict[str, int] = {}
    results: list[Any] = []
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = usage_pb2_grpc.UsageServiceStub(channel)
        for wave in range(WAVES):
            calls = []
            for i in range(WAVE_SIZE):
                key, quantity = f"d{wave}-{i}", rng.randint(1, 9)
                sent[key] = quantity
                timeout = rng.uniform(0.001, 0.03)
                if i % 2:
                    calls.append(stub.RecordUsage(_request(key, quantity), timeout=timeout))
                    continue
                consume = usage_pb2.CheckEntitlementRequest(
                    customer_id=CUSTOMER,
                    feature="tokens",
                    quantity=quantity,
                    consume=True,
                    idempotency_key=key,
                )
                calls.append(stub.CheckEntitlement(consume, timeout=timeout))
            results += await asyncio.gather(*calls, return_exceptions=True)
    codes = {r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)}
    assert codes <= {grpc.StatusCode.DEADLINE_EXCEEDED}, codes
    load = Load(service.address)
    load.sent = sent
    for key, result in zip(sent, results, strict=True):
        if isinstance(result, grpc.aio.AioRpcError):
            load.failed[key] = result.code()
        else:
            load.answered[key] = result.event_id
    assert load.failed and load.answered, "every call expired, or none did: little was tested"
    counts = await settle(fault_dsn, service.address, [load])
    print(f"deadlines: {counts}")
