"""A gRPC load generator for usage-service, independent of the service's code: it speaks the
usage.v1 contract (the generated stubs) and grpc.health.v1 through grpcio's client only.

Two modes, each run by `--procs` processes (each with its own connection):
- closed: `--concurrency` calls kept in flight; measures the most the server can take.
- open: calls start at a constant `--rate` whatever the answers do, and each latency is counted
  from the moment its call was due, not sent, so a stalled server cannot hide slow calls.

Scenarios: noop (grpc.health.v1 Check), record (RecordUsage), batch (BatchRecordUsage; its
events spread over `--batch-customers` consecutive customers, by default one each),
check (CheckEntitlement), consume (CheckEntitlement with consume, spread over the customers),
consume_hot (the same, every call on one customer and feature), summary (GetUsageSummary).

Prints one JSON object: calls, events, errors, seconds, and a latency histogram summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from usage.v1 import usage_pb2, usage_pb2_grpc

SCENARIOS = ("noop", "record", "batch", "check", "consume", "consume_hot", "summary")
HOT_CUSTOMER = "bench-0"  # consume_hot: every call consumes this customer's `tokens`
MAX_OUTSTANDING = 20_000  # open mode: calls in flight before new ones count as dropped
BUCKET_GROWTH = 1.02  # histogram: 2% wide latency buckets
CALL_TIMEOUT = 30.0  # seconds


class Histogram:
    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def add(self, seconds: float) -> None:
        b = int(math.log(max(seconds, 1e-6) * 1e6, BUCKET_GROWTH))
        self.counts[b] = self.counts.get(b, 0) + 1

    def merge(self, other: dict[int, int]) -> None:
        for b, n in other.items():
            self.counts[int(b)] = self.counts.get(int(b), 0) + n

    def percentile(self, p: float) -> float:
        """Seconds (the bucket's upper edge) below which p% of calls finished."""
        total = sum(self.counts.values())
        if not total:
            return float("nan")
        goal, seen = total * p / 100, 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= goal:
                return float(BUCKET_GROWTH ** (b + 1) / 1e6)
        return float("nan")


class _RoundRobin:
    """Spreads calls over several stubs, one connection each."""

    def __init__(self, stubs: list[Any]) -> None:
        self.stubs = stubs
        self.i = 0

    def __getattr__(self, name: str) -> Any:
        self.i += 1
        return getattr(self.stubs[self.i % len(self.stubs)], name)


def _call_factory(
    scenario: str,
    channels: list[grpc.aio.Channel],
    customers: int,
    batch: int,
    tag: str,
    token: str = "",
    batch_customers: int = 0,
) -> tuple[Callable[[int], Awaitable[Any]], int]:
    """Returns (call(i), events per call) for a scenario."""
    usage: Any = _RoundRobin([usage_pb2_grpc.UsageServiceStub(c) for c in channels])
    health: Any = _RoundRobin([health_pb2_grpc.HealthStub(c) for c in channels])
    md = (("authorization", f"Bearer {token}"),) if token else None
    if scenario == "noop":
        req = health_pb2.HealthCheckRequest(service="")
        return (lambda i: health.Check(req, timeout=CALL_TIMEOUT, metadata=md)), 0
    if scenario == "record":

        def record(i: int) -> Awaitable[Any]:
            return usage.RecordUsage(
                usage_pb2.RecordUsageRequest(
                    customer_id=f"bench-{i % customers}",
                    meter="tokens",
                    quantity=1 + i % 100,
                    idempotency_key=f"{tag}-{i}",
                ),
                timeout=CALL_TIMEOUT,
                metadata=md,
            )

        return record, 1
    if scenario == "batch":
        spread = batch_customers or batch  # customers per batch

        def record_batch(i: int) -> Awaitable[Any]:
            return usage.BatchRecordUsage(
                usage_pb2.BatchRecordUsageRequest(
                    requests=[
                        usage_pb2.RecordUsageRequest(
                            customer_id=f"bench-{(i * spread + j % spread) % customers}",
                            meter="tokens",
                            quantity=1 + j % 100,
                            idempotency_key=f"{tag}-{i}-{j}",
                        )
                        for j in range(batch)
                    ]
                ),
                timeout=CALL_TIMEOUT,
                metadata=md,
            )

        return record_batch, batch
    if scenario == "check":

        def check(i: int) -> Awaitable[Any]:
            return usage.CheckEntitlement(
                usage_pb2.CheckEntitlementRequest(
                    customer_id=f"bench-{i % customers}", feature="tokens", quantity=1
                ),
                timeout=CALL_TIMEOUT,
                metadata=md,
            )

        return check, 0
    if scenario in ("consume", "consume_hot"):
        hot = scenario == "consume_hot"

        def consume(i: int) -> Awaitable[Any]:
            return usage.CheckEntitlement(
                usage_pb2.CheckEntitlementRequest(
                    customer_id=HOT_CUSTOMER if hot else f"bench-{i % customers}",
                    feature="tokens",
                    quantity=1,
                    consume=True,
                    idempotency_key=f"{tag}-{i}",
                ),
                timeout=CALL_TIMEOUT,
                metadata=md,
            )

        return consume, 1
    if scenario == "summary":

        def summary(i: int) -> Awaitable[Any]:
            return usage.GetUsageSummary(
                usage_pb2.GetUsageSummaryRequest(customer_id=f"bench-{i % customers}"),
                timeout=CALL_TIMEOUT,
                metadata=md,
            )

        return summary, 0
    raise SystemExit(f"unknown scenario {scenario!r}")


async def _worker(args: argparse.Namespace, proc: int) -> dict[str, Any]:
    tag = f"{args.tag}-{proc}"
    # A local subchannel pool gives each channel its own connection (spread over workers).
    separate = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(args.address, options=separate) for _ in range(args.channels)
    ]
    try:
        call, events_per_call = _call_factory(
            args.scenario,
            channels,
            args.customers,
            args.batch,
            tag,
            args.token,
            args.batch_customers,
        )
        for c in range(args.channels):
            await call(-1 - proc * args.channels - c)  # connect before the clock starts
        hist = Histogram()
        errors: dict[str, int] = {}
        counter = iter(range(10**12))
        loop = asyncio.get_running_loop()
        measuring_from = loop.time() + args.warmup
        end = measuring_from + args.duration
        done = 0

        async def one(due: float) -> None:
            nonlocal done
            try:
                await call(next(counter))
            except grpc.aio.AioRpcError as exc:
                if due >= measuring_from:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                return
            if due >= measuring_from:
                hist.add(loop.time() - due)
                done += 1

        if args.mode == "closed":
            share, extra = divmod(args.concurrency, args.procs)
            per_proc = max(1, share + (proc < extra))

            async def loop_worker() -> None:
                while loop.time() < end:
                    await one(loop.time())

            await asyncio.gather(*(loop_worker() for _ in range(per_proc)))
        else:
            rate = args.rate / args.procs
            interval = 1.0 / rate
            start = loop.time()
            pending: set[asyncio.Task[None]] = set()
            i = 0
            while True:
                due = start + i * interval
                if due >= end:
                    break
                i += 1
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(pending) >= MAX_OUTSTANDING:
                    if due >= measuring_from:
                        errors["DROPPED"] = errors.get("DROPPED", 0) + 1
                    continue
                task = loop.create_task(one(due))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(pending, timeout=CALL_TIMEOUT + 5)
    finally:
        for channel in channels:
            await channel.close()
    return {
        "calls": done,
        "events": done * events_per_call,
        "errors": errors,
        "hist": hist.counts,
    }


