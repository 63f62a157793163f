"""The `usage-service` command's conventions: --version, `python -m usage_service`, help that
names the environment variables, and progress of long operator commands on stderr."""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.metadata
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import Service
from fakes.world import Fakes
from helpers import RECOUNT_DRAIN_COUNTERS, record
from process import PLANS_FILE, executable

from usage.v1 import customer_pb2
from usage_service import cli
from usage_service.commands import ops
from usage_service.settings import environment

COMMANDS = (
    "serve",
    "migrate",
    "check-plans",
    "drain",
    "requeue",
    "status",
    "reconcile",
    "health",
    "prune",
    "verify",
)


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        env={**os.environ, "USAGE_PLANS_FILE": str(PLANS_FILE), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.process
def test_version_comes_from_the_package_metadata() -> None:
    done = _run(*executable(), "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"usage-service {importlib.metadata.version('usage-service')}\n"


@pytest.mark.process
def test_python_dash_m_runs_the_command_and_its_help_reads_well() -> None:
    done = _run(sys.executable, "-m", "usage_service", "--help")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith("usage: usage-service ")
    for command in COMMANDS:  # each with its one-line description
        assert re.search(rf"^    {command}\s+\S", text, re.MULTILINE), command
    assert "README's Configuration section" in text
    named = set(
        re.findall(r"\b((?:USAGE|DATABASE|STRIPE|LEMONSQUEEZY|POLAR|DODO|CREEM)_\w+)", text)
    )
    assert {"DATABASE_URL", "USAGE_GRPC_ADDRESS", "USAGE_PLANS_FILE", "STRIPE_API_KEY"} <= named
    assert named <= set(environment.names())  # every variable it names is one the settings read


@pytest.mark.parametrize(
    ("command", "variables"),
    [
        ("serve", ["DATABASE_URL", "USAGE_METRICS_ADDRESS", "USAGE_RECONCILE_INTERVAL_SECONDS"]),
        ("migrate", ["DATABASE_URL"]),
        ("check-plans", ["USAGE_PLANS_FILE"]),
        ("health", ["USAGE_GRPC_ADDRESS", "USAGE_HEALTH_CA_FILE", "USAGE_HEALTH_SERVER_NAME"]),
        ("reconcile", ["USAGE_RECONCILE_SETTLE_SECONDS"]),
    ],
)
def test_command_help_names_the_environment_variables(
    command: str, variables: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for variable in variables:
        assert variable in text
        assert variable in environment.names()


def test_progress_lines_come_at_most_every_two_seconds_and_at_the_end(
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = [0.0]
    progress = ops.Progress("prune", "customers", clock=lambda: now[0])
    for done, at in enumerate([0.5, 1.9, 2.1, 2.2, 3.0, 4.5, 4.6], 1):
        now[0] = at  # printed: 2.1 s after the start, 2.4 s after that, and at the end
        progress(done, 7)
    assert capsys.readouterr().err.splitlines() == [
        "prune: 3/7 customers",
        "prune: 6/7 customers",
        "prune: 7/7 customers",
    ]


@pytest.mark.process
async def test_prune_prints_progress_on_stderr(service: Service, dsn: str) -> None:
    now = dt.datetime.now(dt.UTC)
    for customer_id in ("cus_a", "cus_b"):
        await service.add_customer(customer_id, start=now - dt.timedelta(days=1))
        await service.usage.RecordUsage(
            record(customer_id, key="old", when=now - dt.timedelta(days=60))
        )
    await service.db.execute(
        "UPDATE usage_events SET report_state = 'reported', recorded_at = $1",
        now - dt.timedelta(days=40),
    )
    await service.db.execute(RECOUNT_DRAIN_COUNTERS)
    done = await asyncio.to_thread(
        _run, *executable(), "prune", "--older-than", "30", env={"DATABASE_URL": dsn}
    )
    assert done.returncode == 0, done.stderr
    assert "pruned 2 reported events" in done.stdout
    assert done.stderr.splitlines() == ["prune: 2/2 customers"]


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    started = Fakes.start()
    yield started
    started.stop()


@pytest.mark.process
async def test_drain_once_prints_progress_on_stderr(
    service: Service, dsn: str, fakes: Fakes
) -> None:
    await service.add_customer(
        "c_stripe", provider=customer_pb2.PROVIDER_STRIPE, provider_customer_id="cus_s"
    )
    await service.usage.RecordUsage(record("c_stripe", key="a"))
    done = await asyncio.to_thread(
        _run, *executable(), "drain", "--once", env={**fakes.env(), "DATABASE_URL": dsn}
    )
    assert done.returncode == 0, done.stderr
    assert "drain: 1 reports handled" in done.stdout
    assert done.stderr.splitlines() == ["drain: 1 reports handled"]
