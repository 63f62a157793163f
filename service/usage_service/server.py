"""The gRPC server's life cycle: start, serve, and shut down without losing acknowledged work."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from usage.v1 import customer_pb2, customer_pb2_grpc, usage_pb2, usage_pb2_grpc
from usage_service import (
    auth,
    drain_commands,
    embedded,
    metrics,
    metrics_http,
    reconcile_commands,
    tracing,
)
from usage_service import plans as plans_mod
from usage_service.api.customer_api import CustomerService
from usage_service.api.usage_api import UsageService
from usage_service.config import DEFAULT_MAX_IN_FLIGHT, ConfigError, Settings
from usage_service.interceptor import Interceptor
from usage_service.storage import migrate, store
from usage_service.tls import TlsConfigError, TlsFiles

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Above the interceptor's limits on usage.v1 calls and on open health and reflection streams,
# room for health checks and for calls being refused.
EXTRA_CONCURRENT_RPCS = 64
SERVICE_NAMES = (
    usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
    customer_pb2.DESCRIPTOR.services_by_name["CustomerService"].full_name,
)


@dataclasses.dataclass
class Running:
    server: grpc.aio.Server
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped)
    port: int
    interceptor: Interceptor

    async def stop(self, grace: float) -> None:
        """Health goes NOT_SERVING, new calls are refused, in-flight calls get `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    st: store.Store,
    plans: plans_mod.Plans,
    address: str,
    *,
    tokens: auth.Tokens | None = None,
    tls: TlsFiles | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    reuse_port: bool = False,
) -> Running:
    interceptor = Interceptor(tokens or auth.Tokens(), max_in_flight)
    limit = max_in_flight + interceptor.max_open_streams + EXTRA_CONCURRENT_RPCS
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Off unless `serve --workers` shares the port: a second server would steal calls.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
        maximum_concurrent_rpcs=limit,
    )
    usage_pb2_grpc.add_UsageServiceServicer_to_server(UsageService(st, plans), server)
    customer_pb2_grpc.add_CustomerServiceServicer_to_server(CustomerService(st, plans), server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        if tls is not None and tls.enabled:
            port = server.add_secure_port(address, tls.server_credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # gRPC could not bind: the port is taken or the host is not ours
        raise ConfigError(
            f"USAGE_GRPC_ADDRESS: cannot listen on {address} (in use, or not this host's)"
        ) from None
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Running(server, health_servicer, port, interceptor)


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[store.Store]:
    """Migrated storage on DATABASE_URL, or on an embedded PostgreSQL when it is unset."""
    handle: Any = None
    dsn = settings.database_url
    if not dsn:
        dsn, handle = await asyncio.to_thread(embedded.start, settings.data_dir)
    try:
        await migrate.migrate_dsn(dsn)
        st = store.Store(await store.create_pool(dsn, settings.pool_size))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = " ".join(str(exc).split()) or "no reason given"
        raise ConfigError(
            f"DATABASE_URL: cannot use the database: {type(exc).__name__}: {reason}"
        ) from None
    try:
        yield st
    finally:
        await st.close()
        del handle  # the embedded server stops when the process exits


def access(settings: Settings) -> auth.Tokens:
    """The configured tokens, after checking that the listen address may be served with them."""
    try:
        settings.tls.check()
        tokens = auth.load(settings.auth_tokens_file, settings.auth_tokens_json)
    except (TlsConfigError, auth.AuthConfigError) as exc:
        raise ConfigError(str(exc)) from None
    refuse, warning = auth.exposure_problem(
        settings.grpc_address, tokens, settings.tls.mutual, settings.allow_unauthenticated
    )
    if refuse:
        raise ConfigError(warning)
    if warning:
        log.warning(warning, extra={"action": "start"})
    if tokens.clients and not settings.tls.enabled and not auth.is_loopback(settings.grpc_address):
        log.warning(
            "bearer tokens travel in plain text: set USAGE_TLS_CERT_FILE and USAGE_TLS_KEY_FILE "
            "unless a proxy or mesh terminates TLS in front of this port",
            extra={"action": "start"},
        )
    return tokens


async def serve(settings: Settings) -> None:
    """Every setting is read and checked, and the database reached, before anything listens;
    a port that is taken is found before the server says it is listening."""
    drain_commands.check_settings(settings.environ)
    reconcile_commands.check_settings(settings.environ)
    plans = plans_mod.load(settings.plans_file or None)
    tokens = access(settings)
    tracing.setup(settings.tracing)
    async with database(settings) as st, contextlib.AsyncExitStack() as stack:
        if settings.metrics_address:
            scraper = await metrics_http.start(
                settings.metrics_address, lambda: metrics.refresh(st.pool)
            )
            stack.callback(scraper.close)
            metrics_host = settings.metrics_address.rsplit(":", 1)[0]
            print(
                f"usage-service metrics on {metrics_host}:{metrics_http.bound_port(scraper)}",
                flush=True,
            )
        try:
            running = await start_server(
                st,
                plans,
                settings.grpc_address,
                tokens=tokens,
                tls=settings.tls,
                max_in_flight=settings.max_in_flight,
                max_message_bytes=settings.max_message_bytes,
                reuse_port=settings.reuse_port,
            )
        except TlsConfigError as exc:
            raise ConfigError(str(exc)) from None
        # Stops the server if anything below fails; after a graceful stop it returns at once.
        stack.push_async_callback(running.server.stop, 0)
        drainer = drain_commands.Background.start(st, plans, settings.environ)
        reconciler = reconcile_commands.Background.start(st, plans, settings.environ)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        host = settings.grpc_address.rsplit(":", 1)[0]
        # Printed once signals are handled: whoever waits for this line may send SIGTERM.
        print(f"usage-service listening on {host}:{running.port}", flush=True)
        await stop.wait()
        log.info("shutting down", extra={"action": "shutdown"})
        await running.stop(settings.shutdown_grace)
        await drainer.stop()
        if reconciler is not None:
            await reconciler.stop()
    log.info("stopped", extra={"action": "shutdown"})
