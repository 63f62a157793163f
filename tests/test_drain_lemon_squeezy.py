"""The drain against the Lemon Squeezy fake on a real PostgreSQL: at most one increment per report
lands, however late Lemon Squeezy applies a write (within the settle time) and however many
replicas drain; closed periods are never written into the current one."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import asyncpg
import pytest
from conftest import Service
from fakes.base import Fault
from fakes.lemon_squeezy import KEY, FakeLemonSqueezy
from fakes.world import LEMON_ITEMS
from helpers import Drains, record

from usage.v1 import customer_pb2, usage_pb2
from usage_service.domain import plans, reports
from usage_service.drain.loop import Drain, DrainSettings
from usage_service.providers.lemon_squeezy import CLOSED_PERIOD

TIMEOUT = 0.5  # seconds per Lemon Squeezy call
SETTLE = 1.0  # seconds Lemon Squeezy may take to apply a write after we gave up
QUIET_TIMEOUT = 60.0  # seconds
FAST = DrainSettings(
    interval=0.05, lease=10, claim=1000, backoff_base=0.02, backoff_cap=0.2, concurrency=8
)
CUSTOMER = "c_lemon"
MakeDrain = Callable[..., Awaitable[Drain]]


@pytest.fixture
def fake() -> Iterator[FakeLemonSqueezy]:
    server = FakeLemonSqueezy(dict.fromkeys(LEMON_ITEMS.values(), 0)).start()
    yield server
    server.stop()


@pytest.fixture
async def make_drain(
    dsn: str, plans: plans.Plans, fake: FakeLemonSqueezy
) -> AsyncIterator[MakeDrain]:
    drains = Drains(dsn, plans.meters)

    async def make(owner: str, lease: float = FAST.lease, http_timeout: float = TIMEOUT) -> Drain:
        env = {
            "LEMONSQUEEZY_API_KEY": KEY,
            "LEMONSQUEEZY_API_BASE": fake.url,
            "USAGE_PROVIDER_TIMEOUT_SECONDS": str(http_timeout),
            "LEMONSQUEEZY_SETTLE_SECONDS": str(SETTLE),
        }
        return await drains.make(env, FAST.model_copy(update={"lease": lease}), owner)

    yield make
    await drains.close()


async def add_customer(service: Service) -> None:
    await service.add_customer(
        CUSTOMER,
        provider=customer_pb2.PROVIDER_LEMON_SQUEEZY,
        subscription_items=LEMON_ITEMS,
    )


async def record_all(
    service: Service, meter: str, quantities: list[int], start: dt.datetime
) -> None:
    """One event per quantity, a millisecond apart."""
    requests = [
        record(CUSTOMER, meter, q, uuid.uuid4().hex, start + dt.timedelta(milliseconds=i))
        for i, q in enumerate(quantities)
    ]
    await service.usage.BatchRecordUsage(usage_pb2.BatchRecordUsageRequest(requests=requests))


async def drain_until_quiet(drains: list[Drain], db: asyncpg.Pool) -> None:
    """Cycles until none of the customer's events is pending (reports waiting for a retry become
    due on their own time, so this polls between cycles, up to a deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + QUIET_TIMEOUT
    while loop.time() < deadline:
        await asyncio.gather(*(d.cycle() for d in drains))
        left = await db.fetchval(
            "SELECT count(*) FROM usage_events WHERE customer_id = $1 AND report_state = 'pending'",
            CUSTOMER,
        )
        if left == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{left} events still pending after {QUIET_TIMEOUT}s")


def ago(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)


async def test_lemon_squeezy_late_write_after_timeout_lands_once(
    service: Service, fake: FakeLemonSqueezy, make_drain: MakeDrain
) -> None:
    await add_customer(service)
    await record_all(service, "tokens", [60, 40], ago(30))
    d = await make_drain("solo")
    fake.late_write()
    assert await d.cycle() == 1  # posted; Lemon Squeezy holds it unapplied; we time out
    assert fake.late_held.is_set() and fake.usage["si_tokens"] == 0
    fake.usage_read.clear()
    draining = asyncio.create_task(drain_until_quiet([d], service.db))
    # Lemon Squeezy applies the write late: right after the drain's next read of the item's
    # usage (so that a post made on that read would double it), and within the settle time.
    await asyncio.to_thread(fake.usage_read.wait, SETTLE / 2)
    fake.release_late()
    await draining
    assert fake.usage["si_tokens"] == 100
    assert fake.records == [("si_tokens", "increment", 100)] and len(fake.writes()) == 1
    assert fake.violations == []


