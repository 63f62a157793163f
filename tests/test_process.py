"""The real `usage-service` process: health, reflection, graceful shutdown, embedded database."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import socket
import subprocess

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import record
from process import PLANS_FILE, ServiceProcess, executable

from usage.v1 import usage_pb2, usage_pb2_grpc

pytestmark = pytest.mark.process


def test_health_and_reflection_are_served(dsn: str) -> None:
    service = ServiceProcess({"DATABASE_URL": dsn})
    try:
        assert service.health() == health_pb2.HealthCheckResponse.SERVING
        assert service.health("usage.v1.UsageService") == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(service.address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            names = {s.name for a in answers for s in a.list_services_response.service}
        assert {
            "usage.v1.UsageService",
            "usage.v1.CustomerService",
            "grpc.health.v1.Health",
        } <= names
    finally:
        assert service.terminate() == 0


async def test_sigterm_finishes_in_flight_calls_and_loses_nothing(dsn: str) -> None:
    """Calls race a SIGTERM: health turns NOT_SERVING first, every call answered OK is stored,
    and the process exits cleanly."""
    service = ServiceProcess({"DATABASE_URL": dsn, "USAGE_SHUTDOWN_GRACE_SECONDS": "5"})
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            stub = usage_pb2_grpc.UsageServiceStub(channel)
            calls = [
                asyncio.ensure_future(stub.RecordUsage(record(quantity=1, key=f"k{i}"), timeout=20))
                for i in range(300)
            ]
            await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
            service.proc.send_signal(15)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            results = await asyncio.gather(*calls, return_exceptions=True)
        acknowledged = {r.event_id for r in results if isinstance(r, usage_pb2.RecordUsageResponse)}
        failures = [r for r in results if isinstance(r, BaseException)]
        # Calls that reach the server after shutdown began are refused, never half-done.
        refused = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
        assert all(isinstance(f, grpc.aio.AioRpcError) and f.code() in refused for f in failures), (
            failures[:3]
        )
        print(f"acknowledged {len(acknowledged)}, refused {len(failures)}")
        assert acknowledged
        assert await asyncio.to_thread(service.proc.wait, 30) == 0
        conn = await asyncpg.connect(dsn)
        try:
            stored = {str(r[0]) for r in await conn.fetch("SELECT event_id FROM usage_events")}
        finally:
            await conn.close()
        assert acknowledged <= stored
    finally:
        service.kill()


def test_embedded_database_keeps_data_across_restarts(tmp_path: pathlib.Path) -> None:
    env = {"DATABASE_URL": "", "USAGE_DATA_DIR": str(tmp_path / "data")}
    first = ServiceProcess(env)
    try:
        with grpc.insecure_channel(first.address) as channel:
            stub = usage_pb2_grpc.UsageServiceStub(channel)
            event_id = stub.RecordUsage(record(key="kept"), timeout=10).event_id
    finally:
        assert first.terminate() == 0
    second = ServiceProcess(env)
    try:
        with grpc.insecure_channel(second.address) as channel:
            stub = usage_pb2_grpc.UsageServiceStub(channel)
            again = stub.RecordUsage(record(key="kept"), timeout=10)
        assert again.duplicate and again.event_id == event_id
    finally:
        assert second.terminate() == 0


# A setting and a bad value of it ("busy": a port this test holds).
BAD_SETTINGS = [
    ("USAGE_DRAIN_LEASE_SECONDS", "abc"),
    ("USAGE_METRICS_ADDRESS", "busy"),
    ("USAGE_METRICS_ADDRESS", "no-port"),
    ("USAGE_GRPC_ADDRESS", "busy"),
    ("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/none"),
    ("USAGE_MAX_IN_FLIGHT", "0.5"),
]


@pytest.mark.parametrize(("setting", "value"), BAD_SETTINGS)
def test_a_bad_setting_stops_serve_before_it_listens(dsn: str, setting: str, value: str) -> None:
    """One line on stderr naming the setting, exit status 1, and the gRPC port never listened
    on: the port is held by this test, so had the server tried to listen first, the error
    would have named USAGE_GRPC_ADDRESS instead."""
    with (
        socket.create_server(("127.0.0.1", 0)) as grpc_port,
        socket.create_server(("127.0.0.1", 0)) as metrics_port,
    ):
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "USAGE_PLANS_FILE": str(PLANS_FILE),
            "USAGE_AUTH_TOKENS": json.dumps(
                {"a": {"token": "a-token-0123456789abcdef", "scopes": ["usage:read"]}}
            ),
            "USAGE_GRPC_ADDRESS": f"127.0.0.1:{grpc_port.getsockname()[1]}",
            "USAGE_METRICS_ADDRESS": "127.0.0.1:0",
            "USAGE_DRAIN_INTERVAL_SECONDS": "60",
        }
        busy = {
            "USAGE_METRICS_ADDRESS": f"127.0.0.1:{metrics_port.getsockname()[1]}",
            "USAGE_GRPC_ADDRESS": env["USAGE_GRPC_ADDRESS"],
        }
        env[setting] = busy[setting] if value == "busy" else value
        run = subprocess.run(
            [*executable(), "serve"], env=env, capture_output=True, text=True, timeout=60
        )
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stderr.splitlines()
    assert lines and lines[-1].startswith(f"usage-service: {setting}: "), run.stderr
    if setting != "USAGE_GRPC_ADDRESS":  # there gRPC's core logs its own line first
        assert len(lines) == 1, run.stderr
    assert "listening" not in run.stdout
