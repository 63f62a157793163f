"""The metrics endpoint (prometheus_client's own server) and the database gauges, which a
periodic task of the server process sets from the database."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import prometheus_client
import pytest
from conftest import Service
from helpers import record

from usage.v1 import customer_pb2
from usage_service import app, metrics
from usage_service.settings import ConfigError
from usage_service.storage import connections, store


def test_the_endpoint_serves_the_registry_on_the_port_it_chose() -> None:
    with metrics.serving("127.0.0.1:0") as port:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert answer.status == 200
            assert "usage_rpc_in_flight " in answer.read().decode()
    with pytest.raises(urllib.error.URLError):  # stopped with the block
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_a_busy_port_is_a_config_error_naming_the_variable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ConfigError) as caught, metrics.serving(address):
            pass
    assert str(caught.value).startswith(f"USAGE_METRICS_ADDRESS: cannot listen on {address}: ")


def test_metrics_import_neither_asyncpg_nor_storage() -> None:
    probe = (
        "import sys, usage_service.metrics; "
        "print(sorted(m for m in sys.modules if m == 'asyncpg' "
        "or m.startswith('usage_service.storage')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


async def test_the_database_gauges_follow_the_backlog(service: Service, dsn: str) -> None:
    sample = prometheus_client.REGISTRY.get_sample_value
    stripe = {"provider": "stripe"}
    await service.add_customer(
        "cus_m", provider=customer_pb2.PROVIDER_STRIPE, provider_customer_id="cus_stripe_m"
    )
    st = store.Store(await connections.create_pool(dsn, 2))
    try:
        async with app._database_gauges(st, 0.05):
            await _until(lambda: sample("usage_db_pool_connections", {"state": "max"}) == 2)
            await _until(lambda: sample("usage_drain_backlog_events", stripe) == 0)
            for key in ("a", "b", "c"):
                await service.usage.RecordUsage(record(customer_id="cus_m", key=key))
            await _until(lambda: sample("usage_drain_backlog_events", stripe) == 3)
        assert sample("usage_drain_oldest_pending_age_seconds", stripe) >= 0
    finally:
        await st.close()


WAIT = 10.0  # seconds the periodic task may take to set a gauge


async def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "the gauges were not refreshed"
        await asyncio.sleep(0.02)
