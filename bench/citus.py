"""The hot paths on a Citus cluster against one plain PostgreSQL, in the same run.

Starts `usage-service serve` twice: on a scratch database of the plain PostgreSQL server
(`--database-url`) and on a scratch distributed database of the Citus cluster whose coordinator
is `--citus-url` (made on every node by tests/citus.py; `serve` migrates and distributes it by
customer_id at start-up). Each scenario then runs closed loop through bench/loadgen.py on one
and at once on the other, the order swapped every repeat, with bench/run.py's concurrency and
customers; the table shows the medians and the median of the pairs' Citus ÷ PG ratios.

While each run lasts, the CPU of every database backend serving the bench database is read from
/proc on each node (the plain server; the coordinator and each worker), so the figures say where
an event's CPU goes.

`batch` spreads each BatchRecordUsage of 500 events over 500 customers, as bench/run.py does;
`batch_8` over 8 consecutive customers (on Citus all on one worker once in 128 batches: nearly
every batch writes on both workers and commits with two-phase commit); `batch_one` puts every
event of a batch on one customer (one shard, one worker, no two-phase commit). Each runs at
bench/run.py's 8 batches in flight; a call that takes longer than loadgen's 30 s deadline fails
the run, which is shown as such.

Two settings of the bench databases differ from their servers' defaults, each printed: the
Citus database shows shards in catalog queries (see scratch_citus; `--hide-shards` keeps the
default), and the plain PG database takes the cluster's synchronous_commit (a test cluster runs
with it off; `--keep-commit-settings` leaves it).

    .venv/bin/python bench/citus.py --database-url postgresql://postgres@127.0.0.1:5432/test \\
        --citus-url postgresql://postgres@127.0.0.1:9700/postgres --duration 5 --warmup 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import asyncpg
import run

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCENARIOS = "record,batch,batch_8,batch_one,check,consume"
BATCHES = {"batch": 0, "batch_8": 8, "batch_one": 1}  # customers a batch is spread over (0: 500)
COMMIT_SETTINGS = ("synchronous_commit", "fsync")
SHOW_SHARDS = 'ALTER DATABASE "{name}" SET citus.override_table_visibility TO off'


def _cluster_module() -> ModuleType:
    """tests/citus.py (which makes a database on every node of the cluster), loaded from its
    file: this module is `citus` too, first on the path when run as a script."""
    spec = importlib.util.spec_from_file_location("citus_cluster", ROOT / "tests" / "citus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cluster = _cluster_module()


async def execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def on_node(dsn: str, host: str, port: int) -> str:
    """The same database and user on another node."""
    parts = urllib.parse.urlsplit(dsn)
    netloc = f"{parts.username or 'postgres'}@{host}:{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@contextlib.contextmanager
def scratch_citus(coordinator: str, hide_shards: bool = False) -> Iterator[str]:
    """A new database on every node of the cluster (its DSN on the coordinator), dropped
    afterwards. Unless `hide_shards`, sessions on it see shards in pg_class: Citus's default
    hides them by filtering every catalog query through relation_is_a_known_shard(), which
    makes asyncpg's type introspection (once per connection and set of types) take about 1 s
    on an idle coordinator and ~10 s with the pool's connections doing it at once."""
    name = f"usage_bench_{uuid.uuid4().hex[:10]}"
    try:
        dsn = asyncio.run(cluster.create_database(coordinator, name))
        if not hide_shards:
            asyncio.run(execute(dsn, SHOW_SHARDS.format(name=name)))
        yield dsn
    finally:
        asyncio.run(cluster.drop_database(coordinator, name))


