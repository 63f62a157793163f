"""The benchmark: starts `usage-service serve` on a scratch database, drives each scenario with
bench/loadgen.py (a separate client process, not the service's code) and prints a table of
throughput and latency, each with its ratio to a no-op call on the same server in the same run.

The no-op is grpc.health.v1.Health/Check on the service's own server: the same process, port,
interceptors and event loop as the usage calls, with no work behind it.

Then the figures of issue 16, each against its goal in a "Goals" table: the drain
(bench/drain.py, run through its command line), and with `--soak` and `--preload` the memory
soak and the cost of the hot paths with events already stored (both off by default: minutes).

    .venv/bin/python bench/run.py --database-url postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/run.py --database-url ... --soak 600 --preload 1000000,10000000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import pathlib
import re
import shlex
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
import preload

from usage.v1 import customer_pb2, customer_pb2_grpc

HERE = pathlib.Path(__file__).resolve().parent
PLANS = HERE / "plans.toml"
LOADGEN = HERE / "loadgen.py"
DRAIN = HERE / "drain.py"
SCENARIOS = "noop,record,batch,check,consume,consume_hot,summary"
SOAK_PATHS = ("record", "check", "consume")
SOAK_LOAD = 0.8  # soak rate ÷ the path's closed-loop maximum in the same run
SOAK_WARMUP = 60.0  # seconds of each path's soak left out of its RSS baseline (at most 1/5)
SOAK_WINDOW = 10.0  # seconds of samples whose median is the baseline, and the end (<= 1/10)
SOAK_SAMPLE = 1.0  # seconds between RSS samples
MEMORY_GROWTH = 10.0  # goal: RSS grows less than this % over the soak
SOAK_HELD = 0.98  # a soak whose answered calls/s fall below this x its rate did not hold it
GROWTH_SCENARIOS = "record,check,consume,summary"
FLAT = 0.9  # goal: throughput (÷ no-op) with events stored >= this x the same with none
VERIFY_SAMPLE = 20  # customers `verify` checks after each preload
DRAIN_EVENTS = 20_000
# The many-customers consume on main before issue 16's work (BENCHMARKS.md, "Issue 16 goals"):
# the goal is to stay at least this fast, as a ratio to the no-op.
CONSUME_MANY_BEFORE = 0.14  # d260174, 2026-11-30 (340 consumes/s against a no-op of 2,451/s)
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
        "customers": getattr(args, "customers", CUSTOMERS),  # bench/watch.py passes none
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
    if getattr(args, "no_open", False):
        return
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


def earlier_goals(table: Sequence[dict[str, Any]], raw: float | None) -> list[str]:
    """Goals of earlier releases that issue 16 does not restate."""
    by = {(r["scenario"], r["mode"]): r for r in table}
    out = []

    def goal(name: str, ok: bool, text: str) -> None:
        out.append(f"- [{'met' if ok else 'NOT MET'}] {name}: {text}")

    noop, n = by.get(("noop", "closed")), by.get(("noop", "open"))
    r, o = by.get(("record", "closed")), by.get(("record", "open"))
    if r and noop:
        x = r["p99"] / noop["p99"]
        goal("record p99 <= 2x no-op p99 (closed loop)", x <= 2, f"{x:.2f}x")
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


def drain_label(text: str) -> str:
    """A drain figure's name: polar, stripe-stream (the v2 meter event stream), stripe-v1,
    stripe, or the text itself."""
    text = text.lower()
    if "stripe" in text:
        if re.search(r"stream|v2", text):
            return "stripe-stream"
        return "stripe-v1" if re.search(r"v1", text) else "stripe"
    return "polar" if "polar" in text else text


def drain_rates(output: str) -> dict[str, float]:
    """Events/s by drain in bench/drain.py's output (names: drain_label): every JSON object in
    it that has `events_per_s`, named by its `provider`, `scenario` or `name` field or else the
    key it sits under; failing any, its text lines ("... N events/s", Stripe's when the line
    names Stripe, else Polar's)."""
    found: dict[str, float] = {}

    def walk(node: Any, name: str) -> None:
        if isinstance(node, dict):
            label = str(node.get("scenario") or node.get("provider") or node.get("name") or name)
            if isinstance(node.get("events_per_s"), (int, float)):
                found.setdefault(drain_label(label), float(node["events_per_s"]))
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, name)

    for line in output.splitlines():
        line = line.strip()
        if line.startswith(("{", "[")):
            with contextlib.suppress(ValueError):
                walk(json.loads(line), "polar")
    if found:
        return found
    for line in output.splitlines():
        m = re.search(r"([\d,.]+) events/s", line)
        if m:
            key = drain_label(line) if "stripe" in line.lower() else "polar"
            found.setdefault(key, float(m.group(1).replace(",", "")))
    return found


