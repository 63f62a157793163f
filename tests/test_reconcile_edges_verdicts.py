"""Adversarial tests of reconcile verdicts: period boundaries, late events, switched providers,
and the times Stripe sum reports are stated at."""

from __future__ import annotations

import datetime as dt

from conftest import Service
from fakes.world import CUSTOMERS, Fakes
from test_drain import MakeDrain, drain_until_quiet, fakes, make_drain, record_many
from test_reconcile import MakeReconciler, make_reconciler

from usage_service.providers import stripe_meters
from usage_service.reconcile.reconciler import Row, Verdict

__all__ = ["fakes", "make_drain", "make_reconciler"]  # fixtures

STRIPE, POLAR = CUSTOMERS["stripe"], CUSTOMERS["polar"]


def tokens(rows: list[Row], provider: str = "") -> Row:
    (row,) = [r for r in rows if r.meter == "tokens" and (not provider or r.provider == provider)]
    return row


async def add(service: Service, name: str, start: dt.datetime, **over: object) -> None:
    c = CUSTOMERS[name]
    fields: dict[str, object] = {
        "provider": c.provider,
        "provider_customer_id": c.provider_customer_id,
        "subscription_items": c.subscription_items,
    }
    fields.update(over)
    await service.add_customer(
        c.customer_id, start=start, end=start + dt.timedelta(days=30), **fields
    )


async def test_a_polar_event_just_after_a_period_starts_is_held_in_that_period(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    """Polar clamps a fresh event's timestamp to now - 5 s. An event 1 ms into a period that
    began 2 s ago is held with a timestamp of the previous period: the read-back cuts by that
    timestamp, so the current period shows it missing (provider lower, forever: a re-send is
    deduplicated) and the previous one shows it extra (provider higher)."""
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(seconds=2)
    await add(service, "polar", start)
    await record_many(
        service, POLAR.customer_id, "tokens", [5], start + dt.timedelta(milliseconds=1)
    )
    await drain_until_quiet([await make_drain()], service.db)
    r = await make_reconciler(settle=0.001)
    current = tokens(await r.run([POLAR.customer_id]))
    previous = [x for x in await r.run([POLAR.customer_id], which="previous")]
    assert current.verdict is Verdict.MATCH, (current, previous)
    assert all(x.verdict is Verdict.MATCH for x in previous), previous


async def test_a_late_stripe_event_in_the_last_partial_minute_of_the_previous_period(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    """The current period began at :17 s; an event of the previous period arrives late, timed in
    that period's last 17 s. Its sum report is stated inside the previous period's whole minutes,
    within Stripe's window, and `--period previous` and `--period <time>` both say match."""
    now = dt.datetime.now(dt.UTC)
    start = now.replace(second=0, microsecond=0) - dt.timedelta(minutes=1, seconds=-17)
    await add(service, "stripe", start)
    late = start - dt.timedelta(seconds=5)
    await record_many(service, STRIPE.customer_id, "tokens", [9], late)
    await drain_until_quiet([await make_drain()], service.db)
    (event,) = [e for e in fakes.stripe.events.values() if e.event_name == "llm_tokens"]
    stated = dt.datetime.fromtimestamp(event.timestamp, dt.UTC)
    first, last = stripe_meters.window(start - dt.timedelta(days=30), start)
    assert first <= stated < last, (stated, first, last)
    assert now - dt.timedelta(days=35) < stated < now + dt.timedelta(minutes=5)
    r = await make_reconciler(settle=0.001)
    prev = tokens(await r.run([STRIPE.customer_id], which="previous"))
    assert (prev.verdict, prev.held, prev.period_end) == (Verdict.MATCH, 9, start), prev
    at = tokens(await r.run([STRIPE.customer_id], which=late))
    assert (at.verdict, at.held) == (Verdict.MATCH, 9), at
    assert [x for x in await r.run([STRIPE.customer_id]) if x.meter == "tokens"] == []


async def test_a_stripe_sum_report_in_a_period_begun_seconds_ago_is_stated_inside_it(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    """A period that began 3 s ago (mid-minute): the report is moved to the period's first whole
    minute, which may lie up to a minute ahead; Stripe takes up to 5 minutes ahead, and the
    summary shows it."""
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(seconds=3)
    await add(service, "stripe", start)
    await record_many(service, STRIPE.customer_id, "tokens", [4], start + dt.timedelta(seconds=1))
    await drain_until_quiet([await make_drain()], service.db)
    (event,) = [e for e in fakes.stripe.events.values() if e.event_name == "llm_tokens"]
    assert start.timestamp() <= event.timestamp < now.timestamp() + 300
    row = tokens(await (await make_reconciler(settle=0.001)).run([STRIPE.customer_id]))
    assert (row.verdict, row.held) == (Verdict.MATCH, 4), row


async def test_a_customer_who_switched_from_polar_to_stripe_mid_period_matches_at_both(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    """One customer id, Polar until the switch and Stripe after it: a row per provider, each
    holding what was reported to it."""
    now = dt.datetime.now(dt.UTC)
    start = (now - dt.timedelta(days=1)).replace(second=0, microsecond=0)
    cid = "c_switch"
    await service.add_customer(
        cid, start=start, end=start + dt.timedelta(days=30), provider=POLAR.provider,
        provider_customer_id=POLAR.provider_customer_id,
    )  # fmt: skip
    await record_many(service, cid, "tokens", [5, 7], now - dt.timedelta(minutes=5))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    await service.add_customer(
        cid, start=start, end=start + dt.timedelta(days=30), provider=STRIPE.provider,
        provider_customer_id=STRIPE.provider_customer_id,
    )  # fmt: skip
    await record_many(service, cid, "tokens", [11], now - dt.timedelta(minutes=2))
    await drain_until_quiet([d], service.db)
    rows = await (await make_reconciler(settle=0.001)).run([cid])
    polar, stripe = tokens(rows, "polar"), tokens(rows, "stripe")
    assert (polar.verdict, polar.held, polar.reported) == (Verdict.MATCH, 12, 12), polar
    assert (stripe.verdict, stripe.held, stripe.reported) == (Verdict.MATCH, 11, 11), stripe


async def test_a_parked_stripe_event_is_recorded_but_not_expected(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    """A Stripe sum event parked (Stripe refused it for good): recorded counts it, reported and
    held do not, and the verdict is match, not provider lower."""
    now = dt.datetime.now(dt.UTC)
    start = (now - dt.timedelta(days=1)).replace(second=0, microsecond=0)
    await add(service, "stripe", start)
    await record_many(service, STRIPE.customer_id, "tokens", [5], now - dt.timedelta(minutes=3))
    d = await make_drain()
    from fakes.base import Fault

    fakes.stripe.inject(Fault("status", 400, body={"error": {"message": "bad", "type": "x"}}))
    await drain_until_quiet([d], service.db)
    await record_many(service, STRIPE.customer_id, "tokens", [7], now - dt.timedelta(minutes=2))
    await drain_until_quiet([d], service.db)
    states = await service.db.fetch(
        "SELECT quantity, report_state FROM usage_events WHERE customer_id = $1 ORDER BY 1",
        STRIPE.customer_id,
    )
    assert [tuple(s) for s in states] == [(5, "failed"), (7, "reported")]
    row = tokens(await (await make_reconciler(settle=0.001)).run([STRIPE.customer_id], fix=True))
    assert (row.recorded, row.reported, row.held, row.verdict, row.fix) == (
        12, 7, 7, Verdict.MATCH, ""
    )  # fmt: skip
