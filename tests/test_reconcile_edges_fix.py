"""Adversarial tests of `reconcile --fix`: a fix must make up exactly what the provider lost,
once, whatever runs beside it or after it (another reconcile, the drain, a late provider)."""

from __future__ import annotations

import asyncio
import datetime as dt

from conftest import Service
from fakes.world import CUSTOMERS, Fakes
from test_drain import MakeDrain, drain_until_quiet, fakes, make_drain, record_many
from test_reconcile import MakeReconciler, _sent_ids, make_reconciler, setup

from usage_service import domain
from usage_service.domain import plans as plans_mod
from usage_service.drain.loop import Drain
from usage_service.providers.config import ProviderSettings
from usage_service.providers.readback import Held, Query, ReadBack
from usage_service.reconcile import background
from usage_service.reconcile.reconciler import Reconciler, Row, Verdict
from usage_service.storage import connections, store

__all__ = ["fakes", "make_drain", "make_reconciler"]  # fixtures

STRIPE = CUSTOMERS["stripe"]


class Gated:
    """The real read-back, with a gate after reading one meter's figure: a reconcile that read the
    provider and has not acted yet (a slow process, a second operator), nothing else changed."""

    def __init__(self, inner: ReadBack, event_name: str) -> None:
        self.inner = inner
        self.event_name = event_name
        self.read = asyncio.Event()
        self.go = asyncio.Event()

    async def held(self, query: Query) -> Held:
        held = await self.inner.held(query)
        names = {query.meter.stripe.event_name, query.meter.polar.event_name}
        if self.event_name in names:
            self.read.set()
            await self.go.wait()
        return held


def gated(r: Reconciler, provider: domain.Provider, event_name: str) -> tuple[Reconciler, Gated]:
    gate = Gated(r.readbacks[provider], event_name)
    return Reconciler(r.store, {provider: gate}, r.meters, r.settle), gate


def tokens(rows: list[Row]) -> Row:
    (row,) = [r for r in rows if r.meter == "tokens"]
    return row