def drain_flags() -> list[str]:
    """The flags that make bench/drain.py run Polar and, when it has them, the Stripe stream
    (`--scenario`) and answer in JSON (`--json`), read from its --help."""
    text = subprocess.run(
        [sys.executable, str(DRAIN), "--help"], check=True, capture_output=True, text=True
    ).stdout
    flags = []
    if "--scenario" in text and "stripe-stream" in text:
        flags += ["--scenario", "polar", "--scenario", "stripe-stream"]
    if "--json" in text:
        flags.append("--json")
    return flags


def drain(args: argparse.Namespace) -> dict[str, list[float]]:
    """bench/drain.py run `repeats` times through its command line (its own scratch database);
    events/s by provider, one figure per run."""
    runs: dict[str, list[float]] = {}
    flags = drain_flags() if not args.drain_args else shlex.split(args.drain_args)
    for r in range(args.repeats):
        cmd = [sys.executable, str(DRAIN), "--database-url", args.database_url]
        cmd += ["--events", str(args.drain_events), *flags]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rates = drain_rates(out.stdout)
        if not rates:
            raise RuntimeError(f"no events/s in bench/drain.py's output:\n{out.stdout}")
        for provider, rate in rates.items():
            runs.setdefault(provider, []).append(rate)
            print(f"  repeat {r + 1} drain {provider}: {rate:,.0f} events/s", file=sys.stderr)
    return runs


def soak(
    service: Service, args: argparse.Namespace, maxima: dict[str, float]
) -> list[dict[str, Any]]:
    """Each path in turn, for `--soak` seconds, in open loop at SOAK_LOAD of its closed-loop
    maximum, the service's RSS sampled every SOAK_SAMPLE seconds. The first SOAK_WARMUP seconds
    (at most a fifth of the run) are warm-up: the baseline is the median of the samples in the
    SOAK_WINDOW seconds (at most a tenth of the run) after it, the end the median of the last
    SOAK_WINDOW seconds, growth the end over the baseline; max is the highest sample after the
    warm-up."""
    out = []
    warmup = min(SOAK_WARMUP, args.soak / 5)
    window = min(SOAK_WINDOW, args.soak / 10)
    for path in SOAK_PATHS:
        if path not in maxima:
            continue
        rate = max(1.0, round(maxima[path] * SOAK_LOAD))
        samples: list[tuple[float, float]] = []
        done = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(service, samples, done), daemon=True)
        sampler.start()
        try:
            res = loadgen(
                service.address, path, args, mode="open", rate=rate, duration=args.soak, warmup=0
            )
        finally:
            done.set()
            sampler.join()
        samples.append((samples[-1][0] + SOAK_SAMPLE, service.rss_mib()))
        first = [m for t, m in samples if warmup <= t <= warmup + window] or [samples[0][1]]
        end = samples[-1][0]
        last = [m for t, m in samples if t >= end - window]
        after = [m for t, m in samples if t >= warmup]
        row = {
            "path": path,
            "rate": rate,
            "calls_per_s": res["calls_per_s"],
            "p99": res["p99"],
            "errors": res["errors"],
            "seconds": args.soak,
            "warmup_s": warmup,
            "start_mib": samples[0][1],
            "baseline_mib": statistics.median(first),
            "end_mib": statistics.median(last),
            "max_mib": max(after),
            "samples": len(samples),
        }
        row["growth_pct"] = (row["end_mib"] / row["baseline_mib"] - 1) * 100
        print(
            f"  soak {path} @{rate:.0f}/s: RSS {row['baseline_mib']:.1f} -> "
            f"{row['end_mib']:.1f} MiB ({row['growth_pct']:+.1f}%)",
            file=sys.stderr,
        )
        out.append(row)
    return out


