"""usage.v1.UsageService/WatchUsage: a customer's snapshot, then each committed change.

The stream registers its watcher before it reads where it starts (a snapshot's version, or the
caller's resume_after_version), so a change committed in between is read from the log like any
other. When the period it shows ends with no change to say so, the stream logs the rollover
itself (one replica's write wins), so every watcher sees it with a version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any

import grpc

from usage.v1 import usage_pb2
from usage_service import domain
from usage_service.api import convert, validation
from usage_service.api.errors import ApiError, customer_not_found, to_api_error
from usage_service.api.validation import Violations
from usage_service.domain import credits, periods
from usage_service.domain.credits import Grant
from usage_service.domain.plans import Plans
from usage_service.storage import changes, watch

Context = grpc.aio.ServicerContext[Any, Any]
KIND_TO_PROTO = {
    "usage": usage_pb2.USAGE_CHANGE_KIND_USAGE,
    "rollover": usage_pb2.USAGE_CHANGE_KIND_ROLLOVER,
    "customer": usage_pb2.USAGE_CHANGE_KIND_CUSTOMER,
    "drain": usage_pb2.USAGE_CHANGE_KIND_DRAIN,
    "threshold": usage_pb2.USAGE_CHANGE_KIND_THRESHOLD,
    "credit": usage_pb2.USAGE_CHANGE_KIND_CREDIT,
}
# Kinds that restate every meter watched; the others name only the meters they changed.
WHOLE = frozenset({"rollover", "customer"})
CLOSING = ApiError(
    "SERVER_SHUTTING_DOWN",
    "the server is shutting down; resume with resume_after_version (on another replica)",
)
TOO_SLOW = ApiError(
    "SLOW_CONSUMER",
    "the caller did not read a message for too long; resume with resume_after_version",
)
SLOW_AFTER = 30.0  # seconds one message may wait for the caller to read it


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclasses.dataclass
class _State:
    """What the stream shows: the customer as its last change left it, its period, and the
    credit of its prepaid features."""

    customer: domain.Customer
    period: periods.Period
    credit: dict[str, domain.Credit] = dataclasses.field(default_factory=dict)

    def count_credit(self, plans: Plans, grants: Collection[Grant], now: dt.datetime) -> None:
        """The credit of the plan's prepaid features, from their grants."""
        plan = plans.plans.get(self.customer.plan_id)
        self.credit = {
            name: credits.credit_of(self.customer.customer_id, f, list(grants), self.period, now)
            for name, f in (plan.metered.items() if plan else ())
            if f.prepaid
        }


def _state(plans: Plans, snap: watch.Snapshot) -> _State:
    state = _State(snap.customer, snap.period)
    state.count_credit(plans, snap.grants, _now())
    return state


async def serve(
    hub: watch.Hub, plans: Plans, request: usage_pb2.WatchUsageRequest, context: Context
) -> None:
    """Writes the stream to `context`. A caller that stops reading is ended with SLOW_CONSUMER:
    its messages are never buffered without bound."""
    v = Violations()
    validation.text(v, "customer_id", request.customer_id)
    for i, name in enumerate(request.meters):
        if name not in plans.meters:
            v.add(f"meters[{i}]", f"unknown meter {name[:100]!r}")
    if request.HasField("resume_after_version") and request.resume_after_version < 0:
        v.add("resume_after_version", "must be >= 0")
    try:
        v.check()
        with hub.watching(request.customer_id) as watcher:
            async for message in _watch(hub, plans, request, watcher):
                await _write(context, message)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        error = to_api_error(exc, "WatchUsage")
        await context.abort_with_status(error.status())  # type: ignore[attr-defined]


async def _write(
    context: Context, message: usage_pb2.WatchUsageResponse, after: float | None = None
) -> None:
    """Sends a message; a caller that takes none for SLOW_AFTER seconds (its connection's
    window full) is ended: its changes wait in the log, not in memory, for its resume."""
    try:
        await asyncio.wait_for(context.write(message), SLOW_AFTER if after is None else after)
    except TimeoutError:
        raise TOO_SLOW from None