async def settle_reports(service: Service, d: Drain) -> None:
    """Cycles the drain until no report is open (fix reports included)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while await service.db.fetchval("SELECT count(*) FROM reports WHERE state = 'open'"):
        assert loop.time() < deadline, "reports still open"
        await d.cycle()


async def reported_sum(service: Service, customer_id: str, meter: str) -> int:
    return int(
        await service.db.fetchval(
            """SELECT coalesce(sum(quantity), 0) FROM usage_events WHERE customer_id = $1
               AND meter = $2 AND report_state = 'reported'""",
            customer_id,
            meter,
        )
    )


async def test_two_stripe_fixes_racing_across_a_drain_send_make_up_the_loss_once(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    """Two operators run `reconcile --fix` at once: B has read Stripe's figure (23 short) and
    not yet queued; A queues its fix and the drain sends it before B goes on. B must not queue a
    second 23 on the strength of a figure read before the first fix landed."""
    await setup(service, fakes, ("stripe",))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    (lost,) = _sent_ids(fakes, "stripe", "llm_tokens")
    fakes.stripe.drop(lost)
    a = await make_reconciler(settle=0.001)
    b, gate = gated(await make_reconciler(settle=0.001), domain.Provider.STRIPE, "llm_tokens")
    late = asyncio.create_task(b.run([STRIPE.customer_id], fix=True))
    await gate.read.wait()
    first = tokens(await a.run([STRIPE.customer_id], fix=True))
    assert first.fix.startswith("queued 23"), first
    await settle_reports(service, d)  # A's fix is delivered
    gate.go.set()
    second = tokens(await late)
    await settle_reports(service, d)
    held = fakes.stripe.summary("cus_s", "llm_tokens", 0, 2**40)
    fixes = await service.db.fetch("SELECT state, value FROM reports WHERE kind = 'fix'")
    assert [tuple(f) for f in fixes] == [("delivered", 23)], (second, fixes)
    assert held == 23, f"Stripe holds {held} for a reported 23 (B's fix: {second.fix!r})"


async def test_a_stripe_sum_fix_in_a_period_not_on_whole_minutes_is_seen_and_sent_once(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    """A period starting at :17 s; the customer's only events fall before its first whole
    minute. The drain times its sum report inside the whole minutes (so the summary sees it);
    the fix must be timed there too, or the summary never shows it and every later --fix
    queues the same amount again."""
    now = dt.datetime.now(dt.UTC)
    start = now.replace(second=0, microsecond=0) - dt.timedelta(minutes=2, seconds=-17)
    await service.add_customer(
        STRIPE.customer_id,
        start=start,
        end=start + dt.timedelta(days=30),
        provider=STRIPE.provider,
        provider_customer_id=STRIPE.provider_customer_id,
    )
    await record_many(
        service, STRIPE.customer_id, "tokens", [5, 7], start + dt.timedelta(seconds=1)
    )
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    (lost,) = _sent_ids(fakes, "stripe", "llm_tokens")
    fakes.stripe.drop(lost)
    r = await make_reconciler(settle=0.001)  # stands for: run again after the settle time
    first = tokens(await r.run(fix=True))
    assert (first.verdict, first.drift) == (Verdict.PROVIDER_LOWER, -12), first
    await settle_reports(service, d)
    after = tokens(await r.run(fix=True))
    await settle_reports(service, d)
    stamps = {i: e.timestamp for i, e in fakes.stripe.events.items()}
    held = fakes.stripe.summary("cus_s", "llm_tokens", 0, 2**40)
    assert held == 12, (
        f"Stripe holds {held} for a reported 12; after the fix the reconcile said "
        f"{after.verdict.value} ({after.why}) and {after.fix!r}; meter event timestamps "
        f"{stamps}, period starts {start.isoformat()}"
    )
    assert after.verdict is Verdict.MATCH, after


async def test_a_stripe_fix_after_the_provider_customer_id_changed_bills_no_one_twice(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    """The customer's Stripe id changes mid-period (cus_s -> cus_s2). What was reported went to
    cus_s; the read-back asks cus_s2 only, sees nothing, and --fix sends the whole period's sum
    to cus_s2: Stripe then bills it twice."""
    await setup(service, fakes, ("stripe",))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    fakes.stripe.customers.add("cus_s2")
    now = dt.datetime.now(dt.UTC)
    start = (now - dt.timedelta(days=1)).replace(second=0, microsecond=0)
    await service.add_customer(
        STRIPE.customer_id,
        start=start,
        end=start + dt.timedelta(days=30),
        provider=STRIPE.provider,
        provider_customer_id="cus_s2",
    )
    r = await make_reconciler(settle=0.001)
    row = tokens(await r.run(fix=True))
    await settle_reports(service, d)
    billed = {c: fakes.stripe.summary(c, "llm_tokens", 0, 2**40) for c in ("cus_s", "cus_s2")}
    assert sum(billed.values()) == 23, f"Stripe bills {billed} for 23 reported; row: {row}"
    assert row.verdict is not Verdict.PROVIDER_LOWER, row


async def test_a_lagging_stripe_is_settling_within_the_settle_time_and_gets_no_fix(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    """Stripe's summaries lag: within the settle time (USAGE_RECONCILE_SETTLE_SECONDS, which
    must exceed how late Stripe summarises) the shortfall is `settling` and --fix sends nothing;
    once Stripe catches up it holds exactly what was reported."""
    fakes.stripe.lag()
    await setup(service, fakes, ("stripe",))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    r = await make_reconciler()  # the default settle time
    row = tokens(await r.run(fix=True))
    assert (row.verdict, row.fix) == (Verdict.SETTLING, "")
    await settle_reports(service, d)
    fakes.stripe.catch_up()
    assert tokens(await r.run()).verdict is Verdict.MATCH
    assert fakes.stripe.summary("cus_s", "llm_tokens", 0, 2**40) == 23


async def test_a_fix_queued_while_new_events_wait_goes_first_and_the_lane_ends_exact(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    """A fix queued on a lane with events waiting for the drain: the drain sends the fix, then
    the waiting events; Stripe ends holding exactly what was reported."""
    await setup(service, fakes, ("stripe",))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    (lost,) = _sent_ids(fakes, "stripe", "llm_tokens")
    fakes.stripe.drop(lost)
    await record_many(service, STRIPE.customer_id, "tokens", [4, 6])
    r = await make_reconciler(settle=0.001)
    row = tokens(await r.run(fix=True))
    assert row.fix.startswith("queued 23"), row
    await drain_until_quiet([d], service.db)
    await settle_reports(service, d)
    held = fakes.stripe.summary("cus_s", "llm_tokens", 0, 2**40)
    assert held == await reported_sum(service, STRIPE.customer_id, "tokens") == 33
    assert tokens(await r.run(fix=True)).verdict is Verdict.MATCH


async def test_no_fix_is_queued_while_the_drain_holds_the_lane(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    """The drain has a report in flight on the lane (Stripe holds the request): reconcile says
    settling and queues nothing; once the report lands the lane matches."""
    await setup(service, fakes, ("stripe",))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    (lost,) = _sent_ids(fakes, "stripe", "llm_tokens")
    fakes.stripe.drop(lost)
    r = await make_reconciler(settle=0.001)
    first = tokens(await r.run(fix=True))
    assert first.fix.startswith("queued 23")
    # a second reconcile while the fix is open on the lane
    again = tokens(await r.run(fix=True))
    assert (again.verdict, again.fix) == (Verdict.SETTLING, "")
    await settle_reports(service, d)
    assert tokens(await r.run(fix=True)).verdict is Verdict.MATCH
    assert fakes.stripe.summary("cus_s", "llm_tokens", 0, 2**40) == 23


async def test_two_polar_fixes_racing_across_a_drain_send_are_deduplicated_by_polar(
    service: Service, fakes: Fakes, make_drain: MakeDrain, make_reconciler: MakeReconciler
) -> None:
    """The per-event race: B read Polar (an event missing), A queued the re-send and the drain
    sent it, then B queues it again. Polar dedupes by external_id: it bills the event once."""
    await setup(service, fakes, ("polar",))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    lost = _sent_ids(fakes, "polar", "tokens")[1]
    fakes.polar.drop(lost)
    a = await make_reconciler(settle=0.001)
    b, gate = gated(await make_reconciler(settle=0.001), domain.Provider.POLAR, "tokens")
    late = asyncio.create_task(b.run(["c_polar"], fix=True))
    await gate.read.wait()
    assert tokens(await a.run(["c_polar"], fix=True)).fix.startswith("queued a re-send of 1")
    await settle_reports(service, d)
    gate.go.set()
    await late
    await settle_reports(service, d)
    row = tokens(await a.run(["c_polar"]))
    assert (row.verdict, row.held, row.reported) == (Verdict.MATCH, 23, 23), row


async def test_a_fix_queued_through_the_service_s_own_pool_is_stored_as_a_json_array(
    service: Service,
    fakes: Fakes,
    make_drain: MakeDrain,
    dsn: str,
    plans: plans_mod.Plans,
) -> None:
    """`reconcile --fix` and `serve` use connections.create_pool, whose connections encode jsonb
    with json.dumps: a fix inserted as `json.dumps(events)` into `$4::jsonb` is stored as one JSON
    string, not an array. The next reconcile of that lane reads it back (units: FIXES) and a
    per-event --fix asks jsonb_array_elements of it (QUEUED)."""
    await setup(service, fakes, ("stripe", "polar"))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    (lost,) = _sent_ids(fakes, "stripe", "llm_tokens")
    fakes.stripe.drop(lost)
    fakes.polar.drop(_sent_ids(fakes, "polar", "tokens")[0])
    pool = await connections.create_pool(dsn, 2)
    env = {**fakes.env(), "USAGE_RECONCILE_SETTLE_SECONDS": "0.001"}
    r, adapters = background.build(
        store.Store(pool),
        plans.meters,
        background.ReconcileSettings.from_env(env),
        ProviderSettings.from_env(env),
    )
    try:
        first = await r.run(fix=True)
        assert {x.provider for x in first if x.fix.startswith("queued")} == {"stripe", "polar"}
        kinds = await service.db.fetch(
            "SELECT provider, jsonb_typeof(events) AS t FROM reports WHERE kind = 'fix' ORDER BY 1"
        )
        stored = [tuple(k) for k in kinds]
        try:
            again = await r.run(fix=True)
        except Exception as exc:
            again = repr(exc)  # type: ignore[assignment]
        assert stored == [("polar", "array"), ("stripe", "array")], (stored, again)
        await settle_reports(service, d)  # the drain sends both fixes: the fakes hold it all
    finally:
        await background.close(adapters)
        await pool.close()