async def test_lemon_squeezy_two_replicas_lease_expiring_mid_send_land_once(
    service: Service, fake: FakeLemonSqueezy, make_drain: MakeDrain
) -> None:
    await add_customer(service)
    await record_all(service, "tokens", [100], ago(30))
    claim_lease = 0.5  # seconds: shorter than the send it covers
    a = await make_drain("a", lease=claim_lease, http_timeout=1.0)
    b = await make_drain("b")
    fake.late_write()
    sending = asyncio.create_task(a.cycle())
    assert await asyncio.to_thread(fake.late_held.wait, 30)  # A's post is in flight, unapplied
    # The lease A took when it claimed the report runs out (by the database's clock) ...
    await service.db.execute(
        """SELECT pg_sleep(greatest(0, extract(epoch FROM
               (SELECT first_sent_at FROM reports) + make_interval(secs => $1)
               - clock_timestamp())))""",
        claim_lease,
    )
    # ... but storing the checkpoint before the post renewed it past the settle time.
    assert await b.cycle() == 0
    assert fake.usage["si_tokens"] == 0 and len(fake.writes()) == 1
    fake.release_late()  # Lemon Squeezy applies A's post
    await sending
    await drain_until_quiet([a, b], service.db)
    assert fake.usage["si_tokens"] == 100 and len(fake.writes()) == 1
    assert fake.violations == []


async def test_lemon_squeezy_fake_totals_equal_what_the_service_reported(
    service: Service, fake: FakeLemonSqueezy, make_drain: MakeDrain
) -> None:
    await add_customer(service)
    d = await make_drain("solo")
    await record_all(service, "tokens", [5, 7, 11], ago(60))
    await record_all(service, "storage", [100, 250, 50], ago(60))
    fake.late_write()
    await d.cycle()
    fake.release_late()
    faults = [
        Fault("status", 500, body={"errors": [{"detail": "boom", "status": "500"}]}),
        Fault("status", 429, {"Retry-After": "1"}, {"errors": [{"detail": "slow down"}]}),
        Fault("hang"),
        Fault("drop"),
        Fault("status", 503),
    ]
    fake.inject(
        *faults, *(dataclasses.replace(f, route="GET /v1/subscription-items/") for f in faults)
    )
    await record_all(service, "calls", [1, 1, 1, 1], ago(50))
    await record_all(service, "seats", [3, 9, 4], ago(50))
    await drain_until_quiet([d], service.db)
    await record_all(service, "tokens", [13], ago(40))
    await record_all(service, "seats", [6], ago(40))
    await drain_until_quiet([d], service.db)

    assert fake.violations == []
    rows = await service.db.fetch(
        """SELECT lane, value FROM reports WHERE provider = 'lemon_squeezy' AND state = 'delivered'
           ORDER BY settled_at"""
    )
    said: dict[str, int] = {}
    for row in rows:
        meter = row["lane"].split(reports.LANE_SEPARATOR)[-1]
        increment = meter in ("tokens", "calls")
        said[LEMON_ITEMS[meter]] = said.get(LEMON_ITEMS[meter], 0) * increment + row["value"]
    assert fake.totals() == said
    assert said == {"si_tokens": 36, "si_calls": 4, "si_seats": 6, "si_st": 250}
    answer = await service.usage.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(customer_id=CUSTOMER)
    )
    reported = {m.meter: m for m in answer.meters}
    assert reported["tokens"].reported == fake.totals()["si_tokens"]
    assert all(m.pending == 0 for m in answer.meters)


async def test_lemon_squeezy_closed_period_usage_is_parked_not_set_into_the_current_one(
    service: Service, fake: FakeLemonSqueezy, make_drain: MakeDrain
) -> None:
    await add_customer(service)
    await record_all(service, "seats", [10], ago(600))
    await record_all(service, "tokens", [7], ago(600))
    now = dt.datetime.now(dt.UTC)
    fake.roll_over(now - dt.timedelta(minutes=5), now + dt.timedelta(days=30))  # a renewal
    fake.usage["si_seats"] = 3  # the new period's figure
    await drain_until_quiet([await make_drain("solo")], service.db)
    assert fake.usage["si_seats"] == 3 and fake.usage["si_tokens"] == 0
    assert fake.writes() == []
    rows = await service.db.fetch(
        "SELECT report_state, last_error FROM usage_events WHERE customer_id = $1", CUSTOMER
    )
    assert [(r["report_state"], r["last_error"]) for r in rows] == [("failed", CLOSED_PERIOD)] * 2
    answer = await service.usage.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(customer_id=CUSTOMER)
    )
    assert all(m.reported == 0 and m.pending == 0 for m in answer.meters)
