"""The `usage-service` command."""

from __future__ import annotations

import argparse
import asyncio
import sys

from usage_service import app, logs, workers
from usage_service.commands import drain as drain_commands
from usage_service.commands import ops as ops_commands
from usage_service.commands import reconcile as reconcile_commands
from usage_service.config import ConfigError, Settings
from usage_service.domain import plans as plans_mod
from usage_service.storage import database


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="usage-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server (and the drain)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port with SO_REUSEPORT (needs DATABASE_URL)",
    )
    commands.add_parser("migrate", help="apply database migrations, then exit")
    commands.add_parser("check-plans", help="validate the plans file, then exit")
    drain_commands.add_commands(commands)
    reconcile_commands.add_commands(commands)
    ops_commands.add_commands(commands)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        logs.configure(settings.log_format, settings.log_level)
        if args.command == "serve" and args.workers > 1:
            return workers.serve(settings, args.workers)
        if args.command == "serve":
            asyncio.run(app.serve(settings))
        elif args.command == "migrate":
            asyncio.run(_migrate(settings))
        elif args.command in ops_commands.COMMANDS:
            return ops_commands.run(args, settings)
        elif args.command in drain_commands.COMMANDS:
            loaded = plans_mod.load(settings.plans_file or None)
            return asyncio.run(drain_commands.run(args, settings, loaded))
        elif args.command in reconcile_commands.COMMANDS:
            loaded = plans_mod.load(settings.plans_file or None)
            return asyncio.run(reconcile_commands.run(args, settings, loaded))
        elif args.command == "check-plans":
            loaded = plans_mod.load(settings.plans_file or None)
            print(f"{loaded.source}: {len(loaded.meters)} meters, {len(loaded.plans)} plans")
    except (ConfigError, plans_mod.PlansError) as exc:  # configuration, or the database
        print(f"usage-service: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


async def _migrate(settings: Settings) -> None:
    async with database.database(settings):
        pass
    print("migrations applied")


if __name__ == "__main__":
    sys.exit(main())
