"""The benchmark command runs end to end (tiny durations; the figures are not checked)."""

from __future__ import annotations

import datetime as dt
import pathlib
import re
import subprocess
import sys

import pytest
from conftest import Service

from usage.v1 import customer_pb2, usage_pb2
from usage_service import domain

pytestmark = pytest.mark.process

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "run.py"
sys.path.insert(0, str(BENCH.parent))

import preload  # noqa: E402
import run  # noqa: E402

GOALS = (
    "consume, one hot customer and feature",
    "consume, many customers",
    "CheckEntitlement",
    "RecordUsage",
    "drain, Polar",
    "drain, Stripe (fake)",
    "memory flat over the soak",
    "cost flat as data grows",
)


def bench(server_dsn: str, *flags: str) -> str:
    out = subprocess.run(
        [
            *(sys.executable, str(BENCH), "--database-url", server_dsn),
            *("--duration", "0.5", "--warmup", "0.2", "--repeats", "1", "--procs", "1"),
            *("--customers", "40"),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def table_after(text: str, heading: str) -> list[list[str]]:
    """The cells of the Markdown table that follows the line starting with `heading`."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[at + 1 :]:
        if not line.startswith("|") and rows:
            break
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def goals(text: str) -> dict[str, tuple[str, str, str]]:
    """The Goals table: goal -> (measured, target, verdict)."""
    head, rule, *rows = table_after(text, "Goals (issue 16")
    assert head == ["goal", "measured (median of 1)", "target", "verdict"], head
    assert rule == ["---"] * 4
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_bench_prints_the_table(server_dsn: str) -> None:
    out = bench(
        server_dsn,
        *("--scenarios", "noop,record,batch,check,consume,consume_hot,summary"),
        *("--batch-concurrency", "1", "--no-drain"),
    )
    lines = out.splitlines()
    for scenario in ("noop", "record", "batch", "check", "consume", "consume_hot", "summary"):
        rows = [line for line in lines if line.startswith(f"| {scenario} |")]
        assert len(rows) == 2, (scenario, out)  # closed loop and open loop
    assert any(line.startswith("| raw asyncpg unnest") for line in lines)
    found = goals(out)
    assert tuple(found) == GOALS
    for goal in GOALS[:4]:
        measured, target, verdict = found[goal]
        assert re.fullmatch(r"\d+\.\d\dx \([\d,]+/s\)", measured), found[goal]
        assert target.startswith(">= ") and verdict in ("MET", "MISSED"), found[goal]
    for goal in GOALS[4:]:  # no drain, soak or preload asked for
        assert found[goal][2] == "NOT RUN", found[goal]
    assert "Earlier goals:" in out


def test_bench_soaks_and_preloads(server_dsn: str) -> None:
    out = bench(
        server_dsn,
        *("--scenarios", "noop,record,check,consume,consume_hot", "--no-open", "--no-raw"),
        *("--soak", "1.5", "--preload", "3000", "--preload-scenarios", "summary"),
        "--no-drain",  # bench/drain.py has its own test; reading its output: the next test
    )
    found = goals(out)
    assert tuple(found) == GOALS
    for goal, (measured, _, verdict) in found.items():
        if goal.startswith("drain"):
            assert verdict == "NOT RUN"
            continue
        assert verdict in ("MET", "MISSED"), (goal, found[goal])
        assert measured[0].isdigit() or measured.startswith(("+", "-", "worst")), measured
    soak = table_after(out, "Memory soak")
    assert [r[0] for r in soak[2:]] == ["record", "check", "consume"]
    assert all(r[8].endswith("%") for r in soak[2:]), soak
    growth = table_after(out, "Cost as data grows")
    assert len(growth[0]) == 7 and [r[:2] for r in growth[2:]] == [["summary", "3,000"]], growth
    assert re.fullmatch(r"\d+\.\d\dx", growth[2][4]), growth
    assert "verify of 20 customers: 0 differences" in out


@pytest.mark.parametrize(
    ("output", "rates"),
    [
        (
            "drain: 2,000/2,000 events reported in 0.21 s = 9,099 events/s (fake Polar ...)",
            {"polar": 9099.0},
        ),
        (
            "drain: ... = 21,000 events/s (fake Polar)\n"
            "drain, Stripe v2 stream: 30,500.5 events/s (fake Stripe)\n"
            "drain, Stripe v1: 900 events/s (fake Stripe)",
            {"polar": 21000.0, "stripe-stream": 30500.5, "stripe-v1": 900.0},
        ),
        (
            'text first\n{"provider": "polar", "events_per_s": 20100.0, "events": 20000}',
            {"polar": 20100.0},
        ),
        (
            '{"polar": {"events_per_s": 1.5}, "stripe_v2": {"events_per_s": 2.5}}',
            {"polar": 1.5, "stripe-stream": 2.5},
        ),
        (
            '[{"scenario": "Stripe", "events_per_s": 7}, {"name": "polar", "events_per_s": 8}]',
            {"stripe": 7.0, "polar": 8.0},
        ),
        ("no figure here", {}),
    ],
)
def test_the_drain_figures_are_read_from_its_text_or_json(
    output: str, rates: dict[str, float]
) -> None:
    assert run.drain_rates(output) == rates


def test_the_goals_show_each_drain_against_its_target() -> None:
    found = {
        g: (m, t, v)
        for g, m, t, v in run.goals(
            [], {"polar": [19_000.0, 21_000.0, 22_000.0], "stripe-stream": [5.0]}, None, None
        )
    }
    assert tuple(found) == GOALS
    assert found["drain, Polar"] == ("21,000 events/s", ">= 20,000 events/s", "MET")
    assert found["drain, Stripe (fake)"] == ("stream 5 events/s", "shown", "MET")
    assert found["RecordUsage"][2] == "NOT RUN"
    found = {g: v for g, _, _, v in run.goals([], {"polar": [1.0]}, None, None)}
    assert found["drain, Polar"] == "MISSED" and found["drain, Stripe (fake)"] == "MISSED"


def test_drain_bench_reports_every_event(server_dsn: str) -> None:
    out = subprocess.run(
        [
            *(sys.executable, str(BENCH.with_name("drain.py"))),
            *("--database-url", server_dsn, "--events", "2000"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2,000/2,000 events reported" in out.stdout, out.stdout
    assert "0 protocol violations" in out.stdout, out.stdout


def test_watch_bench_delivers_every_change(server_dsn: str) -> None:
    out = subprocess.run(
        [
            *(sys.executable, str(BENCH.with_name("watch.py"))),
            *("--database-url", server_dsn, "--watchers", "20", "--rate", "40"),
            *("--duration", "2", "--warmup", "0.5", "--rest", "0.5", "--connections", "2"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "| watchers open (snapshot received) | 20 / 20 |" in out.stdout, out.stdout
    assert "| gaps (versions skipped) / repeats | 0 (0) / 0 |" in out.stdout, out.stdout
    assert "- [met] every watcher received every change" in out.stdout, out.stdout


async def test_preload_stores_what_recording_the_events_would(service: Service, dsn: str) -> None:
    now = dt.datetime.now(dt.UTC)
    await service.add_customer("bench-0")
    await service.add_customer("bench-1", provider=customer_pb2.PROVIDER_STRIPE)
    customers = ["bench-0", "bench-1"]
    took = await preload.preload(dsn, 3000, customers, now, chunk=1000)
    assert took["total_s"] >= took["insert_s"] > 0
    took = await preload.preload(dsn, 1000, customers, now, chunk=1000)  # numbering continues
    rows = await service.db.fetch('SELECT * FROM usage_events ORDER BY idempotency_key COLLATE "C"')
    assert len(rows) == 4000
    assert len({r["idempotency_key"] for r in rows}) == 4000
    times = sorted(r["event_time"] for r in rows)
    assert now - dt.timedelta(days=372) < times[0] < now - dt.timedelta(days=360)
    assert now - dt.timedelta(days=1) < times[-1] < now
    assert all(r["recorded_at"] == r["event_time"] for r in rows)  # recorded as they happened
    assert {r["report_state"] for r in rows if r["customer_id"] == "bench-0"} == {"unbilled"}
    assert {r["report_state"] for r in rows if r["customer_id"] == "bench-1"} == {"pending"}
    for r in rows[::397]:
        assert r["payload_hash"] == domain.payload_hash(
            r["meter"], r["quantity"], r["event_time"], {}
        ), r["idempotency_key"]
    # A client retrying one of those events is answered with the stored one.
    r = rows[5]
    request = usage_pb2.RecordUsageRequest(
        customer_id=r["customer_id"],
        meter=r["meter"],
        quantity=r["quantity"],
        idempotency_key=r["idempotency_key"],
    )
    request.event_time.FromDatetime(r["event_time"])
    answer = await service.usage.RecordUsage(request)
    assert answer.duplicate and answer.event_id == str(r["event_id"])
    # The totals agree with the events (the dsn fixture runs verify again at the end).
    assert await preload.verify(dsn, customers) == []
    summary = await service.usage.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(customer_id="bench-0", meter="tokens")
    )
    start = summary.period_start_time.ToDatetime(dt.UTC)
    used = sum(
        r["quantity"] for r in rows if r["customer_id"] == "bench-0" and r["event_time"] >= start
    )
    assert summary.meters[0].used == used
