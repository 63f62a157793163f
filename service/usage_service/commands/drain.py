"""Operator commands around the drain: `usage-service drain --once`, `requeue`, `status`."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import TextIO

from usage_service.commands import ops as ops_commands
from usage_service.domain.plans import Plans
from usage_service.drain import background
from usage_service.providers.config import ALL, ProviderSettings
from usage_service.settings.environment import Settings
from usage_service.storage import database
from usage_service.storage.backlog import Backlog, Moved, ProviderStatus

COMMANDS = ("drain", "requeue", "status")
MAX_CYCLES = 1000  # cycles one `drain --once` runs at most


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = commands.add_parser(
        "drain",
        help="report due usage to the providers, then exit",
        description="Report the usage that is due to the providers with credentials, then "
        "exit. Progress goes to stderr.",
    )
    d.add_argument("--once", action="store_true", required=True, help="one pass, then exit")
    r = commands.add_parser(
        "requeue",
        help="put parked (failed) events back in the queue",
        description="Put parked (failed) events back in the queue, or move events to their "
        "customer's current provider.",
    )
    r.add_argument("--provider", default="", choices=["", *ALL], help="only this provider's")
    r.add_argument(
        "--move-to-current-provider",
        action="store_true",
        help="instead: re-attribute the events an earlier provider of their customer never "
        "accepted (waiting or parked) to the customer's current provider",
    )
    r.add_argument(
        "--customer", action="append", default=[], help="with --move-...: only this customer's"
    )
    r.add_argument(
        "--include-open-reports",
        action="store_true",
        help="with --move-...: also events in open reports, which the old provider may hold "
        "(check it does not first)",
    )
    r.add_argument("event_ids", nargs="*", help="only these events (default: every parked one)")
    commands.add_parser(
        "status",
        help="per provider: pending, oldest pending, parked failures",
        description="Per provider: events pending, the oldest pending, parked failures.",
    )


async def run(args: argparse.Namespace, settings: Settings, plans: Plans) -> int:
    async with database.database(settings.database) as st:
        if args.command == "drain":
            d = background.build(st, plans.meters, settings.drain, settings.providers)
            progress = ops_commands.progress_printer("drain", "reports handled")
            try:
                handled = await d.drain_due(MAX_CYCLES, progress)
            finally:
                await background.close(d)
            progress.show(handled)
            off = [p for p in ALL if p not in d.adapters]
            print(
                f"drain: {handled} reports handled"
                + (f"; no credentials: {', '.join(off)}" if off else "")
            )
            write_status(await Backlog(st.pool).status(), settings.providers, sys.stdout)
        elif args.command == "requeue" and args.move_to_current_provider:
            if args.event_ids:
                print("requeue: --move-to-current-provider takes --customer, not event ids")
                return 2
            moved = await Backlog(st.pool).move_to_current_provider(
                args.provider, args.customer, args.include_open_reports
            )
            write_moved(moved, sys.stdout)
        elif args.command == "requeue":
            count = await Backlog(st.pool).requeue(args.provider, args.event_ids)
            print(f"requeued {count} events")
        else:
            write_status(await Backlog(st.pool).status(), settings.providers, sys.stdout)
    return 0


def write_moved(moved: Moved, out: TextIO) -> None:
    print(f"moved {moved.events} events", file=out)
    for old, new, count in moved.by_route:
        print(f"  {old} -> {new or '(no provider: unbilled)'}: {count}", file=out)
    if moved.from_open_reports:
        print(
            f"  {moved.from_open_reports} of them were in open reports, handed to their old "
            "provider: it must hold none of them",
            file=out,
        )
    if moved.left_in_open_reports:
        print(
            f"  {moved.left_in_open_reports} events left in open reports: their old provider "
            "may hold them. Check it does not, then add --include-open-reports (a report a "
            "worker is sending, or whose retry is not due, is never touched)",
            file=out,
        )


def write_status(rows: list[ProviderStatus], providers: ProviderSettings, out: TextIO) -> None:
    configured = set(providers.configured())
    if not rows:
        print("nothing pending, nothing parked", file=out)
    for row in rows:
        name = row.provider or "(no provider: never reported)"
        why = ""
        if row.provider == "?":
            name = "(customer not known yet: not attributed to a provider)"
        elif row.provider and row.provider not in configured:
            name += " (no credentials: waiting)"
            why = f"{ProviderSettings.key_variable(row.provider)} is not set"
        age = _age(row.oldest_pending_age)
        print(f"{name}: pending {row.pending} (oldest {age}), parked {row.failed}", file=out)
        if why and row.pending:
            print(f"  waiting {row.pending}: {why}", file=out)
        if row.moved:
            print(
                f"  {row.moved} of them belong to customers now billed by another provider; "
                f"`usage-service requeue --move-to-current-provider --provider {row.provider}` "
                "moves them",
                file=out,
            )
        if row.retrying_reports:
            print(f"  retrying {row.retrying_reports} reports: {row.retrying_error}", file=out)
        for reason, count in row.failed_reasons:
            print(f"  parked {count}: {reason}", file=out)


def _age(age: dt.timedelta | None) -> str:
    if age is None:
        return "-"
    seconds = int(age.total_seconds())
    hours, rest = divmod(seconds, 3600)
    return (
        f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"
    )
