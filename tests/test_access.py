"""Access control: bearer tokens with scopes, TLS and mutual TLS, and the loopback rule."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from certs import Authority
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import details, record
from process import PLANS_FILE, ServiceProcess, executable

from usage.v1 import credit_pb2, customer_pb2, usage_pb2, usage_pb2_grpc
from usage_service.api import auth
from usage_service.api.server import start_server
from usage_service.domain import plans as plans_mod
from usage_service.storage import connections, store
from usage_service.tls import TlsFiles

WRITER = "writer-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
TOKENS = json.dumps(
    {
        "checkout": {"token": WRITER, "scopes": ["usage:write", "entitlements:check"]},
        "dashboard": {"token": READER, "scopes": ["usage:read", "customers:read"]},
    }
)


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "USAGE_PLANS_FILE": str(PLANS_FILE), **extra}


def test_every_method_needs_a_known_scope() -> None:
    methods = {
        f"/{service.full_name}/{method.name}"
        for module in (usage_pb2, customer_pb2, credit_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert set(auth.SCOPE_BY_METHOD) == methods
    assert set(auth.SCOPE_BY_METHOD.values()) <= auth.SCOPES


def test_token_configuration_errors_never_show_the_token(tmp_path: pathlib.Path) -> None:
    secret = "short-secret"
    with pytest.raises(auth.AuthConfigError) as short:
        auth.load("", json.dumps({"a": {"token": secret, "scopes": ["usage:read"]}}))
    with pytest.raises(auth.AuthConfigError) as scope:
        auth.load("", json.dumps({"a": {"token": WRITER, "scopes": ["usage:delete"]}}))
    file = tmp_path / "tokens.toml"
    file.write_text(f'[clients.a]\ntoken = "{WRITER}"\nscopes = ["usage:read"]\n')
    with pytest.raises(auth.AuthConfigError) as shared:
        auth.load(str(file), json.dumps({"b": {"token": WRITER, "scopes": ["usage:read"]}}))
    for error in (short, scope, shared):
        assert secret not in str(error.value) and WRITER not in str(error.value)
    assert "usage:delete" in str(scope.value)
    assert "share one token" in str(shared.value)


def test_tokens_from_a_file_and_by_digest(tmp_path: pathlib.Path) -> None:
    import hashlib

    file = tmp_path / "tokens.toml"
    digest = hashlib.sha256(READER.encode()).hexdigest()
    file.write_text(
        f'[clients.a]\ntoken = "{WRITER}"\nscopes = ["usage:write"]\n'
        f'[clients.b]\ntoken_sha256 = "{digest}"\nscopes = ["usage:read"]\n'
    )
    tokens = auth.load(str(file), "")
    assert WRITER not in repr(tokens)
    a, b = tokens.identify(f"Bearer {WRITER}"), tokens.identify(f"bearer {READER}")
    assert a is not None and a.name == "a" and b is not None and b.name == "b"
    assert tokens.identify(WRITER) is None  # not a bearer value
    assert tokens.identify("Bearer " + WRITER[:-1]) is None


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await connections.create_pool(dsn, size=5)
    yield pool
    await pool.close()


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_tokens_and_scopes(pool: asyncpg.Pool, plans: plans_mod.Plans) -> None:
    running = await start_server(
        store.Store(pool), plans, "127.0.0.1:0", tokens=auth.load("", TOKENS)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            usage = usage_pb2_grpc.UsageServiceStub(channel)
            refused = {
                "missing": (usage.RecordUsage(record(key="a")), "UNAUTHENTICATED"),
                "unknown": (
                    usage.RecordUsage(record(key="b"), metadata=_metadata("x" * 30)),
                    "UNAUTHENTICATED",
                ),
                "wrong scope": (
                    usage.RecordUsage(record(key="c"), metadata=_metadata(READER)),
                    "PERMISSION_DENIED",
                ),
            }
            for case, (call, reason) in refused.items():
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await call
                found = details(error.value)
                assert (found.code.name, found.reason) == (reason, reason), case
                assert READER not in (error.value.details() or "")
            assert await pool.fetchval("SELECT count(*) FROM usage_events") == 0

            ok = await usage.RecordUsage(record(key="d"), metadata=_metadata(WRITER))
            assert not ok.duplicate
            summary = usage.GetUsageSummary(
                usage_pb2.GetUsageSummaryRequest(customer_id="nobody"), metadata=_metadata(READER)
            )
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await summary
            assert error.value.code() == grpc.StatusCode.NOT_FOUND  # past auth: a real answer
            assert await pool.fetchval("SELECT count(*) FROM usage_events") == 1
            # GetDecision is a read, like GetUsageSummary.
            decision = usage_pb2.GetDecisionRequest(decision_id=str(uuid.uuid4()))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await usage.GetDecision(decision, metadata=_metadata(WRITER))
            assert details(error.value).reason == "PERMISSION_DENIED"
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await usage.GetDecision(decision, metadata=_metadata(READER))
            assert details(error.value).reason == "DECISION_NOT_FOUND"

            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            names = [
                s.name
                async for a in reflect.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
                for s in a.list_services_response.service
            ]
            assert "usage.v1.UsageService" in names
    finally:
        await running.stop(1)


async def test_tls_and_mutual_tls(
    pool: asyncpg.Pool, plans: plans_mod.Plans, tmp_path: pathlib.Path
) -> None:
    ca = Authority(tmp_path, "ca")
    server_cert = ca.issue("server", server=True)
    client_cert = ca.issue("client")
    stranger = Authority(tmp_path, "other-ca").issue("stranger")
    tls = TlsFiles(
        cert_file=str(server_cert.cert),
        key_file=str(server_cert.key),
        client_ca_file=str(ca.cert_file),
    )
    running = await start_server(store.Store(pool), plans, "127.0.0.1:0", tls=tls)
    address = f"127.0.0.1:{running.port}"
    root = ca.cert_file.read_bytes()

    async def call(credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
        channel = (
            grpc.aio.secure_channel(address, credentials)
            if credentials
            else grpc.aio.insecure_channel(address)
        )
        async with channel:
            try:
                await usage_pb2_grpc.UsageServiceStub(channel).RecordUsage(record(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    try:
        assert await call(None) == grpc.StatusCode.UNAVAILABLE
        assert await call(grpc.ssl_channel_credentials(root)) == grpc.StatusCode.UNAVAILABLE
        foreign = grpc.ssl_channel_credentials(
            root, stranger.key.read_bytes(), stranger.cert.read_bytes()
        )
        assert await call(foreign) == grpc.StatusCode.UNAVAILABLE
        assert await pool.fetchval("SELECT count(*) FROM usage_events") == 0
        mine = grpc.ssl_channel_credentials(
            root, client_cert.key.read_bytes(), client_cert.cert.read_bytes()
        )
        assert await call(mine) == grpc.StatusCode.OK
        assert await pool.fetchval("SELECT count(*) FROM usage_events") == 1
    finally:
        await running.stop(1)


@pytest.mark.process
def test_health_command_over_mutual_tls(dsn: str, tmp_path: pathlib.Path) -> None:
    """The container's HEALTHCHECK: `usage-service health` speaks TLS with the server's own
    certificate when mutual TLS is on."""
    ca = Authority(tmp_path, "ca")
    server_cert = ca.issue("server", server=True)
    env = {
        "DATABASE_URL": dsn,
        "USAGE_TLS_CERT_FILE": str(server_cert.cert),
        "USAGE_TLS_KEY_FILE": str(server_cert.key),
        "USAGE_TLS_CLIENT_CA_FILE": str(ca.cert_file),
        "USAGE_HEALTH_CA_FILE": str(ca.cert_file),
    }
    service = ServiceProcess(env)
    try:
        run = subprocess.run(
            [*executable(), "health", "--address", service.address],
            env=_env(env),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "SERVING" in run.stdout
    finally:
        assert service.terminate() == 0
    down = subprocess.run(
        [*executable(), "health", "--address", service.address, "--timeout", "1"],
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode == 1


@pytest.mark.process
def test_no_auth_only_on_loopback_or_by_explicit_opt_out(dsn: str) -> None:
    env = {"DATABASE_URL": dsn, "USAGE_GRPC_ADDRESS": "0.0.0.0:0"}
    refused = subprocess.run(
        [*executable(), "serve"],
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert "refusing to serve 0.0.0.0:0 without authentication" in refused.stderr

    opted_out = ServiceProcess({**env, "USAGE_ALLOW_UNAUTHENTICATED": "true"})
    try:
        assert opted_out.health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert opted_out.terminate() == 0
    warnings = [
        json.loads(line)
        for line in opted_out.output
        if line.startswith("{") and '"WARNING"' in line
    ]
    assert any("USAGE_ALLOW_UNAUTHENTICATED is set" in w["message"] for w in warnings)

    local = ServiceProcess({"DATABASE_URL": dsn})
    assert local.terminate() == 0
    assert any("to local callers only" in line for line in local.output)


async def test_open_health_streams_leave_room_for_checks_and_authenticated_calls(
    pool: asyncpg.Pool, plans: plans_mod.Plans
) -> None:
    """Anyone may open a health Watch stream, and each stays open: past a small cap they are
    refused (with an ErrorInfo), so however many a caller opens, health checks and
    authenticated calls are still served."""
    running = await start_server(
        store.Store(pool), plans, "127.0.0.1:0", tokens=auth.load("", TOKENS), max_in_flight=1
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watches = []
            open_: list[health_pb2.HealthCheckResponse] = []
            refused: list[grpc.aio.AioRpcError] = []
            for _ in range(100):  # one after the other: each is open or refused before the next
                watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
                watches.append(watch)
                try:
                    open_.append(await watch.read())
                except grpc.aio.AioRpcError as exc:
                    refused.append(exc)
            assert open_ and refused
            assert all(a.status == health_pb2.HealthCheckResponse.SERVING for a in open_)
            for error in refused:
                found = details(error)
                assert (found.code, found.reason) == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "TOO_MANY_STREAMS",
                )

            answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            usage = usage_pb2_grpc.UsageServiceStub(channel)
            ok = await usage.RecordUsage(record(), metadata=_metadata(WRITER), timeout=5)
            assert not ok.duplicate
            assert len(open_) == running.interceptor.max_open_streams
            for watch in watches:
                watch.cancel()
    finally:
        await running.stop(1)
