"""WatchUsage at scale: `--watchers` streams on one replica, one per customer, while RecordUsage
runs at a constant rate; prints a markdown table and whether the goals are met.

Starts `usage-service serve` on a scratch database (bench/run.py's helpers), adds the customers,
then in this order:
1. baseline: RecordUsage open loop at `--rate` for `--duration` s with no watcher open
   (bench/loadgen.py, a separate process), so the writes' latency and the service's CPU per event
   are known without watchers and every pool connection and cache is warm;
2. at rest: the service's RSS and CPU over `--rest` s;
3. opens the watchers from `--client-procs` client processes (grpcio aio, the generated stubs,
   `--connections` connections in all) and waits for every snapshot: RSS again, and the CPU
   over `--rest` s with every watcher open and nothing changing;
4. the same RecordUsage load with the watchers open. Each client timestamps every message it
   receives and subtracts its commit_time (same host, same clock: commit-to-delivery latency),
   and checks that each customer's versions follow one another with no gap or repeat; at the
   end each watcher must have reached its customer's latest version in the database.

The service admits at most 500 streams per caller, so the watchers use one token per 500. The
exit status is 1 when a watcher missed a change, got one twice or out of order, or its stream
ended; the latency and memory goals only show in the output.

    .venv/bin/python bench/watch.py --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import pathlib
import secrets
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import asyncpg
import grpc
from loadgen import Histogram
from run import Service, add_customers, cpu_seconds, loadgen, scratch_database

from usage.v1 import usage_pb2, usage_pb2_grpc

WATCHES_PER_TOKEN = 500  # the service's cap on one caller's open WatchUsage streams
OPEN_TIMEOUT = 300.0  # seconds for every watcher's snapshot to arrive
SETTLE_TIMEOUT = 60.0  # seconds for every watcher to reach its customer's last version
PROBE = 0.01  # seconds between a client's event-loop lag probes
# Goals: commit-to-delivery p99, memory per watcher (1,000 watchers in 100 MiB), no missed change.
GOAL_P99 = 0.100  # seconds
GOAL_KIB_PER_WATCHER = 100.0


# --- the watcher client (a separate process) -------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Follow:
    """One stream as its client saw it."""

    customer_id: str
    token: str
    last: int | None = None  # the last version received (the snapshot's first)
    received: int = 0  # changes after the snapshot
    gaps: int = 0  # messages whose version skipped ahead
    skipped: int = 0  # versions those skipped over
    repeats: int = 0  # messages whose version was not above the last one
    error: str = ""  # how the stream ended early, if it did


async def _client(
    address: str, assigned: Sequence[tuple[str, str]], connections: int, pipe: Connection
) -> None:
    loop = asyncio.get_running_loop()
    separate = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
    channels = [grpc.aio.insecure_channel(address, options=separate) for _ in range(connections)]
    stubs = [usage_pb2_grpc.UsageServiceStub(c) for c in channels]
    follows = [_Follow(c, t) for c, t in assigned]
    latency = Histogram()
    worst = 0.0
    started = 0  # streams that gave their snapshot or ended before it
    all_started = asyncio.Event()
    targets: dict[_Follow, int] = {}
    caught_up = asyncio.Event()

    def reached(f: _Follow) -> None:
        if f in targets and f.last is not None and f.last >= targets[f]:
            del targets[f]
            if not targets:
                caught_up.set()

    def begun() -> None:
        nonlocal started
        started += 1
        if started == len(follows):
            all_started.set()

    async def follow(f: _Follow, stub: Any) -> None:
        nonlocal worst
        md = (("authorization", f"Bearer {f.token}"),)
        call = stub.WatchUsage(usage_pb2.WatchUsageRequest(customer_id=f.customer_id), metadata=md)
        try:
            async for m in call:
                now = time.time()
                if f.last is None:
                    f.last = m.version
                    begun()
                    continue
                seconds = now - (m.commit_time.seconds + m.commit_time.nanos * 1e-9)
                latency.add(seconds)
                worst = max(worst, seconds)
                f.received += 1
                if m.version > f.last + 1:
                    f.gaps += 1
                    f.skipped += m.version - f.last - 1
                elif m.version <= f.last:
                    f.repeats += 1
                f.last = max(f.last, m.version)
                reached(f)
            f.error = "ENDED"
        except grpc.aio.AioRpcError as exc:
            f.error = exc.code().name
        if f.last is None:
            begun()

    tasks = [loop.create_task(follow(f, stubs[i % connections])) for i, f in enumerate(follows)]
    t0, cpu0 = loop.time(), time.process_time()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(OPEN_TIMEOUT):
            await all_started.wait()
    pipe.send(
        {
            "seconds": loop.time() - t0,
            "cpu": time.process_time() - cpu0,
            "snapshots": sum(f.last is not None for f in follows),
            "errors": _errors(follows),
        }
    )
    await asyncio.to_thread(pipe.recv)  # the load starts
    lag = Histogram()
    lag_max = 0.0

    async def probe() -> None:
        nonlocal lag_max
        while True:
            t = loop.time()
            await asyncio.sleep(PROBE)
            late = loop.time() - t - PROBE
            lag.add(late)
            lag_max = max(lag_max, late)

    prober = loop.create_task(probe())
    heads: dict[str, int] = await asyncio.to_thread(pipe.recv)  # the load is over
    for f in follows:
        targets[f] = heads.get(f.customer_id, 0)
        reached(f)
    if targets:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_TIMEOUT):
                await caught_up.wait()
    prober.cancel()
    pipe.send(
        {
            "received": sum(f.received for f in follows),
            "latency": latency.counts,
            "max": worst,
            "gaps": sum(f.gaps for f in follows),
            "skipped": sum(f.skipped for f in follows),
            "repeats": sum(f.repeats for f in follows),
            "behind": len(targets),
            "missing": sum(t - (f.last or 0) for f, t in targets.items()),
            "errors": _errors(follows),
            "lag": lag.counts,
            "lag_max": lag_max,
        }
    )
    await asyncio.to_thread(pipe.recv)  # close
    for c in channels:
        await c.close(None)
    await asyncio.gather(*tasks, return_exceptions=True)


def _errors(follows: Sequence[_Follow]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in follows:
        if f.error:
            out[f.error] = out.get(f.error, 0) + 1
    return out


def _client_main(
    address: str, assigned: Sequence[tuple[str, str]], connections: int, pipe: Connection
) -> None:
    asyncio.run(_client(address, assigned, connections, pipe))


# --- the conductor ---------------------------------------------------------------------------


class Clients:
    """The watcher client processes, each with a pipe to follow its steps."""

    def __init__(self, address: str, tokens: Sequence[str], args: argparse.Namespace) -> None:
        ctx = multiprocessing.get_context("spawn")
        n, procs = args.watchers, args.client_procs
        per_proc = max(1, args.connections // procs)
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for k in range(procs):
            assigned = [(f"bench-{i}", tokens[i // WATCHES_PER_TOKEN]) for i in range(k, n, procs)]
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=_client_main, args=(address, assigned, per_proc, theirs))
            p.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(p)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def send(self, message: object) -> None:
        for pipe in self.pipes:
            pipe.send(message)

    def receive(self, timeout: float) -> list[dict[str, Any]]:
        out = []
        for pipe in self.pipes:
            if not pipe.poll(timeout):
                raise RuntimeError("a watcher client did not answer")
            out.append(pipe.recv())
        return out

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.send("close")
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()


async def _db_state(dsn: str) -> tuple[int, dict[str, int]]:
    """Events stored, and each customer's latest change version."""
    conn = await asyncpg.connect(dsn)
    try:
        events = await conn.fetchval("SELECT count(*) FROM usage_events")
        heads = await conn.fetch("SELECT customer_id, version FROM usage_change_heads")
    finally:
        await conn.close()
    return int(events), {r["customer_id"]: int(r["version"]) for r in heads}


