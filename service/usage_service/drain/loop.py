"""The drain: reports recorded usage to payment providers, exactly once as far as they can tell.

Each cycle, per provider with credentials: lease the open reports that are due (retries, and those
of workers that died), claim pending events into new reports of one customer each (committed with
their stable ids before any send), send the reports through the provider's adapter (per-event
providers: several customers' reports in one call) and settle each report's outcome.
Replicas coordinate through row locks and leases only, so any number may run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Mapping

from pydantic import Field

from usage_service import domain, metrics, settings
from usage_service.domain.plans import Aggregation, Meter
from usage_service.domain.reports import Report
from usage_service.drain.reports import build_reports
from usage_service.providers import Adapter, StreamAdapter, outcome
from usage_service.providers.outcome import Outcome
from usage_service.storage.drain_store import DrainStore

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 2.0  # seconds between looks for due events
DEFAULT_LEASE = 120.0  # seconds a worker owns a claimed report; longer than any send
DEFAULT_CLAIM = 1000  # events claimed per provider per cycle
DEFAULT_BACKOFF_BASE = 1.0  # seconds, doubled per attempt
DEFAULT_BACKOFF_CAP = 300.0  # seconds
DEFAULT_CONCURRENCY = 8  # reports in flight per provider in one process
MAX_CYCLES_PER_WAKE = 100  # cycles run back to back while there is work, before sleeping
MAX_CHECKPOINTS = 3  # checkpoints one send may ask for
PIPELINE = 2  # batches per provider sent / settled in the background while the next is claimed


class DrainSettings(settings.Group):
    interval: settings.Seconds = Field(
        DEFAULT_INTERVAL, validation_alias="USAGE_DRAIN_INTERVAL_SECONDS"
    )
    lease: settings.Seconds = Field(DEFAULT_LEASE, validation_alias="USAGE_DRAIN_LEASE_SECONDS")
    claim: settings.Count = Field(DEFAULT_CLAIM, validation_alias="USAGE_DRAIN_CLAIM_EVENTS")
    backoff_base: settings.Seconds = Field(
        DEFAULT_BACKOFF_BASE, validation_alias="USAGE_DRAIN_BACKOFF_BASE_SECONDS"
    )
    backoff_cap: settings.Seconds = Field(
        DEFAULT_BACKOFF_CAP, validation_alias="USAGE_DRAIN_BACKOFF_CAP_SECONDS"
    )
    concurrency: settings.Count = Field(
        DEFAULT_CONCURRENCY, validation_alias="USAGE_DRAIN_CONCURRENCY"
    )

    def backoff(self, attempts: int) -> float:
        """Capped exponential backoff with full jitter above half the step."""
        step = min(self.backoff_cap, self.backoff_base * float(2 ** min(attempts, 30)))
        return step * random.uniform(0.5, 1.0)


def _label(answer: Outcome) -> str:
    """A provider call's outcome as a metrics label (a small fixed set)."""
    if isinstance(answer, outcome.Delivered):
        return "duplicate" if answer.duplicate else "delivered"
    if isinstance(answer, outcome.Retry):
        return "retry_after"
    if isinstance(answer, outcome.Failed):
        return "permanent_failure"
    if isinstance(answer, outcome.Rejected):
        return "rejected"
    return "checkpoint"


def _packed(reports: list[Report], size: int) -> list[list[Report]]:
    """Reports in order, in groups of at most `size` events (a larger report alone)."""
    groups: list[list[Report]] = []
    count = 0
    for report in reports:
        if groups and count + len(report.events) <= size:
            groups[-1].append(report)
            count += len(report.events)
        else:
            groups.append([report])
            count = len(report.events)
    return groups


def _own(answer: Outcome, report: Report) -> Outcome:
    """A shared call's answer for one of its reports: a rejection names its own events only."""
    if not isinstance(answer, outcome.Rejected):
        return answer
    ids = {e.event_id for e in report.events}
    mine = {k: v for k, v in answer.reasons.items() if k in ids}
    return outcome.Rejected(mine) if mine else outcome.Delivered()