async def _citus_nodes(dsn: str) -> list[tuple[str, str]]:
    """(label, DSN of the same database on that node) for the coordinator, then each worker;
    checks that the schema was distributed."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT nodename, nodeport, groupid FROM pg_dist_node ORDER BY groupid"
        )
        tables = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE partmethod = 'h') AS hashed,"
            " count(*) FILTER (WHERE partmethod = 'n') AS reference FROM pg_dist_partition"
        )
    finally:
        await conn.close()
    if not tables or not tables["hashed"]:
        raise RuntimeError(f"{dsn}: no distributed table after migrate")
    print(
        f"  Citus: {tables['hashed']} tables distributed by customer_id, "
        f"{tables['reference']} reference tables",
        file=sys.stderr,
    )
    out = []
    for r in rows:
        label = "coordinator" if r["groupid"] == 0 else f"worker :{r['nodeport']}"
        out.append((label, on_node(dsn, r["nodename"], r["nodeport"])))
    return out


async def _settings(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {k: str(await conn.fetchval(f"SHOW {k}")) for k in COMMIT_SETTINGS}
    finally:
        await conn.close()


async def match_commits(pg_dsn: str, citus_dsn: str, keep: bool) -> dict[str, dict[str, str]]:
    """Unless `keep`, gives the plain PG's bench database the cluster's synchronous_commit (a
    test cluster often runs with it off, and with fsync off, which a database cannot change);
    returns both sides' commit settings as the services will see them."""
    citus = await _settings(citus_dsn)
    if not keep:
        name = pg_dsn.rsplit("/", 1)[-1]
        value = citus["synchronous_commit"]
        await execute(pg_dsn, f'ALTER DATABASE "{name}" SET synchronous_commit TO {value}')
    return {"PG": await _settings(pg_dsn), "Citus": citus}


async def _backend_cpu(dsn: str) -> dict[int, float]:
    """CPU seconds so far of each backend connected to this database on this node (but the one
    asking), by pid."""
    conn = await asyncpg.connect(dsn)
    try:
        pids = await conn.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return {r["pid"]: run.cpu_seconds([r["pid"]]) for r in pids}


@dataclasses.dataclass
class Side:
    """One database under test: its service and the nodes whose backends serve it."""

    name: str
    service: run.Service
    nodes: list[tuple[str, str]]

    def snapshot(self) -> list[dict[int, float]]:
        async def all_nodes() -> list[dict[int, float]]:
            return [await _backend_cpu(dsn) for _, dsn in self.nodes]

        return asyncio.run(all_nodes())


