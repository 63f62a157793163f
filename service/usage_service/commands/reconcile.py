"""`usage-service reconcile`: what each provider holds against what was reported to it."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import TextIO

from usage_service.commands import ops as ops_commands
from usage_service.domain import periods
from usage_service.domain.plans import Plans
from usage_service.providers.config import ALL
from usage_service.reconcile import background
from usage_service.reconcile.background import ERRORS_KEPT
from usage_service.reconcile.reconciler import DRIFT, MeterErrorRow, Row, Verdict
from usage_service.settings.environment import Settings
from usage_service.storage import database

COMMANDS = ("reconcile",)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = commands.add_parser(
        "reconcile",
        help="compare what each provider holds with what was reported to it",
        description="Compare what each provider holds with what was reported to it, per "
        "customer, meter and period; exit 1 on drift. Progress goes to stderr. "
        "USAGE_RECONCILE_SETTLE_SECONDS: how long a provider may take to show what it accepted.",
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


async def run(args: argparse.Namespace, settings: Settings, plans: Plans) -> int:

    progress = ops_commands.progress_printer("reconcile")
    async with database.database(settings.database) as st:
        r, adapters = background.build(st, plans.meters, settings.reconcile, settings.providers)
        try:
            rows = await r.run(args.customer, args.provider, args.period, args.fix, progress)
            errors: list[MeterErrorRow] | str = []
            if args.provider in ("", "stripe"):
                errors = await r.meter_errors(dt.datetime.now(dt.UTC) - ERRORS_KEPT)
        finally:
            await background.close(adapters)
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
