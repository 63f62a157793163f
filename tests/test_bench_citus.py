"""bench/citus.py runs end to end on the Citus cluster and the plain PostgreSQL (tiny durations;
the figures are not checked). Only with USAGE_TEST_CITUS=1, where server_dsn is the coordinator."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
from conftest import CITUS, LOCAL_SERVER

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(not CITUS, reason="needs the Citus cluster (USAGE_TEST_CITUS=1)"),
]

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "citus.py"
SCENARIOS = ("record", "batch_8", "batch_one", "check")


def rows_of(text: str, heading: str) -> dict[str, list[str]]:
    """The Markdown table whose header row starts with `heading`: first cell -> the others."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(heading))
    assert lines[at + 1].startswith("|---"), lines[at + 1]
    out = {}
    for line in lines[at + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        out[cells[0]] = cells[1:]
    return out


def test_citus_bench_prints_a_ratio_per_scenario(server_dsn: str) -> None:
    out = subprocess.run(
        [
            *(sys.executable, str(BENCH), "--database-url", LOCAL_SERVER),
            *("--citus-url", server_dsn, "--scenarios", ",".join(SCENARIOS)),
            *("--duration", "1", "--warmup", "0.5", "--repeats", "1", "--customers", "40"),
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    table = rows_of(out.stdout, "| scenario | load | PG events/s | Citus events/s | Citus ÷ PG |")
    assert tuple(table) == SCENARIOS, out.stdout
    for scenario, cells in table.items():
        pg, citus, ratio = cells[1:4]
        assert re.fullmatch(r"[\d,]+", pg) and re.fullmatch(r"[\d,]+", citus), (scenario, cells)
        assert re.fullmatch(r"\d+\.\d\dx", ratio), (scenario, cells)
        assert int(pg.replace(",", "")) > 0 and int(citus.replace(",", "")) > 0, (scenario, cells)
        assert cells[-1] == "", (scenario, cells)  # no errors
    cpu = rows_of(out.stdout, "| scenario | PG: service |")
    assert tuple(cpu) == SCENARIOS, out.stdout
    assert "Citus: worker :" in out.stdout  # a column per worker
    batches = rows_of(out.stdout, "| 500 events over |")
    assert list(batches) == ["1 customer (one worker)", "8 customers (both workers: 2PC)"]
    assert "Citus: " in out.stderr and "tables distributed by customer_id" in out.stderr
