"""Metrics on USAGE_METRICS_ADDRESS and structured logs, from the real process; secrets (bearer
tokens, provider keys) appear in neither."""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import time
import urllib.request

import grpc
import pytest
from helpers import record
from process import ServiceProcess

from usage.v1 import customer_pb2, customer_pb2_grpc, usage_pb2, usage_pb2_grpc
from usage_service.api import auth

pytestmark = pytest.mark.process

TOKEN = "obs-token-5f0c1e2d3b4a69788796a5b4"
WRONG = "wrong-token-aa11bb22cc33dd44ee55"
STRIPE_KEY = "sk_test_never_shown_7a6b5c4d3e2f1a0b"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _scrape_until(url: str, line: str) -> str:
    """The metrics text once it holds `line` (the database gauges are refreshed periodically),
    or the last one read after 30 seconds."""
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert answer.status == 200
            text = answer.read().decode()
        if line in text.splitlines() or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def test_metrics_and_logs(dsn: str) -> None:
    tokens = {"app": {"token": TOKEN, "scopes": sorted(auth.SCOPES)}}
    service = ServiceProcess(
        {
            "DATABASE_URL": dsn,
            "USAGE_METRICS_ADDRESS": "127.0.0.1:0",
            "USAGE_AUTH_TOKENS": json.dumps(tokens),
            "STRIPE_API_KEY": STRIPE_KEY,
            "STRIPE_API_BASE": f"http://127.0.0.1:{_closed_port()}",
            "USAGE_DRAIN_INTERVAL_SECONDS": "0.2",
            "USAGE_METRICS_REFRESH_SECONDS": "0.1",
        }
    )
    try:
        metrics_line = next(line for line in service.output if "metrics on" in line)
        metrics_url = f"http://{metrics_line.split()[-1]}/metrics"
        bearer = (("authorization", f"Bearer {TOKEN}"),)
        with grpc.insecure_channel(service.address) as channel:
            customers = customer_pb2_grpc.CustomerServiceStub(channel)
            usage = usage_pb2_grpc.UsageServiceStub(channel)
            now = dt.datetime.now(dt.UTC)
            customer = customer_pb2.Customer(
                customer_id="cus_1",
                plan_id="basic",
                subscription_status=customer_pb2.SUBSCRIPTION_STATUS_ACTIVE,
                provider=customer_pb2.PROVIDER_STRIPE,
                provider_customer_id="cus_stripe_1",
            )
            customer.current_period_start_time.FromDatetime(now - dt.timedelta(days=1))
            customer.current_period_end_time.FromDatetime(now + dt.timedelta(days=29))
            customers.UpsertCustomer(
                customer_pb2.UpsertCustomerRequest(customer=customer), metadata=bearer
            )
            for key in ("a", "b", "a"):
                usage.RecordUsage(record(key=key, quantity=3), metadata=bearer, timeout=5)
            check = usage.CheckEntitlement(
                usage_pb2.CheckEntitlementRequest(customer_id="cus_1", feature="tokens"),
                metadata=bearer,
            )
            assert check.allowed
            try:
                usage.RecordUsage(
                    record(key="c"),
                    metadata=(("authorization", f"Bearer {WRONG}"), ("x-request-id", "req-42")),
                )
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        text = _scrape_until(metrics_url, 'usage_drain_backlog_events{provider="stripe"} 2.0')
    finally:
        assert service.terminate() == 0
    got = _samples(text)
    record_ok = 'usage_rpc_calls_total{code="OK",method="usage.v1.UsageService/RecordUsage"}'
    assert got[record_ok] == 3
    denied = (
        'usage_rpc_calls_total{code="UNAUTHENTICATED",method="usage.v1.UsageService/RecordUsage"}'
    )
    assert got[denied] == 1
    assert got['usage_events_recorded_total{rpc="RecordUsage"}'] == 2  # the replay is not new
    assert got['usage_entitlement_decisions_total{allowed="true",reason="within_limit"}'] == 1
    assert got['usage_drain_backlog_events{provider="stripe"}'] == 2
    assert got['usage_drain_backlog_events{provider="polar"}'] == 0
    assert got['usage_drain_oldest_pending_age_seconds{provider="stripe"}'] > 0
    assert got['usage_db_pool_connections{state="max"}'] == 10
    assert any(k.startswith("usage_rpc_duration_seconds_bucket{") for k in got)

    logs = [line for line in service.output if line.startswith("{")]
    assert logs, service.output
    parsed = [json.loads(line) for line in logs]
    refused = [p for p in parsed if p.get("code") == "UNAUTHENTICATED"]
    assert refused and refused[0]["request_id"] == "req-42"
    assert refused[0]["method"] == "usage.v1.UsageService/RecordUsage"
    everything = text + "".join(service.output)
    for secret in (TOKEN, WRONG, STRIPE_KEY):
        assert secret not in everything
    assert not re.search(r"Bearer \S", everything)


def test_tracing_without_the_otel_extra_is_a_clear_start_up_error(dsn: str) -> None:
    import importlib.util
    import os
    import subprocess

    from process import PLANS_FILE, executable

    if importlib.util.find_spec("opentelemetry") is not None:
        import pytest

        pytest.skip("the otel extra is installed")
    run = subprocess.run(
        [*executable(), "serve"],
        env={
            **os.environ,
            "DATABASE_URL": dsn,
            "USAGE_PLANS_FILE": str(PLANS_FILE),
            "USAGE_GRPC_ADDRESS": "127.0.0.1:0",
            "USAGE_TRACING": "otlp",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "usage-service[otel]" in run.stderr
