"""The benchmark: starts `usage-service serve` on a scratch database, drives each scenario with
bench/loadgen.py (a separate client process, not the service's code) and prints a table of
throughput and latency, each with its ratio to a no-op call on the same server in the same run.

The no-op is grpc.health.v1.Health/Check on the service's own server: the same process, port,
interceptors and event loop as the usage calls, with no work behind it.

    .venv/bin/python bench/run.py --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import asyncpg
import grpc

from usage.v1 import customer_pb2, customer_pb2_grpc

HERE = pathlib.Path(__file__).resolve().parent
PLANS = HERE / "plans.toml"
LOADGEN = HERE / "loadgen.py"
START_TIMEOUT = 60.0  # seconds
CUSTOMERS = 1000
BATCH = 500  # events per BatchRecordUsage
RAW_WRITERS = 2  # connections of the raw asyncpg insert baseline (as many as group-commit flushes)

RAW_INSERT = """
INSERT INTO bench_raw (
    event_id, customer_id, idempotency_key, meter, quantity, event_time, properties, payload_hash)
SELECT e, c, k, m, q, t, p::jsonb, h
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::timestamptz[],
            $7::text[], $8::bytea[]) AS u(e, c, k, m, q, t, p, h)
ON CONFLICT (customer_id, idempotency_key) DO NOTHING
RETURNING event_id"""


def with_database(dsn: str, name: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by these processes (those still running)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def rss_mib(pids: Iterable[int]) -> float:
    """Resident memory of these processes together, MiB."""
    total = 0
    for pid in pids:
        try:
            text = pathlib.Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


@contextlib.contextmanager
def scratch_database(server_dsn: str) -> Iterator[str]:
    """A new database on the server for one run (its DSN), dropped afterwards."""
    name = f"usage_bench_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(server_dsn, name)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class Service:
    """`usage-service serve` as a child process, its address read from its first line."""

    def __init__(self, dsn: str, workers: int, env: dict[str, str]) -> None:
        full = {
            **os.environ,
            "DATABASE_URL": dsn,
            "USAGE_GRPC_ADDRESS": f"127.0.0.1:{env.pop('PORT', '0')}",
            "USAGE_PLANS_FILE": str(PLANS),
            "USAGE_DB_POOL_SIZE": "20",
            **env,
        }
        cmd = [sys.executable, "-m", "usage_service.cli", "serve"]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        self.proc = subprocess.Popen(
            cmd, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.address = ""
        self.output: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                if line.startswith("usage-service listening on ") and not self.address:
                    self.address = line.split()[-1]
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(START_TIMEOUT) or not self.address:
            self.stop()
            raise RuntimeError("service did not start:\n" + "".join(self.output[-30:]))

    def pids(self) -> list[int]:
        """The service process and its children (the workers in --workers mode)."""
        found = [self.proc.pid]
        for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                found.append(int(stat.parent.name))
        return found

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids())

    def rss_mib(self) -> float:
        return rss_mib(self.pids())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def add_customers(address: str, count: int, metadata: Sequence[tuple[str, str]] = ()) -> None:
    """Customers bench-0 .. bench-{count - 1} on the bench plan, in a period that contains now."""
    now = dt.datetime.now(dt.UTC)
    with grpc.insecure_channel(address) as channel:
        stub = customer_pb2_grpc.CustomerServiceStub(channel)
        for i in range(count):
            c = customer_pb2.Customer(
                customer_id=f"bench-{i}",
                plan_id="bench",
                subscription_status=customer_pb2.SUBSCRIPTION_STATUS_ACTIVE,
            )
            c.current_period_start_time.FromDatetime(now - dt.timedelta(days=1))
            c.current_period_end_time.FromDatetime(now + dt.timedelta(days=29))
            stub.UpsertCustomer(
                customer_pb2.UpsertCustomerRequest(customer=c), timeout=10, metadata=metadata
            )


def loadgen(address: str, scenario: str, args: argparse.Namespace, **opts: Any) -> dict[str, Any]:
    """Runs bench/loadgen.py once; `opts` are its flags (they override the defaults from args)."""
    flags = {
        "duration": args.duration,
        "warmup": args.warmup,
        "procs": args.procs,
        "customers": CUSTOMERS,
        "batch": BATCH,
        **opts,
    }
    cmd = [sys.executable, str(LOADGEN), "--address", address, "--scenario", scenario]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measured(service: Service, address: str, scenario: str, args: argparse.Namespace, **opts: Any):
    cpu0 = service.cpu_seconds()
    result = loadgen(address, scenario, args, **opts)
    cpu = service.cpu_seconds() - cpu0
    total = args.duration + args.warmup
    calls = result["calls"] * total / args.duration  # calls in the warm-up used CPU too
    result["cpu_us_per_call"] = cpu / calls * 1e6 if calls else float("nan")
    return result


async def raw_insert(dsn: str, seconds: float) -> float:
    """Events/s of plain asyncpg unnest inserts of BATCH rows into a copy of usage_events
    (same columns, indexes and constraints), RAW_WRITERS connections, one commit per batch."""
    conn = await asyncpg.connect(dsn)
    await conn.execute("DROP TABLE IF EXISTS bench_raw")
    await conn.execute("CREATE TABLE bench_raw (LIKE usage_events INCLUDING ALL)")
    # usage_events keeps its keys in usage_keys (it is partitioned): the copy keeps them itself
    await conn.execute("ALTER TABLE bench_raw ADD UNIQUE (customer_id, idempotency_key)")
    await conn.close()
    now = dt.datetime.now(dt.UTC)
    deadline = time.monotonic() + seconds
    counts = [0] * RAW_WRITERS

    async def writer(w: int) -> None:
        c = await asyncpg.connect(dsn)
        try:
            n = 0
            while time.monotonic() < deadline:
                ids = [uuid.uuid4() for _ in range(BATCH)]
                await c.fetch(
                    RAW_INSERT,
                    ids,
                    [f"bench-{(n * BATCH + j) % CUSTOMERS}" for j in range(BATCH)],
                    [f"raw-{w}-{n}-{j}" for j in range(BATCH)],
                    ["tokens"] * BATCH,
                    [1 + j % 100 for j in range(BATCH)],
                    [now] * BATCH,
                    ["{}"] * BATCH,
                    [os.urandom(32) for _ in range(BATCH)],
                )
                n += 1
                counts[w] += BATCH
        finally:
            await c.close()

    start = time.monotonic()
    await asyncio.gather(*(writer(w) for w in range(RAW_WRITERS)))
    return sum(counts) / (time.monotonic() - start)


def median_of(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median throughput, with every figure taken as its own median."""
    out = dict(results[len(results) // 2])
    for key in ("calls_per_s", "events_per_s", "p50", "p99", "p999", "cpu_us_per_call"):
        out[key] = statistics.median(r[key] for r in results)
    return out


def rows(args: argparse.Namespace, service: Service) -> Iterator[dict[str, Any]]:
    """Runs the scenarios, yielding one row per (scenario, mode): medians over the repeats."""
    address = service.address
    closed: dict[str, list[dict[str, Any]]] = {s: [] for s in args.scenarios}
    for r in range(args.repeats):
        for s in args.scenarios:
            conc = args.batch_concurrency if s == "batch" else args.concurrency
            res = measured(service, address, s, args, mode="closed", concurrency=conc)
            print(f"  repeat {r + 1} {s} closed: {res['calls_per_s']:.0f}/s", file=sys.stderr)
            closed[s].append(res)
    best = {s: median_of(v) for s, v in closed.items()}
    noop_rate = best["noop"]["calls_per_s"] if "noop" in best else 1000.0
    for s in args.scenarios:
        conc = args.batch_concurrency if s == "batch" else args.concurrency
        yield {**best[s], "concurrency": conc}
    # Open loop: every call scenario at one constant rate, a fraction of the no-op's maximum.
    rate = round(noop_rate * args.open_fraction, -1)
    opened: dict[str, list[dict[str, Any]]] = {s: [] for s in args.scenarios}
    for r in range(args.repeats):
        for s in args.scenarios:
            s_rate = rate if s != "batch" else max(1.0, best[s]["calls_per_s"] * args.open_fraction)
            res = measured(service, address, s, args, mode="open", rate=s_rate)
            print(
                f"  repeat {r + 1} {s} open @{s_rate:.0f}/s: p99 {res['p99'] * 1e3:.2f} ms",
                file=sys.stderr,
            )
            res["rate"] = s_rate
            opened[s].append(res)
    for s in args.scenarios:
        yield median_of(opened[s])


def fmt_table(table: Sequence[dict[str, Any]], raw: float | None) -> str:
    base = {(r["scenario"], r["mode"]): r for r in table if r["scenario"] == "noop"}
    lines = [
        "| scenario | load | calls/s | events/s | p50 ms | p99 ms | server CPU µs/call "
        "| calls/s ÷ no-op | p99 ÷ no-op | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in table:
        b = base.get(("noop", r["mode"]))
        load = (
            f"{r['concurrency']} in flight" if r["mode"] == "closed" else f"{r['rate']:.0f}/s open"
        )
        ratio = f"{r['calls_per_s'] / b['calls_per_s']:.2f}x" if b else "-"
        p99 = f"{r['p99'] / b['p99']:.2f}x" if b else "-"
        if r["mode"] == "open":
            ratio = "-"
        lines.append(
            f"| {r['scenario']} | {load} | {r['calls_per_s']:,.0f} | {r['events_per_s']:,.0f} "
            f"| {r['p50'] * 1e3:.2f} | {r['p99'] * 1e3:.2f} | {r['cpu_us_per_call']:.0f} "
            f"| {ratio} | {p99} | {r['errors'] or ''} |"
        )
    if raw is not None:
        lines.append(
            f"| raw asyncpg unnest ({RAW_WRITERS} conns, {BATCH} rows) | - | {raw / BATCH:,.0f} "
            f"| {raw:,.0f} | | | | | | |"
        )
    return "\n".join(lines)


def goals(table: Sequence[dict[str, Any]], raw: float | None) -> list[str]:
    by = {(r["scenario"], r["mode"]): r for r in table}
    out = []

    def goal(name: str, ok: bool, text: str) -> None:
        out.append(f"- [{'met' if ok else 'NOT MET'}] {name}: {text}")

    noop = by.get(("noop", "closed"))
    if noop is None:
        return out
    for s, need in (("record", 0.8), ("check", 0.9), ("consume", 0.6)):
        r = by.get((s, "closed"))
        if r:
            x = r["calls_per_s"] / noop["calls_per_s"]
            goal(f"{s} throughput >= {need}x no-op", x >= need, f"{x:.2f}x")
    r, o, n = by.get(("record", "closed")), by.get(("record", "open")), by.get(("noop", "open"))
    if r:
        x = r["p99"] / noop["p99"]
        goal("record p99 <= 2x no-op p99 (64 in flight)", x <= 2, f"{x:.2f}x")
    if o and n:
        x = o["p99"] / n["p99"]
        goal("record p99 <= 2x no-op p99 (open loop)", x <= 2, f"{x:.2f}x")
    b = by.get(("batch", "closed"))
    if b:
        goal("batch >= 50,000 events/s", b["events_per_s"] >= 50_000, f"{b['events_per_s']:,.0f}")
        if raw:
            x = b["events_per_s"] / raw
            goal("batch >= 0.7x raw asyncpg unnest", x >= 0.7, f"{x:.2f}x of {raw:,.0f}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    p.add_argument("--scenarios", default="noop,record,batch,check,consume", help="comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--repeats", type=int, default=3, help="runs per scenario (medians shown)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--batch-concurrency", type=int, default=8)
    p.add_argument("--open-fraction", type=float, default=0.5, help="open-loop rate ÷ no-op max")
    p.add_argument("--procs", type=int, default=2, help="load generator processes")
    p.add_argument("--workers", type=int, default=1, help="service processes (serve --workers)")
    p.add_argument("--no-raw", action="store_true", help="skip the raw asyncpg baseline")
    p.add_argument("--json", default="", help="also write the rows to this file")
    p.add_argument(
        "--plans",
        default=str(PLANS),
        help="plans file (bench/plans_prepaid.toml: tokens paid by credits)",
    )
    args = p.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    if not args.database_url:
        p.error("--database-url (or DATABASE_URL) is required")
    with scratch_database(args.database_url) as dsn:
        service = Service(dsn, args.workers, {"USAGE_PLANS_FILE": args.plans})
        try:
            print(f"service on {service.address} ({dsn.rsplit('/', 1)[-1]})", file=sys.stderr)
            add_customers(service.address, CUSTOMERS)
            rss_start = service.rss_mib()
            table = list(rows(args, service))
            rss_end = service.rss_mib()
            raw = None if args.no_raw else asyncio.run(raw_insert(dsn, args.duration))
        finally:
            service.stop()
    print(
        f"\nusage-service bench: {os.cpu_count()} cores, workers={args.workers}, "
        f"loadgen procs={args.procs}, {args.duration:g} s x {args.repeats} repeats (medians)\n"
    )
    print(fmt_table(table, raw))
    print(f"\nservice RSS: {rss_start:.0f} MiB after setup, {rss_end:.0f} MiB after the runs")
    print("\n".join(["", "Goals:", *goals(table, raw)]))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"rows": table, "raw": raw}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