def _run_proc(args: argparse.Namespace, proc: int, out: Any) -> None:
    out.put(asyncio.run(_worker(args, proc)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_run_proc, args=(args, p, queue)) for p in range(args.procs)]
    for p in procs:
        p.start()
    parts = [queue.get(timeout=args.warmup + args.duration + CALL_TIMEOUT + 60) for _ in procs]
    for p in procs:
        p.join(30)
    hist = Histogram()
    errors: dict[str, int] = {}
    for part in parts:
        hist.merge(part["hist"])
        for k, n in part["errors"].items():
            errors[k] = errors.get(k, 0) + n
    calls = sum(p["calls"] for p in parts)
    events = sum(p["events"] for p in parts)
    return {
        "scenario": args.scenario,
        "mode": args.mode,
        "calls": calls,
        "events": events,
        "seconds": args.duration,
        "calls_per_s": calls / args.duration,
        "events_per_s": events / args.duration,
        "p50": hist.percentile(50),
        "p99": hist.percentile(99),
        "p999": hist.percentile(99.9),
        "errors": errors,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--address", required=True, help="host:port (loopback only)")
    p.add_argument("--scenario", choices=SCENARIOS, required=True)
    p.add_argument("--mode", choices=("closed", "open"), default="closed")
    p.add_argument("--concurrency", type=int, default=64, help="closed: calls in flight")
    p.add_argument("--rate", type=float, default=1000.0, help="open: calls per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds run but not measured")
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--channels", type=int, default=2, help="connections per process")
    p.add_argument("--customers", type=int, default=1000)
    p.add_argument("--batch", type=int, default=500, help="events per BatchRecordUsage")
    p.add_argument(
        "--batch-customers",
        type=int,
        default=0,
        help="customers each batch's events are spread over (0: one per event)",
    )
    p.add_argument("--tag", default="", help="idempotency key prefix (default: random)")
    p.add_argument("--token", default="", help="bearer token sent with every call (default: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    host = args.address.rsplit(":", 1)[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print("loadgen: only loopback addresses are allowed", file=sys.stderr)
        return 2
    args.tag = args.tag or uuid.uuid4().hex[:10]
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    sys.exit(main())
