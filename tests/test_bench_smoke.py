"""The benchmark command runs end to end (tiny durations; the figures are not checked)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.process

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "run.py"


def test_bench_prints_the_table(server_dsn: str) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--database-url",
            server_dsn,
            "--scenarios",
            "noop,record,batch,check,consume",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--repeats",
            "1",
            "--procs",
            "1",
            "--batch-concurrency",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for scenario in ("noop", "record", "batch", "check", "consume"):
        rows = [line for line in lines if line.startswith(f"| {scenario} |")]
        assert len(rows) == 2, (scenario, out.stdout)  # closed loop and open loop
    assert any(line.startswith("| raw asyncpg unnest") for line in lines)
    assert "Goals:" in out.stdout


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
