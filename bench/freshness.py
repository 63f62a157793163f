"""How long a cancel through one replica takes to reach the checks of another.

Starts two `usage-service serve` processes (A and B) on one database. Each trial cancels (or
re-activates) a customer through A, then checks through B back to back until B answers the
new status; the lag is the time from A's acknowledgement to B's first such answer. Prints
p50, p99 and the worst lag over the trials.

    .venv/bin/python bench/freshness.py --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping

import grpc

from usage.v1 import customer_pb2, customer_pb2_grpc, usage_pb2, usage_pb2_grpc

ACTIVE = customer_pb2.SUBSCRIPTION_STATUS_ACTIVE
CANCELED = customer_pb2.SUBSCRIPTION_STATUS_CANCELED
START_TIMEOUT = 60.0  # seconds for a server to print its address
GIVE_UP = 10.0  # seconds a trial may wait for B before it counts as never seen


class Server:
    """`usage-service serve` on a free port of 127.0.0.1."""

    def __init__(self, env: Mapping[str, str]) -> None:
        exe = os.path.join(os.path.dirname(sys.executable), "usage-service")
        self.proc = subprocess.Popen(
            [exe, "serve"],
            env={**os.environ, "USAGE_GRPC_ADDRESS": "127.0.0.1:0", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.address = ""
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if line.startswith("usage-service listening on "):
                    self.address = line.split()[-1]
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(START_TIMEOUT) or not self.address:
            self.stop()
            raise RuntimeError("usage-service did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def upsert(customer_id: str, status: int, plan_id: str) -> customer_pb2.UpsertCustomerRequest:
    now = dt.datetime.now(dt.UTC)
    c = customer_pb2.Customer(customer_id=customer_id, plan_id=plan_id, subscription_status=status)
    c.current_period_start_time.FromDatetime(now - dt.timedelta(days=1))
    c.current_period_end_time.FromDatetime(now + dt.timedelta(days=29))
    return customer_pb2.UpsertCustomerRequest(customer=c)


async def lags(a: str, b: str, trials: int, plan_id: str, feature: str) -> list[float]:
    """Seconds from A's acknowledgement of each status change to B's first check that sees it."""
    customer_id = f"fresh-{uuid.uuid4().hex[:8]}"
    check = usage_pb2.CheckEntitlementRequest(customer_id=customer_id, feature=feature)
    out: list[float] = []
    async with grpc.aio.insecure_channel(a) as ca, grpc.aio.insecure_channel(b) as cb:
        customers = customer_pb2_grpc.CustomerServiceStub(ca)
        checks = usage_pb2_grpc.UsageServiceStub(cb)
        await customers.UpsertCustomer(upsert(customer_id, ACTIVE, plan_id))
        allowed = True
        while not (await checks.CheckEntitlement(check)).allowed:
            pass
        for _ in range(trials):
            allowed = not allowed
            await checks.CheckEntitlement(check)  # B holds the old answer in memory
            await customers.UpsertCustomer(
                upsert(customer_id, ACTIVE if allowed else CANCELED, plan_id)
            )
            acknowledged = time.monotonic()
            while (await checks.CheckEntitlement(check)).allowed != allowed:
                if time.monotonic() - acknowledged > GIVE_UP:
                    raise RuntimeError(f"replica B never saw the change in {GIVE_UP} s")
            out.append(time.monotonic() - acknowledged)
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--database-url", required=True)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--plans", default="", help="plans file (default: the packaged one)")
    p.add_argument("--plan", default="free", help="a plan of the plans file")
    p.add_argument("--feature", default="api_calls", help="a feature of that plan")
    args = p.parse_args()
    env = {"DATABASE_URL": args.database_url, "USAGE_PLANS_FILE": args.plans}
    a = Server(env)
    try:
        b = Server(env)
        try:
            found = asyncio.run(lags(a.address, b.address, args.trials, args.plan, args.feature))
        finally:
            b.stop()
    finally:
        a.stop()
    ms = [x * 1000 for x in found]
    print(
        f"freshness across replicas ({len(ms)} status changes): "
        f"p50 {statistics.median(ms):.1f} ms, p99 {percentile(ms, 99):.1f} ms, "
        f"max {max(ms):.1f} ms"
    )


if __name__ == "__main__":
    main()