def sample_rss(service: Service, samples: list[tuple[float, float]], done: threading.Event) -> None:
    """Appends (seconds since the start, RSS MiB) every SOAK_SAMPLE seconds until `done`."""
    t0 = time.monotonic()
    while True:
        samples.append((time.monotonic() - t0, service.rss_mib()))
        if done.wait(SOAK_SAMPLE):
            return


def fmt_soak(rows_: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| path | rate (80% of max) | answered calls/s | p99 ms | RSS start MiB "
        "| baseline MiB | end MiB | max MiB | growth | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows_:
        lines.append(
            f"| {r['path']} | {r['rate']:,.0f}/s | {r['calls_per_s']:,.0f} | {r['p99'] * 1e3:.2f} "
            f"| {r['start_mib']:.1f} | {r['baseline_mib']:.1f} | {r['end_mib']:.1f} "
            f"| {r['max_mib']:.1f} | {r['growth_pct']:+.1f}% | {r['errors'] or ''} |"
        )
    return "\n".join(lines)


def data_growth(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The hot paths with events stored against the same with none: two new databases, two
    services, the same customers; one database stays empty (but for the bench's own calls), the
    other is preloaded to each `--preload` size in turn (each adds to the one before; its
    service is stopped while it is filled and started afresh). At each size every scenario runs
    closed loop on the empty one and then at once on the loaded one, `repeats` times, so both
    sides of a pair see the same machine; the ratio is the median of the pairs' calls/s ratios.
    """
    scenarios = [s for s in args.preload_scenarios.split(",") if s]
    ids = [f"bench-{i}" for i in range(args.customers)]
    stages: list[dict[str, Any]] = []
    env = {"USAGE_PLANS_FILE": args.plans}
    with (
        scratch_database(args.database_url) as empty_dsn,
        scratch_database(args.database_url) as dsn,
    ):
        empty = Service(empty_dsn, args.workers, dict(env))
        try:
            add_customers(empty.address, args.customers)
            loaded = Service(dsn, args.workers, dict(env))
            try:
                add_customers(loaded.address, args.customers)
            finally:
                loaded.stop()
            stored = 0
            for size in args.preload:
                took = asyncio.run(
                    preload.preload(
                        dsn, size - stored, ids, dt.datetime.now(dt.UTC), progress=progress_line
                    )
                )
                print(
                    f"  preloaded {size - stored:,} events in {took['total_s']:.1f} s "
                    f"(insert {took['insert_s']:.1f}, totals {took['totals_s']:.1f}, "
                    f"vacuum {took['vacuum_s']:.1f})",
                    file=sys.stderr,
                )
                sample = ids[:: max(1, len(ids) // VERIFY_SAMPLE)][:VERIFY_SAMPLE]
                stage: dict[str, Any] = {
                    "preloaded": size,
                    "preload": {"events": size - stored, **took},
                    "verify": asyncio.run(preload.verify(dsn, sample)),
                    "verified": len(sample),
                }
                stored = size
                loaded = Service(dsn, args.workers, dict(env))
                try:
                    stage["stored"] = asyncio.run(stored_events(dsn))
                    stage.update(paired(args, scenarios, empty, loaded, size))
                finally:
                    loaded.stop()
                stages.append(stage)
        finally:
            empty.stop()
    return stages


def paired(
    args: argparse.Namespace, scenarios: Sequence[str], empty: Service, loaded: Service, size: int
) -> dict[str, Any]:
    """Each scenario on `empty`, then on `loaded`, `repeats` times: medians of each side and of
    the pairs' calls/s ratios (loaded ÷ empty)."""
    runs: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {s: [] for s in scenarios}
    for r in range(args.repeats):
        for s in scenarios:
            a = measured(empty, empty.address, s, args, mode="closed", concurrency=args.concurrency)
            b = measured(
                loaded, loaded.address, s, args, mode="closed", concurrency=args.concurrency
            )
            print(
                f"  {size:,} preloaded, repeat {r + 1} {s}: {a['calls_per_s']:.0f}/s with none, "
                f"{b['calls_per_s']:.0f}/s with them",
                file=sys.stderr,
            )
            runs[s].append((a, b))
    return {
        "none": {s: median_of([a for a, _ in v]) for s, v in runs.items()},
        "rows": {s: median_of([b for _, b in v]) for s, v in runs.items()},
        "ratio": {
            s: statistics.median(
                b["calls_per_s"] / a["calls_per_s"] if a["calls_per_s"] else float("nan")
                for a, b in v
            )
            for s, v in runs.items()
        },
    }


def progress_line(text: str) -> None:
    print(f"  {text}", file=sys.stderr)


async def stored_events(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM usage_events"))
    finally:
        await conn.close()


def flatness(stages: Sequence[dict[str, Any]]) -> dict[tuple[int, str], float]:
    """(preloaded, path) -> its calls/s with that many events stored over the same with none
    (medians of back-to-back pairs; 1.0 = as fast as with an empty database)."""
    return {(st["preloaded"], s): x for st in stages for s, x in st["ratio"].items() if s != "noop"}


def fmt_growth(stages: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| path | events stored | calls/s with none | calls/s with them | ratio "
        "| p50 ms none / them | p99 ms none / them |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for st in stages:
        for s, r in st["rows"].items():
            n = st["none"][s]
            lines.append(
                f"| {s} | {st['stored']:,} | {n['calls_per_s']:,.0f} | {r['calls_per_s']:,.0f} "
                f"| {st['ratio'][s]:.2f}x | {n['p50'] * 1e3:.2f} / {r['p50'] * 1e3:.2f} "
                f"| {n['p99'] * 1e3:.2f} / {r['p99'] * 1e3:.2f} |"
            )
    times = [
        f"{st['preload']['events']:,} events in {st['preload']['total_s']:.1f} s (insert "
        f"{st['preload']['insert_s']:.1f} s, totals {st['preload']['totals_s']:.1f} s, vacuum "
        f"{st['preload']['vacuum_s']:.1f} s); verify of {st['verified']} customers: "
        f"{len(st['verify'])} differences"
        for st in stages
    ]
    lines += [
        "",
        "ratio: median over the repeats of calls/s with them ÷ with none, run back to back.",
        "Preload: " + "; ".join(times),
    ]
    return "\n".join(lines)


def goals(
    table: Sequence[dict[str, Any]],
    drains: dict[str, list[float]] | None,
    soaked: Sequence[dict[str, Any]] | None,
    stages: Sequence[dict[str, Any]] | None,
) -> list[tuple[str, str, str, str]]:
    """Issue 16's goals: (goal, measured, target, MET / MISSED / NOT RUN)."""
    by = {r["scenario"]: r for r in table if r["mode"] == "closed"}
    noop = by.get("noop")
    out: list[tuple[str, str, str, str]] = []

    def verdict(ok: bool) -> str:
        return "MET" if ok else "MISSED"

    for s, name, need in (
        ("consume_hot", "consume, one hot customer and feature", 0.6),
        ("consume", "consume, many customers", CONSUME_MANY_BEFORE),
        ("check", "CheckEntitlement", 0.9),
        ("record", "RecordUsage", 0.8),
    ):
        target = f">= {need:.2f}x no-op" + (" (main before)" if s == "consume" else "")
        r = by.get(s)
        if r is None or noop is None:
            out.append((name, "-", target, "NOT RUN"))
            continue
        x = r["calls_per_s"] / noop["calls_per_s"]
        out.append((name, f"{x:.2f}x ({r['calls_per_s']:,.0f}/s)", target, verdict(x >= need)))
    if drains is None:
        out.append(("drain, Polar", "-", ">= 20,000 events/s", "NOT RUN"))
        out.append(("drain, Stripe (fake)", "-", "shown", "NOT RUN"))
    else:
        polar = drains.get("polar")
        if polar:
            m = statistics.median(polar)
            out.append(
                ("drain, Polar", f"{m:,.0f} events/s", ">= 20,000 events/s", verdict(m >= 20_000))
            )
        else:
            out.append(
                ("drain, Polar", "not in bench/drain.py's output", ">= 20,000 events/s", "MISSED")
            )
        stripes = [drains[k] for k in ("stripe-stream", "stripe", "stripe-v1") if k in drains]
        if stripes:
            text = "; ".join(
                f"{k.replace('stripe-', '').replace('stripe', 'one drain')} "
                f"{statistics.median(v):,.0f} events/s"
                for k, v in drains.items()
                if k.startswith("stripe")
            )
            out.append(("drain, Stripe (fake)", text, "shown", "MET"))
        else:
            out.append(
                ("drain, Stripe (fake)", "not in bench/drain.py's output", "shown", "MISSED")
            )
    if not soaked:
        out.append(
            ("memory flat over the soak", "-", f"RSS growth < {MEMORY_GROWTH:.0f}%", "NOT RUN")
        )
    else:
        worst = max(soaked, key=lambda r: r["growth_pct"])
        text = f"{worst['growth_pct']:+.1f}% ({worst['path']}, {worst['seconds']:g} s each path)"
        short = [r["path"] for r in soaked if r["calls_per_s"] < SOAK_HELD * r["rate"]]
        if short:  # a backlog holds memory too: the figure is not only the service's own
            text += f"; rate not held by {', '.join(short)}"
        out.append(
            (
                "memory flat over the soak",
                text,
                f"RSS growth < {MEMORY_GROWTH:.0f}%",
                verdict(worst["growth_pct"] < MEMORY_GROWTH),
            )
        )
    flat = flatness(stages) if stages else {}
    if not flat:
        out.append(("cost flat as data grows", "-", f">= {FLAT}x of none stored", "NOT RUN"))
    else:
        (size, path), x = min(flat.items(), key=lambda kv: kv[1])
        text = f"worst {x:.2f}x ({path}, {size:,} preloaded)"
        out.append(
            ("cost flat as data grows", text, f">= {FLAT}x of none stored", verdict(x >= FLAT))
        )
    return out


def fmt_goals(found: Sequence[tuple[str, str, str, str]], repeats: int) -> str:
    lines = [
        f"| goal | measured (median of {repeats}) | target | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {g} | {m} | {t} | {v} |" for g, m, t, v in found]
    return "\n".join(lines)


def sizes(text: str) -> list[int]:
    out = sorted(int(float(x)) for x in text.split(",") if x)
    if any(n <= 0 for n in out):
        raise argparse.ArgumentTypeError("sizes must be positive")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    p.add_argument("--scenarios", default=SCENARIOS, help="comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--repeats", type=int, default=3, help="runs per scenario (medians shown)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--batch-concurrency", type=int, default=8)
    p.add_argument("--open-fraction", type=float, default=0.5, help="open-loop rate ÷ no-op max")
    p.add_argument("--procs", type=int, default=2, help="load generator processes")
    p.add_argument("--customers", type=int, default=CUSTOMERS, help="bench-0 .. bench-(N-1)")
    p.add_argument("--workers", type=int, default=1, help="service processes (serve --workers)")
    p.add_argument("--no-open", action="store_true", help="skip the open-loop runs")
    p.add_argument("--no-raw", action="store_true", help="skip the raw asyncpg baseline")
    p.add_argument("--no-drain", action="store_true", help="skip the drain (bench/drain.py)")
    p.add_argument("--drain-events", type=int, default=DRAIN_EVENTS, help="events per drain run")
    p.add_argument(
        "--drain-args",
        default="",
        help="bench/drain.py's arguments besides --database-url and --events\n"
        "(default: Polar, and the Stripe stream and JSON when it has them)",
    )
    p.add_argument(
        "--soak",
        type=float,
        default=0.0,
        help="seconds of open-loop load per path (record, check, consume) at 80%% of its\n"
        "closed-loop maximum, the service's RSS sampled (issue 16: 600); 0: no soak",
    )
    p.add_argument(
        "--preload",
        type=sizes,
        default=[],
        help="events stored before measuring the hot paths again, e.g. 1000000,10000000\n"
        "(a database of their own, against the same with none stored); default: none",
    )
    p.add_argument("--preload-scenarios", default=GROWTH_SCENARIOS, help="measured per size")
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
    soaked: list[dict[str, Any]] | None = None
    with scratch_database(args.database_url) as dsn:
        service = Service(dsn, args.workers, {"USAGE_PLANS_FILE": args.plans})
        try:
            print(f"service on {service.address} ({dsn.rsplit('/', 1)[-1]})", file=sys.stderr)
            add_customers(service.address, args.customers)
            rss_start = service.rss_mib()
            table = list(rows(args, service))
            rss_end = service.rss_mib()
            if args.soak > 0:
                maxima = {r["scenario"]: r["calls_per_s"] for r in table if r["mode"] == "closed"}
                soaked = soak(service, args, maxima)
            raw = None if args.no_raw else asyncio.run(raw_insert(dsn, args.duration))
        finally:
            service.stop()
    drains = None if args.no_drain else drain(args)
    stages = data_growth(args) if args.preload else None
    print(
        f"\nusage-service bench: {os.cpu_count()} cores, workers={args.workers}, "
        f"loadgen procs={args.procs}, {args.duration:g} s x {args.repeats} repeats (medians)\n"
    )
    print(fmt_table(table, raw))
    print(f"\nservice RSS: {rss_start:.0f} MiB after setup, {rss_end:.0f} MiB after the runs")
    if drains:
        print(
            "\ndrain (bench/drain.py, "
            f"{args.drain_events:,} events): "
            + ", ".join(
                f"{k} {statistics.median(v):,.0f} events/s (runs: "
                + ", ".join(f"{x:,.0f}" for x in v)
                + ")"
                for k, v in drains.items()
            )
        )
    if soaked:
        print(
            f"\nMemory soak ({args.soak:g} s per path, RSS every {SOAK_SAMPLE:g} s; baseline: "
            f"the median RSS of the {min(SOAK_WINDOW, args.soak / 10):g} s after the first "
            f"{min(SOAK_WARMUP, args.soak / 5):g} s (warm-up), end: the median of the last "
            f"{min(SOAK_WINDOW, args.soak / 10):g} s):\n"
        )
        print(fmt_soak(soaked))
    if stages:
        print("\nCost as data grows (closed loop, medians):\n")
        print(fmt_growth(stages))
    found = goals(table, drains, soaked, stages)
    print("\nGoals (issue 16; ratios to the no-op in the same run):\n")
    print(fmt_goals(found, args.repeats))
    print("\n".join(["", "Earlier goals:", *earlier_goals(table, raw)]))
    if args.json:
        pathlib.Path(args.json).write_text(
            json.dumps(
                {
                    "rows": table,
                    "raw": raw,
                    "drain": drains,
                    "soak": soaked,
                    "growth": stages,
                    "goals": found,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
