"""Adversarial tests of the `usage-service reconcile` command: hostile arguments, exit codes
(1 means drift, so nothing else may exit 1) and the JSON lines' shape."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import pytest
from conftest import PLANS_FILE, Service
from fakes.world import Fakes
from process import executable
from test_drain import MakeDrain, drain_until_quiet, fakes, make_drain
from test_reconcile import METERS, _sent_ids, setup

pytestmark = pytest.mark.process

__all__ = ["fakes", "make_drain"]  # fixtures

VERDICTS = {"match", "provider lower", "provider higher", "provider still settling", "cannot tell"}


def cli(fakes: Fakes, dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **fakes.env(),
        "DATABASE_URL": dsn,
        "USAGE_PLANS_FILE": str(PLANS_FILE),
        "USAGE_RECONCILE_SETTLE_SECONDS": "0.001",
    }
    return subprocess.run(
        [*executable(), "reconcile", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "period",
    ["0001-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59Z"],
)
async def test_a_period_at_the_ends_of_time_is_refused_without_a_traceback_or_exit_1(
    period: str, service: Service, fakes: Fakes, make_drain: MakeDrain, dsn: str
) -> None:
    await setup(service, fakes, ("polar",))
    await drain_until_quiet([await make_drain()], service.db)
    done = await asyncio.to_thread(cli, fakes, dsn, "--period", period)
    assert "Traceback" not in done.stderr, done.stderr[-1500:]
    assert done.returncode != 1, (done.returncode, done.stdout, done.stderr[-500:])


@pytest.mark.parametrize(
    "args",
    [
        ["--customer", "x'; DROP TABLE usage_events; --"],
        ["--customer", "\u202ec_polar"],
        ["--provider", "paypal"],
        ["--period", "yesterday"],
        ["--period", ""],
    ],
)
async def test_hostile_arguments_change_nothing_and_do_not_exit_1(
    args: list[str], service: Service, fakes: Fakes, make_drain: MakeDrain, dsn: str
) -> None:
    await setup(service, fakes, ("polar",))
    await drain_until_quiet([await make_drain()], service.db)
    before = await service.db.fetchval("SELECT count(*) FROM usage_events")
    done = await asyncio.to_thread(cli, fakes, dsn, *args)
    assert "Traceback" not in done.stderr, done.stderr[-1500:]
    assert done.returncode in (0, 2), (done.returncode, done.stderr[-500:])
    assert await service.db.fetchval("SELECT count(*) FROM usage_events") == before


async def test_json_lines_have_one_shape_and_fix_exits_1(
    service: Service, fakes: Fakes, make_drain: MakeDrain, dsn: str
) -> None:
    """Every line of --json is one object: a row with the documented fields and types (or a
    Stripe error report under its own key); --fix on drift still exits 1 and says what it did."""
    await setup(service, fakes, ("polar", "stripe"))
    d = await make_drain()
    await drain_until_quiet([d], service.db)
    fakes.polar.drop(_sent_ids(fakes, "polar", "tokens")[0])
    done = await asyncio.to_thread(cli, fakes, dsn, "--json", "--fix")
    assert done.returncode == 1, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    fields = {
        "customer_id", "provider", "meter", "period_start", "period_end", "recorded",
        "reported", "held", "drift", "verdict", "why", "fix",
    }  # fmt: skip
    assert len(rows) == 2 * len(METERS)
    for row in rows:
        assert set(row) == fields, row
        assert row["verdict"] in VERDICTS
        for k in ("recorded", "reported", "held", "drift"):
            assert row[k] is None or isinstance(row[k], int), row
    (lower,) = [r for r in rows if r["verdict"] != "match"]
    assert (lower["provider"], lower["meter"], lower["drift"]) == ("polar", "tokens", -5)
    assert lower["fix"].startswith("queued a re-send of 1 events")
    await drain_until_quiet([d], service.db)
    for _ in range(100):
        if not await service.db.fetchval("SELECT count(*) FROM reports WHERE state = 'open'"):
            break
        await d.cycle()
    clean = await asyncio.to_thread(cli, fakes, dsn, "--json")
    assert clean.returncode == 0, clean.stdout