async def _watch(
    hub: watch.Hub, plans: Plans, request: usage_pb2.WatchUsageRequest, w: watch.Watcher
) -> AsyncIterator[usage_pb2.WatchUsageResponse]:
    customer_id = request.customer_id
    only = frozenset(request.meters)
    snap = await watch.snapshot(hub.pool, customer_id, _now())
    if snap is None:
        raise customer_not_found(customer_id)
    state = _state(plans, snap)
    resume = request.resume_after_version if request.HasField("resume_after_version") else None
    if resume is not None and await watch.resumable(hub.pool, customer_id, resume):
        # The snapshot's customer may be newer than `resume`: the changes after it restate it.
        w.after = resume
    else:
        reason = (
            usage_pb2.SNAPSHOT_REASON_INITIAL
            if resume is None
            else usage_pb2.SNAPSHOT_REASON_RESUME_TOO_OLD
        )
        w.after = snap.version
        yield _snapshot(plans, state, snap, only, reason)
    last = w.after  # the last version this stream has taken from the log
    hub.wake(customer_id)
    while True:
        logged = await _next(hub, w, state)
        if logged.version <= last:
            continue  # already in the snapshot sent after a gap
        if logged.version != last + 1:  # the log lost changes since (forgotten as too old)
            snap = await watch.snapshot(hub.pool, customer_id, _now())
            if snap is None:
                raise customer_not_found(customer_id)
            state = _state(plans, snap)
            last = snap.version
            yield _snapshot(plans, state, snap, only, usage_pb2.SNAPSHOT_REASON_RESUME_TOO_OLD)
            if logged.version <= last:
                continue
        last = logged.version
        change = logged.change
        if change.kind == "customer":
            state.customer = _customer(state.customer, change.detail)
        if change.period_start is not None and change.period_end is not None:
            if change.period_start >= state.period.start or change.kind in WHOLE:
                state.period = periods.Period(change.period_start, change.period_end)
        if change.kind in WHOLE and "credit" not in change.detail:  # a new period's grants
            now = _now()
            since = min(now, state.period.start)
            state.count_credit(plans, await watch.grants(hub.pool, customer_id, since), now)
        if change.kind in WHOLE and "credit" in change.detail:  # the plan's credit, whole
            state.credit = {}
        for meter, value in change.detail.get("credit", {}).items():
            state.credit[meter] = domain.Credit.from_json(value)
        message = _message(
            plans,
            state,
            logged.version,
            KIND_TO_PROTO[change.kind],
            logged.committed_at,
            change.figures,
            only,
            whole=change.kind in WHOLE,
            period=(change.period_start, change.period_end),
            detail=change.detail if change.kind == "threshold" else None,
        )
        if change.kind == "threshold":
            if not only or change.detail.get("feature") in only:
                yield message
        elif message.meters or change.kind in WHOLE:
            yield message


async def _next(hub: watch.Hub, w: watch.Watcher, state: _State) -> changes.Logged:
    """The next change; when the period shown ends first, logs its rollover and waits on."""
    while True:
        if hub.closing.is_set():
            raise CLOSING
        get = asyncio.ensure_future(w.queue.get())
        closing = asyncio.ensure_future(hub.closing.wait())
        left = (state.period.end - _now()).total_seconds()
        try:
            done, _ = await asyncio.wait(
                {get, closing}, timeout=max(left, 0.0), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            closing.cancel()
            if not get.done():
                get.cancel()
        if get in done:
            w.taken(hub)
            return get.result()
        if hub.closing.is_set():
            raise CLOSING
        if not done:  # the period ended with nothing to say so: say it
            snap = await watch.snapshot(hub.pool, w.customer_id, _now())
            if snap is None:
                raise customer_not_found(w.customer_id)
            if snap.period.start > state.period.start:
                await watch.roll_over(hub.pool, w.customer_id, snap.period, _now())
            state.period = periods.Period(snap.period.start, snap.period.end)
            hub.wake(w.customer_id)


def _snapshot(
    plans: Plans, state: _State, snap: watch.Snapshot, only: Collection[str], reason: int
) -> usage_pb2.WatchUsageResponse:
    return _message(
        plans,
        state,
        snap.version,
        usage_pb2.USAGE_CHANGE_KIND_SNAPSHOT,
        _now(),
        snap.figures,
        only,
        whole=True,
        snapshot_reason=reason,
    )


def _customer(customer: domain.Customer, detail: Mapping[str, Any]) -> domain.Customer:
    plan_id = detail.get("plan_id")
    status = detail.get("status")
    return dataclasses.replace(
        customer,
        plan_id=plan_id if isinstance(plan_id, str) else customer.plan_id,
        subscription_status=(
            domain.SubscriptionStatus(status)
            if isinstance(status, str)
            else customer.subscription_status
        ),
    )


def _message(
    plans: Plans,
    state: _State,
    version: int,
    kind: int,
    committed_at: dt.datetime,
    figures: Mapping[str, domain.Totals],
    only: Collection[str],
    *,
    whole: bool,
    snapshot_reason: int = usage_pb2.SNAPSHOT_REASON_UNSPECIFIED,
    period: tuple[dt.datetime | None, dt.datetime | None] | None = None,
    detail: Mapping[str, Any] | None = None,
) -> usage_pb2.WatchUsageResponse:
    start, end = state.period.bounds
    if period is not None and period[0] is not None and period[1] is not None:
        start, end = period[0], period[1]
    meters = [
        m
        for m in domain.summarise(plans, state.customer, figures, credit=state.credit)
        if (whole or m.meter in figures) and (not only or m.meter in only)
    ]
    out = usage_pb2.WatchUsageResponse(
        version=version,
        kind=kind,  # type: ignore[arg-type]
        commit_time=convert.ts(committed_at),
        snapshot_reason=snapshot_reason,  # type: ignore[arg-type]
        plan_id=state.customer.plan_id,
        subscription_status=convert.STATUS_TO_PROTO[state.customer.subscription_status],
        period_start_time=convert.ts(start),
        period_end_time=convert.ts(end),
        meters=[convert.meter_to_proto(m) for m in meters],
    )
    if detail:
        out.threshold.CopyFrom(
            usage_pb2.ThresholdCrossing(
                alert_id=str(detail.get("alert_id", "")),
                feature=str(detail.get("feature", "")),
                threshold=str(detail.get("threshold", "")),
                amount=int(detail.get("amount", 0)),
                used=int(detail.get("used", 0)),
            )
        )
    return out
