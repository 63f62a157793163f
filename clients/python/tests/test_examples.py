"""The examples run as a new user would run them: as scripts, against the live server."""

from __future__ import annotations

import datetime as dt
import pathlib
import re
import subprocess
import sys
import uuid

from support import new_customer

import usage_client

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
RUN_TIMEOUT = 60  # seconds per example run
# tests/plans.toml names the meter `tokens`; the examples default to the example plans' llm_tokens.


def run(target: str, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args, "--target", target],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


def test_record_after_action_records_once(target: str, client: usage_client.UsageClient) -> None:
    cid = new_customer(client).customer_id
    request_id = uuid.uuid4().hex
    first = run(target, "record_after_action.py", cid, request_id, "1234", "--meter", "tokens")
    assert first.returncode == 0, first.stderr
    match = re.fullmatch(rf"recorded 1234 tokens for {cid}: event (\S+)\n", first.stdout)
    assert match, first.stdout
    # Run again for the same request (a retried job): nothing new is billed.
    again = run(target, "record_after_action.py", cid, request_id, "1234", "--meter", "tokens")
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"recorded 1234 tokens for {cid}: event {match[1]} (already recorded)\n"
    assert client.get_usage_summary(cid).meter("tokens").used == 1234
    bad = run(target, "record_after_action.py", cid, uuid.uuid4().hex, "-1", "--meter", "tokens")
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT" in bad.stderr and "  quantity: " in bad.stderr


def test_check_and_consume_allows_then_denies(
    target: str, client: usage_client.UsageClient
) -> None:
    cid = new_customer(client).customer_id
    allowed = run(target, "check_and_consume.py", cid, "job-1", "4500", "--feature", "tokens")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout == "allowed: WITHIN_LIMIT, consumed 4500; 500 tokens left\n"
    repeated = run(target, "check_and_consume.py", cid, "job-1", "4500", "--feature", "tokens")
    assert repeated.returncode == 0, repeated.stderr
    assert "(already consumed)" in repeated.stdout
    denied = run(target, "check_and_consume.py", cid, "job-2", "600", "--feature", "tokens")
    assert denied.returncode == 3, denied.stderr
    assert denied.stdout == "denied: LIMIT_EXCEEDED (used 4500 of 5000 tokens)\n"
    assert client.get_usage_summary(cid).meter("tokens").used == 4500


def test_upsert_customer_creates_it_for_this_month(
    target: str, client: usage_client.UsageClient
) -> None:
    cid = f"cus_{uuid.uuid4().hex}"
    for _ in range(2):  # the same month again: nothing changes
        done = run(target, "upsert_customer.py", cid, "--plan", "starter")
        assert done.returncode == 0, done.stderr
        saved = client.get_customer(cid)
        start, end = saved.current_period_start_time, saved.current_period_end_time
        period = f"period {start.date()} .. {end.date()}"
        assert done.stdout == f"{cid}: plan starter (active), {period}\n"
        assert start.day == 1 and end.day == 1 and start <= dt.datetime.now(dt.UTC) < end
        assert saved.current_period_source is usage_client.PeriodSource.CONFIRMED
    bad = run(target, "upsert_customer.py", cid, "--plan", "no-such-plan")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr


def test_show_summary_prints_the_period(target: str, client: usage_client.UsageClient) -> None:
    c = new_customer(client)
    client.record_usage(c.customer_id, "tokens", 1500, idempotency_key="summary-example")
    shown = run(target, "show_summary.py", c.customer_id)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == (
        f"{c.customer_id}: plan starter (active), period "
        f"{c.current_period_start_time.date()} .. {c.current_period_end_time.date()}"
    )
    assert lines[1].split() == [
        "meter", "used", "included", "limit", "left", "overage", "pending", "unbilled", "unit"
    ]  # fmt: skip
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    # No provider: the usage is unbilled, none of it pending.
    assert rows["tokens"] == ["1500", "1000", "5000", "3500", "500", "0", "1500", "tokens"]
    assert rows["calls"] == ["0", "10", "20", "20", "0", "0", "0", "calls"]
    missing = run(target, "show_summary.py", f"cus_{uuid.uuid4().hex}")
    assert missing.returncode == 1 and "no customer" in missing.stderr
