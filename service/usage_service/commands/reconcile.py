"""`usage-service reconcile`, and the periodic reconciliation `serve` runs when asked to."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import sys
from collections.abc import Mapping
from typing import TextIO

from usage_service import domain, metrics, providers
from usage_service.commands import ops as ops_commands
from usage_service.config import Settings, positive_number
from usage_service.domain import periods
from usage_service.domain.plans import Meter, Plans
from usage_service.providers.config import ALL, ProviderSettings
from usage_service.reconcile.reconciler import (
    DEFAULT_SETTLE,
    DRIFT,
    MeterErrorRow,
    Reconciler,
    Row,
    Verdict,
)
from usage_service.storage import database, store
from usage_service.storage.reconcile_store import ReconcileStore

log = logging.getLogger(__name__)
COMMANDS = ("reconcile",)
ERRORS_KEPT = dt.timedelta(days=30)  # how long Stripe keeps the events that carry error reports


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = commands.add_parser(
        "reconcile", help="compare what each provider holds with what was reported to it"
    )
    r.add_argument("--customer", action="append", default=[], help="only this customer's")
    r.add_argument("--provider", default="", choices=["", *ALL], help="only this provider's")
    r.add_argument(
        "--period",
        default="current",
        type=_period,
        help="current, previous, or a time in the period (ISO-8601, e.g. 2026-11-01T00:00:00Z)",
    )
    r.add_argument("--json", action="store_true", help="one JSON object per line")
    r.add_argument(
        "--fix",
        action="store_true",
        help="queue a fix where the provider holds less and a fix is safe (the drain sends it)",
    )


def _period(text: str) -> str | dt.datetime:
    if text in ("current", "previous"):
        return text
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("current, previous or an ISO-8601 time") from None
    when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    if not periods.EARLIEST <= when < periods.LATEST:
        raise argparse.ArgumentTypeError(
            f"a time from {periods.EARLIEST.year} to {periods.LATEST.year - 1}"
        )
    return when


def settle(environ: Mapping[str, str]) -> float:
    return positive_number(environ, "USAGE_RECONCILE_SETTLE_SECONDS", DEFAULT_SETTLE)


def interval(environ: Mapping[str, str]) -> float:
    """Seconds between periodic reconciliations in `serve`; 0 (the default): none."""
    if environ.get("USAGE_RECONCILE_INTERVAL_SECONDS", "").strip() in ("", "0"):
        return 0.0
    return positive_number(environ, "USAGE_RECONCILE_INTERVAL_SECONDS", 0.0)


def check_settings(environ: Mapping[str, str]) -> None:
    """Reads the reconciliation settings: a bad one raises ConfigError before the server starts."""
    settle(environ)
    interval(environ)


def build(
    st: store.Store, meters: Mapping[str, Meter], environ: Mapping[str, str]
) -> tuple[Reconciler, Mapping[domain.Provider, providers.Adapter]]:
    """A reconciler reading back through one adapter per provider with credentials; the
    adapters are returned too, to be closed."""
    adapters = providers.adapters(ProviderSettings.from_env(environ), meters)
    return Reconciler(ReconcileStore(st.pool), adapters, meters, settle(environ)), adapters


async def close(adapters: Mapping[domain.Provider, providers.Adapter]) -> None:
    for adapter in adapters.values():
        await adapter.aclose()


async def run(args: argparse.Namespace, settings: Settings, plans: Plans) -> int:

    progress = ops_commands.progress_printer("reconcile")
    async with database.database(settings) as st:
        r, adapters = build(st, plans.meters, settings.environ)
        try:
            rows = await r.run(args.customer, args.provider, args.period, args.fix, progress)
            errors: list[MeterErrorRow] | str = []
            if args.provider in ("", "stripe"):
                errors = await r.meter_errors(dt.datetime.now(dt.UTC) - ERRORS_KEPT)
        finally:
            await close(adapters)
    write(rows, sys.stdout, as_json=args.json)
    write_errors(errors, sys.stdout, as_json=args.json)
    return 1 if any(row.verdict in DRIFT for row in rows) else 0


_HEADER = ("customer", "provider", "meter", "period", "recorded", "reported", "held", "drift")


def write(rows: list[Row], out: TextIO, as_json: bool = False) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row.as_json()), file=out)
        return
    if not rows:
        print("nothing to reconcile", file=out)
        return
    table = [
        (
            r.customer_id,
            r.provider,
            r.meter,
            f"{r.period_start:%Y-%m-%d %H:%M}..{r.period_end:%Y-%m-%d %H:%M}",
            _n(r.recorded),
            _n(r.reported),
            _n(r.held),
            "-" if r.drift is None else f"{r.drift:+d}",
        )
        for r in rows
    ]
    widths = [max(len(c) for c in column) for column in zip(_HEADER, *table, strict=True)]
    print(
        "  ".join(h.ljust(w) for h, w in zip(_HEADER, widths, strict=True)) + "  verdict", file=out
    )
    for row, cells in zip(rows, table, strict=True):
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
        verdict = row.verdict.value + (f": {row.why}" if row.why else "")
        print(f"{line}  {verdict}", file=out)
        if row.fix:
            print(f"    fix: {row.fix}", file=out)
    counts = {v: sum(1 for r in rows if r.verdict is v) for v in Verdict}
    print(", ".join(f"{n} {v.value}" for v, n in counts.items() if n), file=out)


def write_errors(errors: list[MeterErrorRow] | str, out: TextIO, as_json: bool = False) -> None:
    if isinstance(errors, str):
        print(json.dumps({"stripe_meter_errors_unread": errors}) if as_json else errors, file=out)
        return
    if errors and not as_json:
        print(f"stripe meter error reports (last {ERRORS_KEPT.days} days):", file=out)
    for e in errors:
        if as_json:
            print(json.dumps(e.as_json()), file=out)
            continue
        where = (
            f"customer {e.customer_id}, meter {e.meter}, events {', '.join(e.event_ids)}"
            if e.customer_id
            else f"identifier {e.identifier or '(none given)'}"
        )
        print(f"  {e.code} x{e.count}: {e.message} ({where})", file=out)


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


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
    def start(cls, st: store.Store, plans: Plans, environ: Mapping[str, str]) -> Background | None:
        every = interval(environ)
        if not every:
            return None
        b = cls(*build(st, plans.meters, environ), every)
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
        metrics.reconciled(
            [(r.provider, r.meter, r.verdict.value, r.drift) for r in rows],
            [(e.stripe_event, e.code, e.count) for e in errors]
            if isinstance(errors, list)
            else None,
        )
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