def _merged(parts: Sequence[dict[str, Any]], key: str) -> Histogram:
    h = Histogram()
    for part in parts:
        h.merge(part[key])
    return h


def _summed(parts: Sequence[dict[str, Any]], key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for k, n in part[key].items():
            out[k] = out.get(k, 0) + n
    return out


def waited_seconds(pids: Sequence[int]) -> float:
    """Seconds the processes' threads have spent ready to run but waiting for a CPU."""
    total = 0
    for pid in pids:
        for stat in pathlib.Path(f"/proc/{pid}/task").glob("*/schedstat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += int(stat.read_text().split()[1])
    return total / 1e9


def _load(
    service: Service, dsn: str, tokens: dict[str, str], args: argparse.Namespace
) -> tuple[dict[str, Any], float, int, dict[str, int]]:
    """RecordUsage at the rate for the duration: loadgen's result (with the share of the time
    the service waited for a CPU), the service's CPU seconds, the events stored and each
    customer's latest version afterwards."""
    events0, _ = asyncio.run(_db_state(dsn))
    cpu0, wait0, t0 = service.cpu_seconds(), waited_seconds(service.pids()), time.monotonic()
    opts = {"mode": "open", "rate": args.rate, "customers": args.watchers}
    result = loadgen(service.address, "record", args, token=tokens["bench"], **opts)
    cpu = service.cpu_seconds() - cpu0
    result["waited"] = (waited_seconds(service.pids()) - wait0) / (time.monotonic() - t0)
    events1, heads = asyncio.run(_db_state(dsn))
    return result, cpu, events1 - events0, heads


def measure(args: argparse.Namespace) -> dict[str, Any]:
    clients_needed = math.ceil(args.watchers / WATCHES_PER_TOKEN)
    tokens = {"bench": secrets.token_hex(16)}
    tokens.update({f"watch-{k}": secrets.token_hex(16) for k in range(clients_needed)})
    scopes = ["usage:write", "usage:read", "customers:write", "customers:read"]
    table = {
        name: {"token": t, "scopes": scopes if name == "bench" else ["usage:read"]}
        for name, t in tokens.items()
    }
    watch_tokens = [tokens[f"watch-{k}"] for k in range(clients_needed)]
    r: dict[str, Any] = {"load_average": [os.getloadavg()[0]]}
    with scratch_database(args.database_url) as dsn:
        service = Service(dsn, 1, {"USAGE_AUTH_TOKENS": json.dumps(table)})
        clients: Clients | None = None
        try:
            say(f"service on {service.address}; adding {args.watchers} customers")
            add_customers(
                service.address,
                args.watchers,
                metadata=(("authorization", f"Bearer {tokens['bench']}"),),
            )
            r["rss_setup"] = service.rss_mib()
            say(f"baseline: RecordUsage at {args.rate:g}/s, no watchers")
            base, base_cpu, base_events, _ = _load(service, dsn, tokens, args)
            r["base"], r["base_cpu"], r["base_events"] = base, base_cpu, base_events

            cpu0, t0 = service.cpu_seconds(), time.monotonic()
            time.sleep(args.rest)
            r["rest_cpu"] = (service.cpu_seconds() - cpu0) / (time.monotonic() - t0)
            r["rss_rest"] = service.rss_mib()

            say(f"opening {args.watchers} watchers from {args.client_procs} processes")
            cpu0, t0 = service.cpu_seconds(), time.monotonic()
            clients = Clients(service.address, watch_tokens, args)
            opened = clients.receive(OPEN_TIMEOUT + 60)
            r["open_seconds"] = time.monotonic() - t0
            r["open_cpu"] = service.cpu_seconds() - cpu0
            r["snapshots"] = sum(p["snapshots"] for p in opened)
            r["open_errors"] = _summed(opened, "errors")
            r["rss_open"] = service.rss_mib()
            r["client_open_cpu"] = sum(p["cpu"] for p in opened) / max(p["seconds"] for p in opened)

            cpu0, t0 = service.cpu_seconds(), time.monotonic()
            time.sleep(args.rest)
            r["idle_cpu"] = (service.cpu_seconds() - cpu0) / (time.monotonic() - t0)

            say(f"RecordUsage at {args.rate:g}/s with {r['snapshots']} watchers open")
            _, heads0 = asyncio.run(_db_state(dsn))
            ccpu0, cpu0, t0 = cpu_seconds(clients.pids()), service.cpu_seconds(), time.monotonic()
            clients.send("load")
            load, _, events, heads = _load(service, dsn, tokens, args)
            clients.send(heads)
            done = clients.receive(SETTLE_TIMEOUT + 60)
            wall = time.monotonic() - t0
            r["load"], r["load_events"] = load, events
            r["load_cpu"] = service.cpu_seconds() - cpu0
            r["client_cpu"] = (cpu_seconds(clients.pids()) - ccpu0) / wall
            r["expected"] = sum(heads.values()) - sum(heads0.values())
            r["received"] = sum(p["received"] for p in done)
            r["latency"] = _merged(done, "latency")
            r["max"] = max(p["max"] for p in done)
            r["lag"] = _merged(done, "lag")
            r["lag_max"] = max(p["lag_max"] for p in done)
            for key in ("gaps", "skipped", "repeats", "behind", "missing"):
                r[key] = sum(p[key] for p in done)
            r["errors"] = _summed(done, "errors")
            r["rss_after"] = service.rss_mib()
            r["load_average"].append(os.getloadavg()[0])
        finally:
            if clients is not None:
                clients.stop()
            service.stop()
    return r


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def report(r: dict[str, Any], args: argparse.Namespace) -> tuple[str, list[str], bool]:
    """The table, the goal lines, and whether every watcher got every change exactly once."""
    n = args.watchers
    per_watcher = (r["rss_open"] - r["rss_rest"]) * 1024 / n
    base, load, lat = r["base"], r["load"], r["latency"]
    base_us = r["base_cpu"] / r["base_events"] * 1e6 if r["base_events"] else math.nan
    load_us = r["load_cpu"] / r["load_events"] * 1e6 if r["load_events"] else math.nan
    change_us = r["load_cpu"] / r["received"] * 1e6 if r["received"] else math.nan
    extra_us = (
        (r["load_cpu"] - r["base_cpu"] / r["base_events"] * r["load_events"]) / r["received"] * 1e6
        if r["received"] and r["base_events"]
        else math.nan
    )
    errors = {**r["open_errors"], **r["errors"]}
    rows = [
        ("watchers open (snapshot received)", f"{r['snapshots']:,} / {n:,}"),
        ("time to open them all", f"{r['open_seconds']:.1f} s"),
        ("service CPU to open one watcher", ms(r["open_cpu"] / n)),
        ("service RSS: before the baseline / at rest after it", ""),
        ("", f"{r['rss_setup']:.1f} / {r['rss_rest']:.1f} MiB"),
        ("service RSS: watchers open / after the load with them", ""),
        ("", f"{r['rss_open']:.1f} / {r['rss_after']:.1f} MiB"),
        ("memory per watcher", f"{per_watcher:.1f} KiB"),
        ("service CPU at rest / watchers open, idle", ""),
        ("", f"{r['rest_cpu'] * 100:.1f}% / {r['idle_cpu'] * 100:.1f}% of a core"),
        ("events recorded with watchers open", f"{r['load_events']:,}"),
        ("changes delivered / committed for the watched", f"{r['received']:,} / {r['expected']:,}"),
        ("commit-to-delivery p50", ms(lat.percentile(50))),
        ("commit-to-delivery p99", ms(lat.percentile(99))),
        ("commit-to-delivery max", ms(r["max"])),
        ("service CPU per event: no watchers / watchers open", f"{base_us:.0f} / {load_us:.0f} µs"),
        ("service CPU per delivered change: all / above baseline", ""),
        ("", f"{change_us:.0f} / {extra_us:.0f} µs"),
        ("RecordUsage p50: no watchers / watchers open", ""),
        ("", f"{ms(base['p50'])} / {ms(load['p50'])} = {ratio(load['p50'], base['p50'])}"),
        ("RecordUsage p99: no watchers / watchers open", ""),
        ("", f"{ms(base['p99'])} / {ms(load['p99'])} = {ratio(load['p99'], base['p99'])}"),
        ("RecordUsage errors: no watchers / watchers open", f"{base['errors']} / {load['errors']}"),
        ("service waiting for a CPU: no watchers / watchers open", ""),
        ("", f"{base['waited'] * 1e3:.0f} / {load['waited'] * 1e3:.0f} ms per second"),
        ("watcher clients' CPU: opening / during the load", ""),
        ("", f"{r['client_open_cpu'] * 100:.0f}% / {r['client_cpu'] * 100:.1f}% of a core"),
        (
            "watcher clients' loop lag p99 / max",
            f"{ms(r['lag'].percentile(99))} / {ms(r['lag_max'])}",
        ),
        ("gaps (versions skipped) / repeats", f"{r['gaps']} ({r['skipped']}) / {r['repeats']}"),
        ("watchers short of their last version", f"{r['behind']} ({r['missing']} changes)"),
        ("streams ended early", ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0"),
    ]
    # Rows whose label is empty continue the previous one: join them into one line.
    joined: list[tuple[str, str]] = []
    for label, value in rows:
        if not label:
            joined[-1] = (joined[-1][0], value)
        else:
            joined.append((label, value))
    table = "\n".join(["| figure | value |", "|---|---:|", *(f"| {a} | {b} |" for a, b in joined)])
    complete = (
        r["snapshots"] == n
        and r["gaps"] == 0
        and r["repeats"] == 0
        and r["behind"] == 0
        and not errors
        and r["received"] == r["expected"]
    )
    p99 = lat.percentile(99)
    goals = [
        _goal(f"commit-to-delivery p99 <= {ms(GOAL_P99)}", p99 <= GOAL_P99, ms(p99)),
        _goal(
            f"memory per watcher <= {GOAL_KIB_PER_WATCHER:.0f} KiB",
            per_watcher <= GOAL_KIB_PER_WATCHER,
            f"{per_watcher:.1f} KiB",
        ),
        _goal(
            "every watcher received every change, in order, no gap or repeat",
            complete,
            f"{r['received']:,}/{r['expected']:,} changes, {r['gaps']} gaps, {r['repeats']} "
            f"repeats, {r['behind']} watchers behind, {sum(errors.values())} streams ended",
        ),
    ]
    return table, goals, complete


def _goal(name: str, ok: bool, text: str) -> str:
    return f"- [{'met' if ok else 'NOT MET'}] {name}: {text}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    p.add_argument("--watchers", type=int, default=1000, help="streams, one per customer")
    p.add_argument("--rate", type=float, default=200.0, help="RecordUsage calls per second")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load, measured")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--rest", type=float, default=5.0, help="seconds of CPU measured at rest")
    p.add_argument("--procs", type=int, default=1, help="load generator processes")
    p.add_argument("--client-procs", type=int, default=2, help="watcher client processes")
    p.add_argument("--connections", type=int, default=8, help="watcher connections in all")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args(argv)
    if not args.database_url:
        p.error("--database-url (or DATABASE_URL) is required")
    if args.watchers < 1 or args.client_procs < 1 or args.connections < args.client_procs:
        p.error("need --watchers >= 1, --client-procs >= 1, --connections >= --client-procs")
    r = measure(args)
    table, goals, complete = report(r, args)
    print(
        f"\nWatchUsage bench: {os.cpu_count()} cores, one replica, {args.watchers:,} watchers "
        f"({args.client_procs} client processes, {args.connections} connections), RecordUsage "
        f"{args.rate:g}/s open loop for {args.duration:g} s (+{args.warmup:g} s warm-up); "
        f"machine load average {r['load_average'][0]:.1f} at the start, "
        f"{r['load_average'][1]:.1f} at the end\n"
    )
    print(table)
    print("\n".join(["", "Goals:", *goals]))
    if args.json:
        flat = {k: (v.counts if isinstance(v, Histogram) else v) for k, v in r.items()}
        with open(args.json, "w") as f:
            json.dump(flat, f, indent=1)
    return 0 if complete else 1


if __name__ == "__main__":
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    sys.exit(main())
