"""The gRPC server: the usage.v1 services, health and reflection behind the interceptor."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from usage.v1 import (
    credit_pb2,
    credit_pb2_grpc,
    customer_pb2,
    customer_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from usage_service.api import auth
from usage_service.api.credit_api import CreditService
from usage_service.api.customer_api import CustomerService
from usage_service.api.interceptor import Interceptor
from usage_service.api.usage_api import UsageService
from usage_service.domain import plans as plans_mod
from usage_service.settings import ConfigError
from usage_service.storage import store
from usage_service.storage.watch import Hub
from usage_service.tls import TlsConfigError, TlsFiles

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # largest request or response
KEEPALIVE_MS = 60_000  # the server pings a connection idle this long (a silent watcher's)
KEEPALIVE_TIMEOUT_MS = 20_000  # and closes it when no answer comes in this long
DEFAULT_MAX_IN_FLIGHT = 512  # usage.v1 calls served at once per process; more: RESOURCE_EXHAUSTED
# Above the interceptor's limits on usage.v1 calls and on open health and reflection streams,
# room for health checks and for calls being refused.
EXTRA_CONCURRENT_RPCS = 64
SERVICE_NAMES = (
    usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
    customer_pb2.DESCRIPTOR.services_by_name["CustomerService"].full_name,
    credit_pb2.DESCRIPTOR.services_by_name["CreditService"].full_name,
)


@dataclasses.dataclass
class Running:
    server: grpc.aio.Server
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped)
    port: int
    interceptor: Interceptor
    hub: Hub

    async def stop(self, grace: float) -> None:
        """Health goes NOT_SERVING, WatchUsage streams end (UNAVAILABLE: resume elsewhere), new
        calls are refused, in-flight calls get `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        self.hub.close()
        await self.server.stop(grace)
        await self.hub.stop()


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
    keep_denials: bool = False,
) -> Running:
    interceptor = Interceptor(tokens or auth.Tokens(), max_in_flight)
    limit = (
        max_in_flight
        + interceptor.max_open_streams
        + interceptor.max_watches
        + EXTRA_CONCURRENT_RPCS
    )
    hub = Hub(st.pool, st.read_model)
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Off unless `serve --workers` shares the port: a second server would steal calls.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            # A WatchUsage caller whose connection went silent is found and its stream ended.
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.max_pings_without_data", 0),
            # Clients may ping idle streams as often as every 10 s.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
        maximum_concurrent_rpcs=limit,
    )
    st.plans = plans  # prepaid features burn grants on every path that records usage
    usage_pb2_grpc.add_UsageServiceServicer_to_server(
        UsageService(st, plans, hub, keep_denials), server
    )
    customer_pb2_grpc.add_CustomerServiceServicer_to_server(CustomerService(st, plans), server)
    credit_pb2_grpc.add_CreditServiceServicer_to_server(CreditService(st, plans), server)
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
    hub.start()
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Running(server, health_servicer, port, interceptor, hub)


def access(address: str, settings: auth.AuthSettings, tls: TlsFiles) -> auth.Tokens:
    """The configured tokens, after checking that `address` may be served with them."""
    try:
        tls.check()
        tokens = auth.load(settings.tokens_file, settings.tokens_json.get_secret_value())
    except (TlsConfigError, auth.AuthConfigError) as exc:
        raise ConfigError(str(exc)) from None
    refuse, warning = auth.exposure_problem(
        address, tokens, tls.mutual, settings.allow_unauthenticated
    )
    if refuse:
        raise ConfigError(warning)
    if warning:
        log.warning(warning, extra={"action": "start"})
    if tokens.clients and not tls.enabled and not auth.is_loopback(address):
        log.warning(
            "bearer tokens travel in plain text: set USAGE_TLS_CERT_FILE and USAGE_TLS_KEY_FILE "
            "unless a proxy or mesh terminates TLS in front of this port",
            extra={"action": "start"},
        )
    return tokens
