"""Reconciliation: what each provider holds for a customer, meter and period, against what the
service reported to it, with a verdict, and a fix queued where a fix is safe.

The provider should hold exactly what it accepted from us: `expected` is the figure of the
events it accepted (a fix makes up for what the provider lost and adds nothing to that). A
provider that shows less is `provider lower`, more `provider higher`; either is `settling` while
a send is in flight or was accepted within the settle time (providers summarise
asynchronously). A fix is queued only for a provider that holds
less: for Stripe sum meters one meter event of the missing amount, for Polar, Dodo Payments and
Creem the missing events again (they dedupe by event id). The drain sends fixes like any report.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Callable, Mapping, Sequence

from usage_service import domain
from usage_service.domain.plans import Aggregation, Meter
from usage_service.domain.reports import Sent
from usage_service.providers import dodo_payments, stripe_meters
from usage_service.providers.readback import Held, Query, ReadBack
from usage_service.providers.stripe_meters import StripeMeters
from usage_service.storage.reconcile_store import ReconcileStore, Unit

DEFAULT_SETTLE = 600.0  # seconds a provider may take to show what it accepted
PER_EVENT = frozenset({domain.Provider.POLAR, domain.Provider.DODO_PAYMENTS, domain.Provider.CREEM})


class Verdict(enum.StrEnum):
    MATCH = "match"
    PROVIDER_LOWER = "provider lower"
    PROVIDER_HIGHER = "provider higher"
    SETTLING = "provider still settling"
    CANNOT_TELL = "cannot tell"


DRIFT = frozenset({Verdict.PROVIDER_LOWER, Verdict.PROVIDER_HIGHER})


@dataclasses.dataclass(frozen=True)
class Row:
    customer_id: str
    provider: str
    meter: str
    period_start: dt.datetime
    period_end: dt.datetime
    recorded: int | None  # every event billed to the provider, in the meter's units
    reported: int | None  # the events it accepted
    held: int | None  # what it shows
    drift: int | None  # held - reported
    verdict: Verdict
    why: str = ""
    fix: str = ""  # what --fix did

    def as_json(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        out["period_start"] = self.period_start.isoformat()
        out["period_end"] = self.period_end.isoformat()
        out["verdict"] = self.verdict.value
        return out


def figure(aggregation: Aggregation, unit: Unit, accepted: bool) -> int | None:
    """The unit's figure in the meter's units, over all its events or the accepted ones."""
    i = 1 if accepted else 0
    f = unit.figures
    if aggregation is Aggregation.SUM:
        return f.total[i]
    if aggregation is Aggregation.COUNT:
        return f.count[i]
    if aggregation is Aggregation.MAX:
        return f.peak[i]
    return f.last[i]


def judge(
    unit: Unit, expected: int | None, held: Held, now: dt.datetime, settle: float
) -> tuple[Verdict, str]:
    if held.value is None:
        return Verdict.CANNOT_TELL, held.why
    want = expected or 0
    lower = held.value < want or bool(held.missing)
    higher = held.value > want or held.extra > 0
    if not lower and not higher:
        return Verdict.MATCH, ""
    if unit.in_reports or unit.fixing:
        return Verdict.SETTLING, "a report to it is in flight"
    recent = unit.last_reported_at is not None and (
        (now - unit.last_reported_at).total_seconds() < settle
    )
    if lower and recent:
        return Verdict.SETTLING, f"it accepted events less than {settle:.0f}s ago"
    if lower:
        missing = f"; {len(held.missing)} events missing" if held.missing else ""
        return Verdict.PROVIDER_LOWER, f"it shows {want - held.value} less{missing}"
    extra = f" ({held.extra} beyond what was sent)" if held.extra else ""
    return Verdict.PROVIDER_HIGHER, f"it shows {held.value - want} more{extra}"


@dataclasses.dataclass(frozen=True)
class MeterErrorRow:
    """A meter error Stripe reported after accepting an event, with what that event carried."""

    stripe_event: str  # the Stripe event carrying the report
    code: str
    count: int  # errors of this code the report counts (it names a sample of them)
    message: str
    identifier: str
    created: dt.datetime
    customer_id: str = ""  # "" when the identifier is not one of ours
    meter: str = ""
    event_ids: tuple[str, ...] = ()

    def as_json(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        out["created"] = self.created.isoformat()
        return {"stripe_meter_error": out}


class Reconciler:
    def __init__(
        self,
        store: ReconcileStore,
        readbacks: Mapping[domain.Provider, ReadBack],
        meters: Mapping[str, Meter],
        settle: float = DEFAULT_SETTLE,
    ) -> None:
        self.store = store
        self.readbacks = readbacks
        self.meters = meters
        self.settle = settle

    async def run(
        self,
        customer_ids: Sequence[str] = (),
        provider: str = "",
        which: str | dt.datetime = "current",
        fix: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Row]:
        ids = await self.store.customers(customer_ids, provider)
        out: list[Row] = []
        for done, customer_id in enumerate(ids, 1):
            now = dt.datetime.now(dt.UTC)
            for unit in await self.store.units(customer_id, which, provider, now):
                out.append(await self._row(unit, now, fix))
            if progress is not None:
                progress(done, len(ids))
        return out

    async def meter_errors(self, since: dt.datetime) -> list[MeterErrorRow] | str:
        """Stripe's meter error reports from `since` on, each with the events it names; a
        reason when they cannot be read (or Stripe is not configured: an empty list)."""
        stripe = self.readbacks.get(domain.Provider.STRIPE)
        if not isinstance(stripe, StripeMeters):
            return []
        try:
            errors = await stripe.error_reports(since)
        except Exception as exc:  # the SDK's errors, and anything unexpected in the answer
            return f"stripe meter error reports could not be read: {exc}"
        carried = await self.store.carried([e.identifier for e in errors if e.identifier])
        out = []
        for e in errors:
            c = carried.get(e.identifier)
            where = (c.customer_id, c.meter, c.event_ids) if c else ("", "", ())
            out.append(
                MeterErrorRow(
                    e.event_id, e.code, e.count, e.message, e.identifier, e.created, *where
                )
            )
        return out

    async def _row(self, unit: Unit, now: dt.datetime, fix: bool) -> Row:
        meter = self.meters.get(unit.meter)
        readback = self.readbacks.get(unit.provider)
        base = Row(
            unit.customer_id,
            unit.provider.value,
            unit.meter,
            unit.period.start,
            unit.period.end,
            None,
            None,
            None,
            None,
            Verdict.CANNOT_TELL,
        )
        if meter is None:
            return dataclasses.replace(base, why=f"meter {unit.meter!r} is not in the plans file")
        recorded = figure(meter.aggregation, unit, accepted=False)
        expected = figure(meter.aggregation, unit, accepted=True)
        base = dataclasses.replace(base, recorded=recorded, reported=expected)
        if readback is None:
            return dataclasses.replace(base, why=f"no credentials for {unit.provider.value}")
        sent = await self.store.sent(unit) if unit.provider in PER_EVENT else ()
        query = Query(
            unit.customer_id,
            unit.provider_customer_id,
            unit.subscription_item,
            meter,
            unit.period.start,
            unit.period.end,
            sent,
        )
        if unit.provider is domain.Provider.STRIPE:
            ids = await self.store.sent_to(unit) - {unit.provider_customer_id}
            if ids:
                why = (
                    f"the customer's Stripe id changed within the period (reports went to "
                    f"{', '.join(sorted(ids))}, it is now {unit.provider_customer_id}): "
                    "read each back in Stripe"
                )
                return dataclasses.replace(base, why=why)
        held = await readback.held(query)
        verdict, why = judge(unit, expected, held, now, self.settle)
        drift = None if held.value is None else held.value - (expected or 0)
        row = dataclasses.replace(base, held=held.value, drift=drift, verdict=verdict, why=why)
        if fix and verdict is Verdict.PROVIDER_LOWER:
            fixed = await self._fix(unit, meter, row, held, sent, now)
            row = dataclasses.replace(row, fix=fixed)
        return row

    async def _fix(
        self,
        unit: Unit,
        meter: Meter,
        row: Row,
        held: Held,
        sent: Sequence[Sent],
        now: dt.datetime,
    ) -> str:
        """Queues a fix where it is safe; says what it did."""
        if unit.provider in PER_EVENT:
            if not held.missing:
                return "not fixed: the provider names no missing event"
            queued = await self.store.queued(unit.customer_id, held.missing)
            todo = [e for e in held.missing if e not in queued]
            if not todo:
                return "a re-send is already queued"
            if unit.provider is domain.Provider.DODO_PAYMENTS:
                oldest = now - dodo_payments.WINDOW + dodo_payments.WINDOW_MARGIN
                times = {s.event_id: s.event_time for s in sent}
                todo = [e for e in todo if times.get(e, oldest) >= oldest]
                if not todo:
                    return "not fixed: Dodo Payments takes events of the last hour only"
            report = await self.store.fix_events(unit, todo)
            return f"queued a re-send of {len(todo)} events (report {report})"
        if unit.provider is domain.Provider.STRIPE and meter.aggregation is Aggregation.SUM:
            assert row.drift is not None
            bounds = unit.period.bounds
            report = await self.store.fix_amount(
                unit, -row.drift, lambda when: stripe_meters.stated(when, *bounds)
            )
            if report is None:
                return (
                    "not fixed now: a report is in flight on this lane, or a fix was queued "
                    "since this run read Stripe; run again"
                )
            return f"queued {-row.drift} (report {report})"
        return "not fixed: only Stripe sum meters and per-event providers are repaired"
