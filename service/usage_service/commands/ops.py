"""Operator commands: `health` (the container's and probes' health check), `prune` and
`verify`."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from usage_service.settings.environment import Settings
from usage_service.storage import database, history, ops

COMMANDS = ("health", "prune", "verify")
PROGRESS_EVERY = 2.0  # seconds between progress lines of a long operator command
HEALTH_TIMEOUT = 3.0  # seconds
MIN_PRUNE_DAYS = 1


def add_commands(commands: Any) -> None:
    health = commands.add_parser(
        "health",
        help="ask the running server's gRPC health service; exit 0 when SERVING",
        description="Ask the running server's gRPC health service; exit 0 when SERVING. Over "
        "TLS it trusts USAGE_HEALTH_CA_FILE (default: the server's own certificate) and "
        "expects the name USAGE_HEALTH_SERVER_NAME.",
    )
    health.add_argument("--address", help="host:port (default: USAGE_GRPC_ADDRESS, on loopback)")
    health.add_argument("--service", default="", help="service name ('' = the whole server)")
    health.add_argument("--timeout", type=float, default=HEALTH_TIMEOUT, help="seconds")
    prune = commands.add_parser(
        "prune",
        help="delete events reported to their provider more than DAYS ago",
        description="Delete events reported to their provider more than DAYS ago, in past "
        "periods: a month (of recording) whose events all qualify is dropped whole, the rest "
        "go customer by customer; totals and idempotency keys stay. Progress goes to stderr.",
    )
    prune.add_argument("--older-than", type=int, required=True, metavar="DAYS", help="at least 1")
    prune.add_argument(
        "--batch-size",
        type=int,
        default=ops.DEFAULT_PRUNE_BATCH,
        help="events deleted per transaction (default %(default)s)",
    )
    verify = commands.add_parser(
        "verify",
        help="recompute every totals row from the events; print each difference, exit 1 if any",
        description="Recompute every totals row from the events; print each difference, exit "
        "1 if any. Progress goes to stderr.",
    )
    verify.add_argument("--customer", action="append", default=[], help="only this customer")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="rebuild the totals of each customer with a difference from its events",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "health":
        return health(settings, args.address, args.service, args.timeout)
    if args.command == "verify":
        differences = asyncio.run(_verify(settings, args.customer, args.repair))
        for d in differences:
            print(d)
        if args.repair:
            repaired = len({d.customer_id for d in differences})
            print(f"verify: {len(differences)} differences, {repaired} customers repaired")
            return 0
        print(f"verify: {len(differences)} differences")
        return 1 if differences else 0
    if args.older_than < MIN_PRUNE_DAYS or args.batch_size < 1:
        print("usage-service: --older-than and --batch-size must be >= 1", file=sys.stderr)
        return 2
    pruned = asyncio.run(_prune(settings, args.older_than, args.batch_size))
    months = ", ".join(f"{m:%Y-%m}" for m in pruned.months) or "none"
    print(
        f"pruned {pruned.events} reported events older than {args.older_than} days"
        f" (months dropped whole: {months})"
    )
    return 0


def local_address(address: str) -> str:
    """The listen address as a local client dials it (a wildcard host becomes loopback)."""
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def health(settings: Settings, address: str | None, service: str, timeout: float) -> int:
    target = address or local_address(settings.grpc_address)
    options: list[tuple[str, Any]] = []
    if settings.health_server_name:
        options.append(("grpc.ssl_target_name_override", settings.health_server_name))
    if settings.tls.enabled:
        creds = settings.tls.channel_credentials(settings.health_ca_file)
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            print(f"{target}: {exc.code().name}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{target}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


class Progress:
    """Prints `command: done/total unit` (`command: done unit` with no total) to stderr, at
    most every PROGRESS_EVERY seconds, and when done reaches the total."""

    def __init__(
        self, command: str, unit: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.command = command
        self.unit = unit
        self.clock = clock
        self.last = clock()

    def __call__(self, done: int, total: int | None = None) -> None:
        if done == total or self.clock() - self.last >= PROGRESS_EVERY:
            self.show(done, total)

    def show(self, done: int, total: int | None = None) -> None:
        """Prints the line now (e.g. at the end of a run with no known total)."""
        self.last = self.clock()
        count = str(done) if total is None else f"{done}/{total}"
        print(f"{self.command}: {count} {self.unit}", file=sys.stderr, flush=True)


def progress_printer(command: str, unit: str = "customers") -> Progress:
    return Progress(command, unit)


async def _verify(settings: Settings, customers: list[str], fix: bool) -> list[history.Difference]:
    async with database.database(settings.database) as st:
        return await history.verify(st.pool, customers, progress_printer("verify"), fix)


async def _prune(settings: Settings, days: int, batch: int) -> ops.Pruned:
    async with database.database(settings.database) as st:
        return await ops.prune(st.pool, dt.timedelta(days=days), batch, progress_printer("prune"))
