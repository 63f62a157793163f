"""The gRPC server's life cycle: start, serve, and shut down without losing acknowledged work."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from usage.v1 import customer_pb2, customer_pb2_grpc, usage_pb2, usage_pb2_grpc
from usage_service import drain_commands, embedded
from usage_service import plans as plans_mod
from usage_service.api.customer_api import CustomerService
from usage_service.api.usage_api import UsageService
from usage_service.config import Settings
from usage_service.storage import migrate, store

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SERVICE_NAMES = (
    usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
    customer_pb2.DESCRIPTOR.services_by_name["CustomerService"].full_name,
)


@dataclasses.dataclass
class Running:
    server: grpc.aio.Server
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped)
    port: int

    async def stop(self, grace: float) -> None:
        """Health goes NOT_SERVING, new calls are refused, in-flight calls get `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(st: store.Store, plans: plans_mod.Plans, address: str) -> Running:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    usage_pb2_grpc.add_UsageServiceServicer_to_server(UsageService(st, plans), server)
    customer_pb2_grpc.add_CustomerServiceServicer_to_server(CustomerService(st, plans), server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(address)
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Running(server, health_servicer, port)


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[store.Store]:
    """Migrated storage on DATABASE_URL, or on an embedded PostgreSQL when it is unset."""
    handle: Any = None
    dsn = settings.database_url
    if not dsn:
        dsn, handle = await asyncio.to_thread(embedded.start, settings.data_dir)
    await migrate.migrate_dsn(dsn)
    st = store.Store(await store.create_pool(dsn, settings.pool_size))
    try:
        yield st
    finally:
        await st.close()
        del handle  # the embedded server stops when the process exits


async def serve(settings: Settings) -> None:
    plans = plans_mod.load(settings.plans_file or None)
    async with database(settings) as st:
        running = await start_server(st, plans, settings.grpc_address)
        drainer = drain_commands.Background.start(st, plans, settings.environ)
        host = settings.grpc_address.rsplit(":", 1)[0]
        print(f"usage-service listening on {host}:{running.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down", extra={"action": "shutdown"})
        await running.stop(settings.shutdown_grace)
        await drainer.stop()
    log.info("stopped", extra={"action": "shutdown"})
