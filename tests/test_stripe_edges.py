"""Stripe max / last reports at their edges: the period figure a report carries must be made only of
the usage billed to Stripe, and must stay right across period boundaries."""

from __future__ import annotations

import datetime as dt

import test_drain
from conftest import Service
from fakes.world import POLAR_CUSTOMER, Fakes
from test_drain import MakeDrain, drain_until_quiet, record_many, summary

from usage.v1 import customer_pb2

fakes = test_drain.fakes  # fixtures
make_drain = test_drain.make_drain


async def test_a_stripe_max_after_an_upgrade_leaves_out_the_free_plans_peak(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    """A customer on a free plan (no provider) peaks at 1,000 on a max meter, then upgrades to
    Stripe in the same period and uses 10. Usage counted while it had no provider is never
    billed: Stripe must hold 10, not the free plan's peak."""
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(days=5), now + dt.timedelta(days=25)
    await service.add_customer("c_up", start=start, end=end)  # no provider
    await record_many(service, "c_up", "storage", [1000], now - dt.timedelta(days=2))
    await service.add_customer(
        "c_up",
        start=start,
        end=end,
        provider=customer_pb2.PROVIDER_STRIPE,
        provider_customer_id="cus_up",
    )
    await record_many(service, "c_up", "storage", [10], now - dt.timedelta(minutes=1))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    meter = (await summary(service, "c_up"))["storage"]
    assert (meter.unbilled, meter.reported) == (1, 1)  # one event each (max meters count events)
    assert fakes.stripe.last("cus_up", "storage", start, end) == 10


async def test_a_stripe_max_after_a_switch_leaves_out_the_old_providers_peak(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    """Polar -> Stripe mid-period on a max meter: Polar receives the 900 event counted under
    it; Stripe must not bill the same 900 again as its period figure."""
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(days=5), now + dt.timedelta(days=25)
    await service.add_customer(
        "c_sw",
        start=start,
        end=end,
        provider=customer_pb2.PROVIDER_POLAR,
        provider_customer_id=POLAR_CUSTOMER,
    )
    await record_many(service, "c_sw", "storage", [900], now - dt.timedelta(minutes=3))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    await service.add_customer(
        "c_sw",
        start=start,
        end=end,
        provider=customer_pb2.PROVIDER_STRIPE,
        provider_customer_id="cus_sw",
    )
    await record_many(service, "c_sw", "storage", [20], now - dt.timedelta(minutes=1))
    await drain_until_quiet([d], service.db)
    assert fakes.polar.totals() == {(POLAR_CUSTOMER, "storage"): 900}
    assert fakes.stripe.last("cus_sw", "storage", start, end) == 20


async def test_stripe_last_meter_events_exactly_on_the_boundary(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    """`last` events exactly at a period's start belong to that period; a late
    event of the ended period recorded after the new period's report keeps each period's
    figure in Stripe."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    boundary = now - dt.timedelta(hours=1)
    await service.add_customer(
        "c_b",
        start=boundary - dt.timedelta(days=30),
        end=boundary,
        provider=customer_pb2.PROVIDER_STRIPE,
        provider_customer_id="cus_b",
    )
    d = await make_drain()
    await record_many(service, "c_b", "seats", [3], boundary)  # first instant of the next period
    await record_many(service, "c_b", "seats", [4], boundary - dt.timedelta(seconds=2))
    await drain_until_quiet([d], service.db)
    await record_many(service, "c_b", "seats", [9], boundary - dt.timedelta(milliseconds=1))
    await drain_until_quiet([d], service.db)
    ended = (boundary - dt.timedelta(days=30), boundary)
    assert fakes.stripe.last("cus_b", "seats", *ended) == 9
    nxt = await service.db.fetchrow(
        "SELECT period_start, period_end FROM usage_totals"
        " WHERE customer_id = 'c_b' AND meter = 'seats' AND period_start = $1",
        boundary,
    )
    assert nxt is not None
    assert fakes.stripe.last("cus_b", "seats", nxt["period_start"], nxt["period_end"]) == 3
    assert fakes.violations() == []


async def test_waiting_usage_follows_a_corrected_id_at_the_same_provider(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    """The provider is decided when usage is counted; the customer's id at that provider is the
    latest one a webhook gave: a new id at the same provider corrects where waiting usage goes
    (what was already reported stays where it went)."""
    now = dt.datetime.now(dt.UTC)
    await service.add_customer(
        "c_re", provider=customer_pb2.PROVIDER_STRIPE, provider_customer_id="cus_old"
    )
    await record_many(service, "c_re", "tokens", [3], now - dt.timedelta(minutes=3))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    await record_many(service, "c_re", "tokens", [10], now - dt.timedelta(minutes=2))
    await service.add_customer(
        "c_re", provider=customer_pb2.PROVIDER_STRIPE, provider_customer_id="cus_new"
    )
    await record_many(service, "c_re", "tokens", [5], now - dt.timedelta(minutes=1))
    await drain_until_quiet([d], service.db)
    assert fakes.stripe.totals() == {("cus_old", "llm_tokens"): 3, ("cus_new", "llm_tokens"): 15}