def _past_resend(
    adapter: Adapter | StreamAdapter, reports: list[Report]
) -> tuple[list[tuple[Report, Outcome]], list[Report]]:
    """The reports answered as failed for being past the adapter's re-send window (see
    _too_old), and those still to send."""
    sent: list[tuple[Report, Outcome]] = []
    due = []
    for report in reports:
        if _too_old(adapter, report):
            sent.append((report, outcome.Failed(adapter.reporting.too_old)))
        else:
            due.append(report)
    return sent, due


def _too_old(adapter: Adapter, report: Report) -> bool:
    """First sent longer ago than the adapter re-sends (the provider's dedupe may be over)."""
    window = adapter.reporting.resend_window
    return (
        window is not None
        and report.first_sent_at is not None
        and dt.datetime.now(dt.UTC) - report.first_sent_at > window
    )


class Drain:
    def __init__(
        self,
        store: DrainStore,
        adapters: Mapping[domain.Provider, Adapter],
        meters: Mapping[str, Meter],
        settings: DrainSettings,
        owner: str = "",
    ) -> None:
        self.store = store
        self.adapters = adapters
        self.meters = meters
        self.settings = settings
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stopping = asyncio.Event()
        # meters whose reports carry the period's figure (max, last)
        self._figures = frozenset(
            name
            for name, m in meters.items()
            if m.aggregation in (Aggregation.MAX, Aggregation.LAST)
        )
        # provider -> its batches being sent and settled in the background, oldest first, while
        # the next cycle claims (providers without lanes; a lane's next report waits for its
        # settle anyway): at most PIPELINE, each settled after the one before it
        self._in_flight: dict[domain.Provider, list[asyncio.Task[None]]] = {}

    def stop(self) -> None:
        """The running loop finishes its current cycle, then returns."""
        self._stopping.set()

    async def run(self) -> None:
        log.info("drain started", extra={"action": "drain_start", "owner": self.owner})
        while not self._stopping.is_set():
            try:
                await self.drain_due()
            except Exception:
                log.exception("drain cycle failed", extra={"action": "drain_cycle"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.interval)
        log.info("drain stopped", extra={"action": "drain_stop", "owner": self.owner})

    async def drain_due(
        self, max_cycles: int = MAX_CYCLES_PER_WAKE, progress: Callable[[int], None] | None = None
    ) -> int:
        """Cycles until nothing is due (or `max_cycles`, or `stop`); returns the reports handled
        (`progress(handled so far)` after each cycle). For providers without lanes a cycle's
        sends and settling overlap the next cycles' claims; all is settled on return."""
        total = 0
        try:
            for _ in range(max_cycles):
                handled = await self._cycle()
                total += handled
                if progress is not None:
                    progress(total)
                if not handled or self._stopping.is_set():
                    break
        finally:
            await self._settled()
        return total

    async def cycle(self) -> int:
        """One pass over every provider with credentials, settled before it returns; returns
        the reports handled."""
        try:
            return await self._cycle()
        finally:
            await self._settled()

    async def _settled(self) -> None:
        """Waits for the batches still being sent and settled (each logs its own failures)."""
        running = [task for tasks in self._in_flight.values() for task in tasks]
        self._in_flight = {}
        await asyncio.gather(*running, return_exceptions=True)

    async def _cycle(self) -> int:
        results = await asyncio.gather(
            *(self._provider_cycle(p, a) for p, a in self.adapters.items()),
            return_exceptions=True,
        )
        handled = 0
        for provider, result in zip(self.adapters, results, strict=True):
            if isinstance(result, BaseException):
                log.error(
                    "%s: drain cycle failed",
                    provider.value,
                    exc_info=result,
                    extra={"action": "drain_cycle", "provider": provider.value},
                )
            else:
                handled += result
        return handled

    async def _provider_cycle(self, provider: domain.Provider, adapter: Adapter) -> int:
        s = self.settings
        reporting = adapter.reporting
        reports = await self.store.claim_reports(provider, self.owner, s.lease, s.claim)
        if reporting.lanes:
            reports += await self.store.claim_new(
                provider,
                self.owner,
                s.lease,
                s.claim,
                lambda claimed: build_reports(provider, reporting, self.meters, claimed),
                self._figures,
            )
        else:
            reports += await self.store.claim_batches(
                provider, self.owner, s.lease, s.claim, reporting.batch
            )
        if reporting.lanes:
            await self._settle_all(provider, await self._send_all(adapter, reports))
        else:  # sent and settled in the background while the next cycle claims
            flight = self._in_flight.setdefault(provider, [])
            before = flight[-1] if flight else None
            flight.append(
                asyncio.create_task(self._send_and_settle(provider, adapter, reports, before))
            )
            while len(flight) > PIPELINE:
                await asyncio.gather(flight.pop(0), return_exceptions=True)
        return len(reports)

    async def _send_and_settle(
        self,
        provider: domain.Provider,
        adapter: Adapter,
        reports: list[Report],
        before: asyncio.Task[None] | None,
    ) -> None:
        """Sends a batch, then settles it once the batch before it is settled."""
        sent = await self._send_all(adapter, reports)
        if before is not None:
            await asyncio.gather(before, return_exceptions=True)
        await self._settle_all(provider, sent)

    async def _send_all(
        self, adapter: Adapter, reports: list[Report]
    ) -> list[tuple[Report, Outcome]]:
        if not reports:
            return []
        if isinstance(adapter, StreamAdapter):
            return await self._send_together(adapter, reports)
        if not adapter.reporting.lanes:
            return await self._send_combined(adapter, reports)
        return await self._send_each(adapter, reports)

    async def _send_each(
        self, adapter: Adapter, reports: list[Report]
    ) -> list[tuple[Report, Outcome]]:
        """Each report in its own send, `concurrency` at a time; the answers to settle."""
        gate = asyncio.Semaphore(self.settings.concurrency)

        async def send(report: Report) -> tuple[Report, Outcome | None]:
            async with gate:
                try:
                    return await self._send(adapter, report)
                except Exception:  # its lease runs out and it is sent again
                    log.exception(
                        "sending report %s failed",
                        report.report_id,
                        extra={"action": "drain_send", "provider": report.provider.value},
                    )
                    return report, None

        return [(r, a) for r, a in await asyncio.gather(*(send(r) for r in reports)) if a]

    async def _send_combined(
        self, adapter: Adapter, reports: list[Report]
    ) -> list[tuple[Report, Outcome]]:
        """Per-event providers: the reports (one customer each) packed into calls of at most
        the adapter's batch of events, `concurrency` calls at a time; each report is answered
        from its call's outcome (a rejection: its own events' reasons only)."""
        sent, due = _past_resend(adapter, reports)
        gate = asyncio.Semaphore(self.settings.concurrency)

        async def send(group: list[Report]) -> list[tuple[Report, Outcome]]:
            first = group[0]
            combined = dataclasses.replace(
                first, events=tuple(e for r in group for e in r.events), customer_id=""
            )
            async with gate:
                started = time.monotonic()
                try:
                    answer = await adapter.send(combined)
                except Exception as exc:  # an adapter bug must not stop the drain
                    log.exception(
                        "sending %d reports failed",
                        len(group),
                        extra={"action": "drain_send", "provider": first.provider.value},
                    )
                    answer = outcome.Retry(f"internal error: {exc!r}")
                seconds = time.monotonic() - started
            metrics.provider_call(first.provider.value, _label(answer), seconds)
            if isinstance(answer, outcome.Checkpoint):  # not for shared calls: send it again
                answer = outcome.Retry("a checkpoint was asked for in a shared call")
            return [(r, _own(answer, r)) for r in group]

        answered = await asyncio.gather(*(send(g) for g in _packed(due, adapter.reporting.batch)))
        return sent + [pair for group in answered for pair in group]

    async def _send_together(
        self, adapter: StreamAdapter, reports: list[Report]
    ) -> list[tuple[Report, Outcome]]:
        """The reports in shared calls (the adapter batches them); the answers to settle."""
        sent, due = _past_resend(adapter, reports)
        if not due:
            return sent
        provider = due[0].provider.value
        started = time.monotonic()
        try:
            answers = await adapter.send_many(due)
        except Exception as exc:  # an adapter bug must not stop the drain
            log.exception("sending %d reports failed", len(due), extra={"action": "drain_send"})
            answers = [outcome.Retry(f"internal error: {exc!r}")] * len(due)
        seconds = time.monotonic() - started
        for k, (report, answer) in enumerate(zip(due, answers, strict=True)):
            if isinstance(answer, outcome.Checkpoint):  # not for shared calls: send it again
                answer = outcome.Retry("a checkpoint was asked for in a shared call")
            # an outcome per report; the duration once, for the shared calls as a whole
            metrics.provider_call(provider, _label(answer), None if k else seconds)
            sent.append((report, answer))
        return sent

    async def _settle_all(
        self, provider: domain.Provider, sent: list[tuple[Report, Outcome]]
    ) -> None:
        # Reports delivered in full are settled together, in one transaction.
        whole = {r.key: r for r, a in sent if isinstance(a, outcome.Delivered)}
        try:
            for key in await self.store.delivered_all(list(whole)):
                metrics.events_reported(provider.value, "delivered", len(whole[key].events))
        except Exception:  # their leases run out and they are sent again
            log.exception(
                "settling %d reports failed",
                len(whole),
                extra={"action": "drain_settle", "provider": provider.value},
            )

        async def settle(report: Report, answer: Outcome) -> None:
            try:
                await self._settle(report, answer)
            except Exception:  # its lease runs out and it is sent again
                log.exception(
                    "settling report %s failed",
                    report.report_id,
                    extra={"action": "drain_settle", "provider": provider.value},
                )

        await asyncio.gather(*(settle(r, a) for r, a in sent if r.key not in whole))

    async def _send(self, adapter: Adapter, report: Report) -> tuple[Report, Outcome | None]:
        """Sends a report (saving checkpoints as asked); the answer to settle, or None when
        there is nothing to settle."""
        rid = report.report_id
        if _too_old(adapter, report):
            return report, outcome.Failed(adapter.reporting.too_old)
        answer: Outcome = outcome.Retry("too many checkpoints")
        try:
            for _ in range(MAX_CHECKPOINTS + 1):
                started = time.monotonic()
                answer = await adapter.send(report)
                seconds = time.monotonic() - started
                metrics.provider_call(report.provider.value, _label(answer), seconds)
                if not isinstance(answer, outcome.Checkpoint):
                    break
                # held at least as long as the adapter asks: the send may land until then
                lease = max(self.settings.lease, answer.hold)
                if not await self.store.save_checkpoint(
                    report.key, self.owner, answer.state, lease
                ):
                    log.warning("lease lost before sending %s", rid, extra={"action": "lease"})
                    return report, None
                report = dataclasses.replace(report, checkpoint=answer.state)
        except Exception as exc:  # an adapter bug must not stop the drain
            log.exception("sending report %s failed", rid, extra={"action": "drain_send"})
            answer = outcome.Retry(f"internal error: {exc!r}")
        return report, answer

    async def _settle(self, report: Report, answer: Outcome) -> None:
        rid, provider = report.report_id, report.provider.value
        extra = {"action": "drain_settle", "provider": provider, "report_id": rid}
        count = len(report.events)
        if isinstance(answer, outcome.Delivered):
            if await self.store.delivered(report.key):
                metrics.events_reported(provider, "delivered", count)
        elif isinstance(answer, outcome.Rejected):
            refused = len(answer.reasons)
            if await self.store.delivered(report.key, answer.reasons):
                metrics.events_reported(provider, "delivered", count - refused)
                metrics.events_reported(provider, "failed", refused)
            log.warning("%s: %d events refused", provider, refused, extra=extra)
        elif isinstance(answer, outcome.Failed):
            if await self.store.failed(report.key, answer.reason):
                metrics.events_reported(provider, "failed", count)
            log.warning("%s: report parked: %s", provider, answer.reason, extra=extra)
        elif isinstance(answer, outcome.Retry):
            delay = answer.after
            if delay is None:
                delay = self.settings.backoff(report.attempts)
            await self.store.retry_later(report.key, self.owner, max(delay, 0.001), answer.reason)
            log.info("%s: retry in %.1fs: %s", provider, delay, answer.reason, extra=extra)
