"""The `usage-service` command: usage metering and entitlements over gRPC, stored in PostgreSQL,
reported to payment providers."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import sys

from usage_service import app, logs, workers
from usage_service.commands import drain as drain_commands
from usage_service.commands import ops as ops_commands
from usage_service.commands import reconcile as reconcile_commands
from usage_service.domain.plans import PlansError
from usage_service.settings import ConfigError, environment, plans_file
from usage_service.storage import database

# The variables most installations set; every one is in the README's Configuration section.
EPILOG = """\
environment (all variables and their defaults: the README's Configuration section):
  DATABASE_URL              PostgreSQL DSN (unset: an embedded PostgreSQL in USAGE_DATA_DIR)
  USAGE_GRPC_ADDRESS        gRPC listen address (default 127.0.0.1:50051)
  USAGE_PLANS_FILE          meters and plans, TOML (default: the packaged example)
  USAGE_METRICS_ADDRESS     host:port of the Prometheus endpoint (default: off)
  USAGE_AUTH_TOKENS         bearer tokens per calling service, JSON
  USAGE_AUTH_TOKENS_FILE    the same as a TOML file
  USAGE_TLS_CERT_FILE       PEM certificate chain: serve gRPC over TLS
  USAGE_TLS_KEY_FILE        its PEM private key
  USAGE_LOG_FORMAT          json (default) or text
  USAGE_LOG_LEVEL           INFO (default), DEBUG, WARNING or ERROR
  STRIPE_API_KEY            provider credentials; a provider without its key is off
  LEMONSQUEEZY_API_KEY
  POLAR_ACCESS_TOKEN
  DODO_PAYMENTS_API_KEY
  CREEM_API_KEY
"""


def version() -> str:
    try:
        return importlib.metadata.version("usage-service")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="usage-service",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the gRPC server (and the drain)",
        description="Run the gRPC server, the drain and (with USAGE_RECONCILE_INTERVAL_SECONDS)\n"
        "the periodic reconciliation until SIGTERM or SIGINT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port with SO_REUSEPORT (needs DATABASE_URL; with "
        "USAGE_METRICS_ADDRESS, worker i serves metrics on its port + i)",
    )
    commands.add_parser(
        "migrate",
        help="apply database migrations, then exit",
        description="Apply the database migrations (DATABASE_URL), then exit.",
    )
    check = commands.add_parser(
        "check-plans",
        help="validate the plans file, then exit",
        description="Validate the plans file (USAGE_PLANS_FILE), then exit.",
    )
    check.add_argument(
        "--schema", action="store_true", help="print the plans file's JSON Schema instead"
    )
    drain_commands.add_commands(commands)
    reconcile_commands.add_commands(commands)
    ops_commands.add_commands(commands)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "check-plans" and args.schema:
        sys.stdout.write(plans_file.json_schema())
        return 0
    try:
        settings = environment.load()
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
            loaded = plans_file.load(settings.plans_file)
            return asyncio.run(drain_commands.run(args, settings, loaded))
        elif args.command in reconcile_commands.COMMANDS:
            loaded = plans_file.load(settings.plans_file)
            return asyncio.run(reconcile_commands.run(args, settings, loaded))
        elif args.command == "check-plans":
            loaded = plans_file.load(settings.plans_file)
            print(f"{loaded.source}: {len(loaded.meters)} meters, {len(loaded.plans)} plans")
    except (ConfigError, PlansError) as exc:  # configuration, or the database
        print(f"usage-service: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


async def _migrate(settings: environment.Settings) -> None:
    async with database.database(settings.database):
        pass
    print("migrations applied")


if __name__ == "__main__":
    sys.exit(main())
