"""Which thresholds a customer's changes cross: no I/O.

Each change is judged by its own figures (a period's totals after it) against the thresholds of
the customer's plan as of that change (a 'customer' change names the plan it led to). A
threshold is crossed once per period: those in `known` (raised before) and those crossed
earlier in the same changes are passed over. Changes in a period that had ended when they
committed (a late event), or that ended more than LATE ago (an alerter that was off, or is
switched on over an old log), raise nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from usage_service.domain import Totals
from usage_service.domain.credits import Credit
from usage_service.domain.plans import Plans
from usage_service.storage import changes
from usage_service.storage.alerts import Crossing, Known

LATE = dt.timedelta(days=1)  # how long after its period ended a crossing is still raised
OWN_KIND = "threshold"  # the alerter's own changes: never judged
PLAN_KIND = "customer"  # UpsertCustomer's changes: their detail names the plan
BALANCE_KINDS = frozenset({"usage", "credit"})  # changes whose credit can cross a balance alert


def watched_plans(plans: Plans) -> frozenset[str]:
    """The plans that declare thresholds (of usage or of a prepaid feature's balance)."""
    return frozenset(
        pid
        for pid, p in plans.plans.items()
        if any(f.thresholds or f.balance_alerts for f in p.metered.values())
    )


def crossings(
    plans: Plans,
    plan_id: str | None,
    logged: Sequence[changes.Logged],
    known: Known,
    now: dt.datetime,
) -> tuple[list[Crossing], str | None]:
    """The new crossings in `logged` (oldest first; lowest threshold first within a change) for
    a customer on `plan_id` before them, and its plan after them."""
    seen = set(known)
    out: list[Crossing] = []
    for item in logged:
        c = item.change
        if c.kind == PLAN_KIND and isinstance(c.detail.get("plan_id"), str):
            plan_id = c.detail["plan_id"]
        plan = plans.plans.get(plan_id) if plan_id else None
        start, end = c.period_start, c.period_end
        if plan is None or c.kind == OWN_KIND or start is None or end is None:
            continue
        if end <= item.committed_at or end <= now - LATE:
            continue
        for meter, totals in c.figures.items():
            feature = plan.metered.get(meter)
            kind = plans.meters.get(meter)
            if feature is None or kind is None:
                continue
            used = totals.used(kind.aggregation)
            for t in feature.reached(used):
                key = (meter, start, t.text)
                if key not in seen:
                    seen.add(key)
                    out.append(Crossing(meter, t.text, t.amount, used, start, end, totals))
        # credits run low by what burns or voids them, not by a plan or period change
        credit = c.detail.get("credit", {}) if c.kind in BALANCE_KINDS else {}
        for meter, value in credit.items():
            feature = plan.metered.get(meter)
            if feature is None or not feature.prepaid:
                continue
            balance = Credit.from_json(value).balance
            for t in feature.balance_alerts:  # the balance is `used` of a balance alert
                key = (meter, start, t.text)
                if balance <= t.amount and key not in seen:
                    seen.add(key)
                    totals = c.figures.get(meter, Totals())
                    out.append(Crossing(meter, t.text, t.amount, balance, start, end, totals))
    return out, plan_id
