"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import Awaitable, Callable, Mapping

import asyncpg
import grpc
from citus import ENABLED as CITUS
from google.rpc import error_details_pb2, status_pb2

from usage.v1 import customer_pb2, usage_pb2
from usage_service import providers
from usage_service.domain.plans import Meter
from usage_service.drain import background
from usage_service.drain.loop import Drain, DrainSettings
from usage_service.providers.config import ProviderSettings
from usage_service.storage import connections, drain_store, store

WAIT = 10.0  # seconds a condition awaited by `wait_for` may take


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Polls `condition` until it holds; fails after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def lock_waiters(db: asyncpg.Pool) -> int:
    """Sessions of the pool's database waiting for a lock (on a Citus cluster, on any node: a
    statement the coordinator routes to a worker waits there)."""
    activity = "citus_stat_activity" if CITUS else "pg_stat_activity"
    return int(
        await db.fetchval(
            f"SELECT count(*) FROM {activity} WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        )
    )


@dataclasses.dataclass
class Details:
    code: grpc.StatusCode
    reason: str
    domain: str
    metadata: dict[str, str]
    fields: dict[str, str]  # field -> description, from google.rpc.BadRequest


def details(error: grpc.aio.AioRpcError) -> Details:
    """The rich error details of a failed call, read from its trailers."""
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw, f"no rich status on {error.code()}: {error.details()}"
    status = status_pb2.Status.FromString(raw)
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    for item in status.details:
        if item.Is(info.DESCRIPTOR):
            item.Unpack(info)
        elif item.Is(bad.DESCRIPTOR):
            item.Unpack(bad)
    return Details(
        code=error.code(),
        reason=info.reason,
        domain=info.domain,
        metadata=dict(info.metadata),
        fields={v.field: v.description for v in bad.field_violations},
    )


def record(
    customer_id: str = "cus_1",
    meter: str = "tokens",
    quantity: int = 1,
    key: str = "k1",
    when: dt.datetime | None = None,
    **properties: str,
) -> usage_pb2.RecordUsageRequest:
    req = usage_pb2.RecordUsageRequest(
        customer_id=customer_id,
        meter=meter,
        quantity=quantity,
        idempotency_key=key,
        properties=properties,
    )
    if when is not None:
        req.event_time.FromDatetime(when)
    return req


async def logged_store(dsn: str, statements: list[str], size: int = 4) -> store.Store:
    """A Store whose connections append every statement they run to `statements`."""

    async def init(conn: asyncpg.Connection) -> None:
        await connections.init_connection(conn)
        conn.add_query_logger(lambda q: statements.append(q.query))

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=size, init=init)
    assert pool is not None
    return store.Store(pool)


# The drain counters of every totals row, recomputed from its events' report states: what the
# drain keeps when it settles, for tests that set report states by hand.
RECOUNT_DRAIN_COUNTERS = """
UPDATE usage_totals t SET reported_count = a.rc, reported_sum = a.rs,
    failed_count = a.fc, failed_sum = a.fs
FROM (
    SELECT t2.customer_id, t2.meter, t2.period_start,
        count(*) FILTER (WHERE e.report_state = 'reported') AS rc,
        coalesce(sum(e.quantity - e.covered) FILTER (WHERE e.report_state = 'reported'), 0)
            AS rs,
        count(*) FILTER (WHERE e.report_state = 'failed') AS fc,
        coalesce(sum(e.quantity - e.covered) FILTER (WHERE e.report_state = 'failed'), 0)
            AS fs
    FROM usage_totals t2 JOIN usage_events e ON e.customer_id = t2.customer_id
        AND e.meter = t2.meter AND e.event_time >= t2.period_start
        AND e.event_time < t2.period_end
    GROUP BY 1, 2, 3) a
WHERE t.customer_id = a.customer_id AND t.meter = a.meter AND t.period_start = a.period_start"""


def active_customer(customer_id: str = "cus_1", plan_id: str = "basic") -> customer_pb2.Customer:
    """An ACTIVE customer whose current period runs from a day ago to 29 days ahead."""
    now = dt.datetime.now(dt.UTC)
    customer = customer_pb2.Customer(
        customer_id=customer_id,
        plan_id=plan_id,
        subscription_status=customer_pb2.SUBSCRIPTION_STATUS_ACTIVE,
    )
    customer.current_period_start_time.FromDatetime(now - dt.timedelta(days=1))
    customer.current_period_end_time.FromDatetime(now + dt.timedelta(days=29))
    return customer


class Drains:
    """Drains on one database, each with its own pool and the adapters an environment
    configures; `close` closes them all."""

    def __init__(self, dsn: str, meters: Mapping[str, Meter]) -> None:
        self.dsn = dsn
        self.meters = meters
        self.made: list[tuple[Drain, asyncpg.Pool]] = []

    async def make(
        self, env: Mapping[str, str], settings: DrainSettings, owner: str = "", pool_size: int = 5
    ) -> Drain:
        pool = await connections.create_pool(self.dsn, pool_size)
        adapters = providers.adapters(ProviderSettings.from_env(env), self.meters)
        d = Drain(drain_store.DrainStore(pool), adapters, self.meters, settings, owner)
        self.made.append((d, pool))
        return d

    async def close(self) -> None:
        for d, pool in self.made:
            await background.close(d)
            await pool.close()
