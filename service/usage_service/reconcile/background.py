"""The periodic reconciliation `serve` runs when asked to (USAGE_RECONCILE_INTERVAL_SECONDS),
and the reconciler `usage-service reconcile` builds from the same settings."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence

from pydantic import Field

from usage_service import domain, metrics, providers, settings
from usage_service.domain.plans import Meter, Plans
from usage_service.reconcile.reconciler import DEFAULT_SETTLE, DRIFT, MeterErrorRow, Reconciler, Row
from usage_service.storage import store
from usage_service.storage.reconcile_store import ReconcileStore

log = logging.getLogger(__name__)
ERRORS_KEPT = dt.timedelta(days=30)  # how long Stripe keeps the events that carry error reports


class ReconcileSettings(settings.Group):
    interval: settings.SecondsOrOff = Field(  # seconds between runs in `serve`; 0: none
        0.0, validation_alias="USAGE_RECONCILE_INTERVAL_SECONDS"
    )
    settle: settings.Seconds = Field(  # see reconciler.DEFAULT_SETTLE
        DEFAULT_SETTLE, validation_alias="USAGE_RECONCILE_SETTLE_SECONDS"
    )


def build(
    st: store.Store,
    meters: Mapping[str, Meter],
    reconcile: ReconcileSettings,
    provider_settings: providers.ProviderSettings,
) -> tuple[Reconciler, Mapping[domain.Provider, providers.Adapter]]:
    """A reconciler reading back through one adapter per provider with credentials; the
    adapters are returned too, to be closed."""
    adapters = providers.adapters(provider_settings, meters)
    return Reconciler(ReconcileStore(st.pool), adapters, meters, reconcile.settle), adapters


async def close(adapters: Mapping[domain.Provider, providers.Adapter]) -> None:
    for adapter in adapters.values():
        await adapter.aclose()


@dataclasses.dataclass
class Background:
    """Reconciliation of every customer's current and previous periods, every `interval`."""

    reconciler: Reconciler
    adapters: Mapping[domain.Provider, providers.Adapter]
    interval: float
    task: asyncio.Task[None] | None = None
    _logged: set[tuple[str, str, str, dt.datetime, int | None]] = dataclasses.field(
        default_factory=set
    )

    @classmethod
    def start(
        cls,
        st: store.Store,
        plans: Plans,
        reconcile: ReconcileSettings,
        provider_settings: providers.ProviderSettings,
    ) -> Background | None:
        """Started when an interval is set; None otherwise."""
        if not reconcile.interval:
            return None
        b = cls(*build(st, plans.meters, reconcile, provider_settings), reconcile.interval)
        b.task = asyncio.create_task(b._loop(), name="reconcile")
        return b

    async def _loop(self) -> None:
        while True:
            try:
                await self.once()
            except Exception:
                log.exception("reconciliation failed", extra={"action": "reconcile"})
            await asyncio.sleep(self.interval)

    async def once(self) -> list[Row]:
        rows = [
            *await self.reconciler.run(which="current"),
            *await self.reconciler.run(which="previous"),
        ]
        errors = await self.reconciler.meter_errors(dt.datetime.now(dt.UTC) - ERRORS_KEPT)
        _set_gauges(rows, errors if isinstance(errors, list) else None)
        for row in rows:
            key = (row.customer_id, row.provider, row.meter, row.period_start, row.drift)
            if row.verdict in DRIFT and key not in self._logged:
                self._logged.add(key)
                log.warning(
                    "%s %s %s: %s (%s)",
                    row.customer_id,
                    row.provider,
                    row.meter,
                    row.verdict.value,
                    row.why,
                    extra={"action": "reconcile", "provider": row.provider},
                )
        return rows

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await close(self.adapters)


@contextlib.asynccontextmanager
async def running(
    st: store.Store,
    plans: Plans,
    reconcile: ReconcileSettings,
    provider_settings: providers.ProviderSettings,
) -> AsyncIterator[Background | None]:
    """The periodic reconciliation while the block runs (none without an interval)."""
    background = Background.start(st, plans, reconcile, provider_settings)
    try:
        yield background
    finally:
        if background is not None:
            await background.stop()


def _set_gauges(rows: Sequence[Row], errors: Sequence[MeterErrorRow] | None) -> None:
    """The reconciliation gauges from one run's rows (current and previous periods) and
    Stripe's meter error reports (None: they could not be read)."""
    by_code: Counter[str] | None = None
    if errors is not None:
        by_code = Counter()
        for (_, code), count in {(e.stripe_event, e.code): e.count for e in errors}.items():
            by_code[code] += count
    verdicts: Counter[tuple[str, str]] = Counter((r.provider, r.verdict.value) for r in rows)
    drift: Counter[tuple[str, str]] = Counter()
    for r in rows:
        drift[(r.provider, r.meter)] += r.drift or 0
    metrics.reconciled(verdicts, drift, by_code)
