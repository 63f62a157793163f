"""The real process with group commit: a SIGKILL mid-burst loses no call answered OK, and
`serve --workers N` shares one port between N processes."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess

import asyncpg
import grpc
import pytest
from helpers import record
from process import PLANS_FILE, ServiceProcess, executable

from usage.v1 import customer_pb2, customer_pb2_grpc, usage_pb2, usage_pb2_grpc

pytestmark = pytest.mark.process

BURST = 600  # concurrent RecordUsage calls


async def _customer(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        c = customer_pb2.Customer(
            customer_id="cus_1",
            plan_id="basic",
            subscription_status=customer_pb2.SUBSCRIPTION_STATUS_ACTIVE,
        )
        c.current_period_start_time.FromSeconds(0)
        c.current_period_end_time.FromSeconds(2**33)
        await customer_pb2_grpc.CustomerServiceStub(channel).UpsertCustomer(
            customer_pb2.UpsertCustomerRequest(customer=c), timeout=10
        )


async def test_sigkill_mid_burst_loses_no_acknowledged_event(dsn: str) -> None:
    service = ServiceProcess({"DATABASE_URL": dsn})
    try:
        await _customer(service.address)
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = usage_pb2_grpc.UsageServiceStub(channel)
            calls = [
                asyncio.ensure_future(
                    stub.RecordUsage(record(quantity=1 + i % 7, key=f"k{i}"), timeout=30)
                )
                for i in range(BURST)
            ]
            answered = 0  # calls refused (past the in-flight limit) do not count
            for finished in asyncio.as_completed(calls):
                try:
                    await finished
                    answered += 1
                except grpc.aio.AioRpcError:
                    pass
                if answered >= BURST // 5:
                    break
            service.proc.send_signal(signal.SIGKILL)
            results = await asyncio.gather(*calls, return_exceptions=True)
        acknowledged = {
            r.event_id: i
            for i, r in enumerate(results)
            if isinstance(r, usage_pb2.RecordUsageResponse)
        }
        failed = [r for r in results if isinstance(r, BaseException)]
        print(f"acknowledged {len(acknowledged)}, failed {len(failed)}")
        assert BURST // 5 <= len(acknowledged) and failed, "the kill should land mid-burst"
        conn = await asyncpg.connect(dsn)
        try:
            stored = {
                str(r["event_id"]): r["quantity"]
                for r in await conn.fetch("SELECT event_id, quantity FROM usage_events")
            }
            total = await conn.fetchval(
                "SELECT quantity_sum FROM usage_totals WHERE customer_id = 'cus_1'"
            )
        finally:
            await conn.close()
        assert set(acknowledged) <= set(stored)
        for event_id, i in acknowledged.items():
            assert stored[event_id] == 1 + i % 7
        assert total == sum(stored.values())  # totals committed with their events, or not at all
    finally:
        service.kill()


def _established(port: int) -> dict[int, int]:
    """pid -> established TCP connections accepted on `port`, for every process we can see."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in pathlib.Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                inodes.add(fields[9])
    counts: dict[int, int] = {}
    for fd_dir in pathlib.Path("/proc").glob("[0-9]*/fd"):
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:
            continue
        n = sum(1 for link in links if link.startswith("socket:[") and link[8:-1] in inodes)
        if n:
            counts[int(fd_dir.parent.name)] = n
    return counts


async def _calls_over_separate_connections(
    address: str, dsn: str
) -> tuple[list[usage_pb2.RecordUsageResponse], dict[int, int], int]:
    port = int(address.rsplit(":", 1)[1])
    # A local subchannel pool gives each channel its own connection.
    separate = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=separate) for _ in range(24)]
    try:
        stubs = [usage_pb2_grpc.UsageServiceStub(c) for c in channels]
        answers = await asyncio.gather(
            *(s.RecordUsage(record(key=f"w{i}"), timeout=20) for i, s in enumerate(stubs))
        )
        serving = _established(port)
    finally:
        for c in channels:
            await c.close()
    conn = await asyncpg.connect(dsn)
    try:
        stored = int(await conn.fetchval("SELECT count(*) FROM usage_events"))
    finally:
        await conn.close()
    return list(answers), serving, stored


def test_workers_share_one_port_and_stop_together(dsn: str) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "USAGE_GRPC_ADDRESS": "127.0.0.1:0",
        "USAGE_PLANS_FILE": str(PLANS_FILE),
    }
    with subprocess.Popen(
        [*executable(), "serve", "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = ""
            for line in proc.stdout:
                if line.startswith("usage-service listening on "):
                    break
            assert line.startswith("usage-service listening on "), line
            answers, serving, stored = asyncio.run(
                _calls_over_separate_connections(line.split()[3], dsn)
            )
            assert all(not a.duplicate for a in answers) and stored == 24
            # Both workers accepted connections; the parent accepts none.
            assert len(serving) == 2 and proc.pid not in serving, serving
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            assert not any(pathlib.Path(f"/proc/{pid}").exists() for pid in serving)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