def measure(side: Side, scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    """One closed-loop run; adds each node's backend CPU per call (µs, warm-up included as
    run.measured does for the service) and how many backends ended meanwhile (their last CPU
    is not counted)."""
    conc = args.batch_concurrency if scenario in BATCHES else args.concurrency
    opts: dict[str, Any] = {"mode": "closed", "concurrency": conc}
    if scenario in BATCHES:
        opts["batch-customers"] = BATCHES[scenario]
    before = side.snapshot()
    try:
        res = run.measured(side.service, side.service.address, scenario.split("_")[0], args, **opts)
    except subprocess.CalledProcessError as exc:
        return failed(side, scenario, conc, exc.stderr)
    after = side.snapshot()
    calls = res["calls"] * (args.duration + args.warmup) / args.duration
    res["node_cpu_us_per_call"] = {}
    res["backends_ended"] = 0
    for (label, _), b, a in zip(side.nodes, before, after, strict=True):
        cpu = sum(t - b.get(pid, 0.0) for pid, t in a.items())
        res["node_cpu_us_per_call"][label] = cpu / calls * 1e6 if calls else float("nan")
        res["backends_ended"] += len(set(b) - set(a))
    res["concurrency"] = conc
    res["side"] = side.name
    return res


def div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def failed(side: Side, scenario: str, conc: int, stderr: str) -> dict[str, Any]:
    """A run whose load generator failed (a call past its deadline ends it)."""
    lines = stderr.strip().splitlines()
    reason = next((x.strip() for x in lines if "details = " in x), lines[-1] if lines else "")
    nan = float("nan")
    return {
        "scenario": scenario,
        "calls": 0,
        "events": 0,
        **{k: nan for k in ("calls_per_s", "events_per_s", "p50", "p99", "p999")},
        "cpu_us_per_call": nan,
        "errors": {f"loadgen failed: {reason}": 1},
        "node_cpu_us_per_call": {label: nan for label, _ in side.nodes},
        "backends_ended": 0,
        "concurrency": conc,
        "side": side.name,
    }


def rate(r: dict[str, Any]) -> float:
    """Events/s, or calls/s for a scenario that records nothing (check)."""
    return float(r["calls_per_s"] if r["events"] == 0 and r["calls"] else r["events_per_s"])


def per_unit(r: dict[str, Any], us_per_call: float) -> float:
    """µs per event (per call when the scenario records nothing)."""
    events = r["events"] / r["calls"] if r["calls"] else 0
    return us_per_call / events if events else us_per_call


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats of one scenario on one side."""
    out = run.median_of(sorted(runs, key=rate))
    out["rate"] = statistics.median(rate(r) for r in runs)
    out["node_cpu_us_per_call"] = {
        label: statistics.median(r["node_cpu_us_per_call"][label] for r in runs)
        for label in runs[0]["node_cpu_us_per_call"]
    }
    out["backends_ended"] = sum(r["backends_ended"] for r in runs)
    errors: dict[str, int] = {}
    for r in runs:
        for k, n in r["errors"].items():
            errors[k] = errors.get(k, 0) + n
    out["errors"] = errors
    return out


def compare(args: argparse.Namespace, pg: Side, citus: Side) -> list[dict[str, Any]]:
    """Every scenario on both sides, `repeats` times, PG first on odd repeats and Citus first
    on even ones; one row per scenario."""
    runs: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {s: [] for s in args.scenarios}
    for r in range(args.repeats):
        order = (pg, citus) if r % 2 == 0 else (citus, pg)
        for s in args.scenarios:
            got = {side.name: measure(side, s, args) for side in order}
            a, b = got[pg.name], got[citus.name]
            print(
                f"  repeat {r + 1} {s}: PG {rate(a):,.0f}/s, Citus {rate(b):,.0f}/s "
                f"({'PG' if order[0] is pg else 'Citus'} first)",
                file=sys.stderr,
            )
            runs[s].append((a, b))
    return [
        {
            "scenario": s,
            "pg": summarise([a for a, _ in v]),
            "citus": summarise([b for _, b in v]),
            "ratio": statistics.median(div(rate(b), rate(a)) for a, b in v),
            "repeats": [{"pg": a, "citus": b} for a, b in v],
        }
        for s, v in runs.items()
    ]


def fmt_errors(row: dict[str, Any]) -> str:
    parts = [f"{side} {e}" for side in ("pg", "citus") if (e := row[side]["errors"])]
    return "; ".join(parts)


def fmt_table(table: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| scenario | load | PG events/s | Citus events/s | Citus ÷ PG "
        "| p50 ms PG / Citus | p99 ms PG / Citus | errors |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in table:
        pg, ci = row["pg"], row["citus"]
        lines.append(
            f"| {row['scenario']} | {pg['concurrency']} in flight | {pg['rate']:,.0f} "
            f"| {ci['rate']:,.0f} | {row['ratio']:.2f}x "
            f"| {pg['p50'] * 1e3:.2f} / {ci['p50'] * 1e3:.2f} "
            f"| {pg['p99'] * 1e3:.2f} / {ci['p99'] * 1e3:.2f} | {fmt_errors(row)} |"
        )
    return "\n".join(lines)


def fmt_cpu(table: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """CPU per event (per check for check) by process, µs."""
    lines = [
        "| scenario | PG: service | PG: postgres | Citus: service | "
        + " | ".join(f"Citus: {lb}" for lb in labels)
        + " | Citus: all nodes |",
        "|---|" + "---:|" * (4 + len(labels)),
    ]
    for row in table:
        pg, ci = row["pg"], row["citus"]
        nodes = [per_unit(ci, ci["node_cpu_us_per_call"][lb]) for lb in labels]
        pg_db = sum(pg["node_cpu_us_per_call"].values())
        lines.append(
            f"| {row['scenario']} | {per_unit(pg, pg['cpu_us_per_call']):,.0f} "
            f"| {per_unit(pg, pg_db):,.0f} | {per_unit(ci, ci['cpu_us_per_call']):,.0f} | "
            + " | ".join(f"{n:,.0f}" for n in nodes)
            + f" | {sum(nodes):,.0f} |"
        )
    return "\n".join(lines)


def fmt_two_phase(table: Sequence[dict[str, Any]]) -> str:
    """Batches of the same size over 500, 8 and 1 customers, each side against its own batch
    of one customer: what writing more customers (and on Citus, both workers) costs."""
    by = {row["scenario"]: row for row in table}
    one = by["batch_one"]
    lines = [
        f"| {run.BATCH} events over | PG events/s | Citus events/s | Citus ÷ PG "
        "| PG ÷ its 1-customer batch | Citus ÷ its 1-customer batch "
        "| p50 ms per batch, PG / Citus |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, what in (
        ("batch_one", "1 customer (one worker)"),
        ("batch_8", "8 customers (both workers: 2PC)"),
        ("batch", f"{run.BATCH} customers (both workers: 2PC)"),
    ):
        if name not in by:
            continue
        row = by[name]
        pg, ci = row["pg"], row["citus"]
        lines.append(
            f"| {what} | {pg['rate']:,.0f} | {ci['rate']:,.0f} | {row['ratio']:.2f}x "
            f"| {div(pg['rate'], one['pg']['rate']):.2f}x "
            f"| {div(ci['rate'], one['citus']['rate']):.2f}x "
            f"| {pg['p50'] * 1e3:.1f} / {ci['p50'] * 1e3:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""), help="plain PG")
    p.add_argument("--citus-url", default="", help="the Citus coordinator's postgres database")
    p.add_argument("--scenarios", default=SCENARIOS, help="comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--repeats", type=int, default=3, help="runs per scenario and side (medians)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--batch-concurrency", type=int, default=8)
    p.add_argument("--procs", type=int, default=2, help="load generator processes")
    p.add_argument("--customers", type=int, default=run.CUSTOMERS, help="bench-0 .. bench-(N-1)")
    p.add_argument(
        "--hide-shards",
        action="store_true",
        help="keep Citus's default citus.override_table_visibility = on for the bench database\n"
        "(slow catalog queries: each new connection's asyncpg type introspection)",
    )
    p.add_argument(
        "--keep-commit-settings",
        action="store_true",
        help="leave the plain PG's synchronous_commit as configured (default: the cluster's)",
    )
    p.add_argument("--json", default="", help="also write the rows to this file")
    args = p.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    if not args.database_url or not args.citus_url:
        p.error("--database-url (or DATABASE_URL) and --citus-url are required")
    load_before = os.getloadavg()
    env = {"USAGE_PLANS_FILE": str(run.PLANS)}
    with (
        run.scratch_database(args.database_url) as pg_dsn,
        scratch_citus(args.citus_url, args.hide_shards) as citus_dsn,
    ):
        commits = asyncio.run(match_commits(pg_dsn, citus_dsn, args.keep_commit_settings))
        pg_service = run.Service(pg_dsn, 1, dict(env))
        try:
            citus_service = run.Service(citus_dsn, 1, dict(env))
            try:
                pg = Side("PG", pg_service, [("postgres", pg_dsn)])
                citus = Side("Citus", citus_service, asyncio.run(_citus_nodes(citus_dsn)))
                for side in (pg, citus):
                    run.add_customers(side.service.address, args.customers)
                table = compare(args, pg, citus)
            finally:
                citus_service.stop()
        finally:
            pg_service.stop()
    load_after = os.getloadavg()
    labels = [label for label, _ in citus.nodes]
    print(
        f"\nusage-service on Citus ({len(labels)} nodes) against plain PostgreSQL: "
        f"{os.cpu_count()} cores, loadgen procs={args.procs}, {args.customers} customers, "
        f"{args.duration:g} s x {args.repeats} repeats, order swapped each repeat, "
        f"citus.override_table_visibility {'on' if args.hide_shards else 'off'}\n"
    )
    print(
        "commits: "
        + "; ".join(
            f"{side} " + ", ".join(f"{k} {v}" for k, v in got.items())
            for side, got in commits.items()
        )
        + "\n"
    )
    print(fmt_table(table))
    print(
        "\nevents/s: medians; check records nothing, its figure is checks/s. "
        "Citus ÷ PG: the median of the repeats' ratios."
    )
    print("\nCPU per event (per check for check), µs, medians (database backends of the bench")
    print("database only; warm-up included):\n")
    print(fmt_cpu(table, labels))
    if "batch_one" in args.scenarios and len(set(BATCHES) & set(args.scenarios)) > 1:
        print(f"\nTwo-phase commit: BatchRecordUsage of {run.BATCH} events, 8 in flight\n")
        print(fmt_two_phase(table))
    ended = sum(row[side]["backends_ended"] for row in table for side in ("pg", "citus"))
    print(
        "\nload average (1, 5, 15 min): "
        f"{' '.join(f'{x:.2f}' for x in load_before)} before, "
        f"{' '.join(f'{x:.2f}' for x in load_after)} after"
        + (f"; {ended} backends ended during runs (their last CPU is missing)" if ended else "")
    )
    if args.json:
        pathlib.Path(args.json).write_text(
            json.dumps(
                {
                    "rows": table,
                    "nodes": labels,
                    "commits": commits,
                    "load": [load_before, load_after],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
