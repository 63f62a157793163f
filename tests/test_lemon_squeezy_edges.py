"""The Lemon Squeezy drain at its edges: late-applied writes (within the settle time) against `set`
meters, and an operator move of a report whose increment may still land."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from conftest import Service
from fakes.lemon_squeezy import KEY, FakeLemonSqueezy
from fakes.stripe import KEY as STRIPE_KEY
from fakes.stripe import FakeStripe
from helpers import Drains
from test_drain_lemon_squeezy import (
    CUSTOMER,
    FAST,
    MakeDrain,
    add_customer,
    ago,
    drain_until_quiet,
    fake,
    record_all,
)

from usage.v1 import customer_pb2
from usage_service.domain import plans
from usage_service.drain.loop import Drain
from usage_service.storage import backlog

__all__ = ["fake"]  # fixture

TIMEOUT = 0.5  # seconds per Lemon Squeezy call
SETTLE = 5.0  # seconds Lemon Squeezy may take to apply a write after we gave up


@pytest.fixture
def stripe_fake() -> Iterator[FakeStripe]:
    server = FakeStripe().start()
    yield server
    server.stop()


@pytest.fixture
async def make_drain(
    dsn: str, plans: plans.Plans, fake: FakeLemonSqueezy, stripe_fake: FakeStripe
) -> AsyncIterator[MakeDrain]:
    """A drain on Lemon Squeezy (settle time SETTLE) and Stripe, both fakes."""
    drains = Drains(dsn, plans.meters)

    async def make(owner: str, lease: float = FAST.lease) -> Drain:
        env = {
            "LEMONSQUEEZY_API_KEY": KEY,
            "LEMONSQUEEZY_API_BASE": fake.url,
            "USAGE_PROVIDER_TIMEOUT_SECONDS": str(TIMEOUT),
            "LEMONSQUEEZY_SETTLE_SECONDS": str(SETTLE),
            "STRIPE_API_KEY": STRIPE_KEY,
            "STRIPE_API_BASE": stripe_fake.url,
        }
        return await drains.make(env, FAST.model_copy(update={"lease": lease}), owner)

    yield make
    await drains.close()


async def wait_records(fake: FakeLemonSqueezy, n: int, limit: float = 30.0) -> None:
    """Until the fake has applied `n` usage records (the late one is applied on its thread)."""
    deadline = time.monotonic() + limit
    while len(fake.records) < n:
        assert time.monotonic() < deadline, fake.records
        await asyncio.to_thread(fake.late_held.wait, 0.01)


async def test_a_late_set_lands_before_the_next_set_of_the_lane(
    service: Service, fake: FakeLemonSqueezy, make_drain: MakeDrain
) -> None:
    """A `last` meter (action set): the first set (5) times out and Lemon Squeezy holds it, to
    apply it late. While it may still land, the drain posts nothing more for the item (the
    report is held, so no newer set can overtake it); once it has landed, the figure 7 is set
    and stays."""
    await add_customer(service)
    await record_all(service, "seats", [5], ago(60))
    d = await make_drain("solo")
    fake.late_write()
    await d.cycle()  # set 5 posted; held unapplied; we time out
    assert fake.late_held.is_set()
    await record_all(service, "seats", [7], ago(30))
    for _ in range(3):
        await d.cycle()  # the lane is held: nothing is posted
    assert len(fake.writes()) == 1
    fake.release_late()  # Lemon Squeezy applies the first set 5, within the settle time
    await wait_records(fake, 1)
    await drain_until_quiet([d], service.db)
    assert fake.records[-1] == ("si_seats", "set", 7), fake.records
    assert fake.usage["si_seats"] == 7
    assert fake.violations == []


async def test_a_move_leaves_a_lemon_squeezy_increment_that_may_still_land(
    service: Service,
    fake: FakeLemonSqueezy,
    stripe_fake: FakeStripe,
    make_drain: MakeDrain,
) -> None:
    """An increment of 100 times out (Lemon Squeezy will apply it within the settle time); the
    drain waits for it to settle. The customer moves to Stripe and an operator runs
    `requeue --move-to-current-provider`, even with open reports: the report's retry is not due,
    so its events stay; Lemon Squeezy's late write lands and the 100 tokens are billed once."""
    await add_customer(service)
    await record_all(service, "tokens", [100], ago(30))
    d = await make_drain("solo")
    fake.late_write()
    await d.cycle()
    assert fake.late_held.is_set()
    await service.add_customer(
        CUSTOMER, provider=customer_pb2.PROVIDER_STRIPE, provider_customer_id="cus_moved"
    )
    moved = await backlog.Backlog(service.db).move_to_current_provider(
        "lemon_squeezy", [CUSTOMER], open_reports=True
    )
    assert (moved.events, moved.left_in_open_reports) == (0, 1)
    fake.release_late()
    await wait_records(fake, 1)
    await drain_until_quiet([d], service.db)
    billed_ls = fake.usage["si_tokens"]
    billed_stripe = stripe_fake.totals().get(("cus_moved", "llm_tokens"), 0)
    assert billed_ls + billed_stripe == 100, (moved, billed_ls, billed_stripe)
