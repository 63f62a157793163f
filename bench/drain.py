"""Drain throughput: events/s from recorded to settled against a local fake provider.

Records `--events` events for Polar customers (a per-event provider that takes batches), then
runs the service's drain in this process against the fake Polar from tests/fakes, served on
127.0.0.1 by a child process (so it does not share this process's GIL), and times until every
event is settled as reported.

    .venv/bin/python bench/drain.py --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import pathlib
import subprocess
import sys
import time
import urllib.parse
import uuid

import asyncpg

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fakes.ingest import POLAR_KEY  # noqa: E402

from usage_service import domain, providers  # noqa: E402
from usage_service.domain import ids, periods  # noqa: E402
from usage_service.drain.loop import Drain, DrainSettings  # noqa: E402
from usage_service.providers.config import ProviderSettings  # noqa: E402
from usage_service.settings import plans_file  # noqa: E402
from usage_service.storage import connections, drain_store, history, migrate, store  # noqa: E402

CUSTOMERS = 100
TIMEOUT = 600.0  # seconds


FAKE = """
import sys
sys.path.insert(0, sys.argv[1])
from fakes.ingest import FakePolar
fake = FakePolar().start()
print(fake.url, flush=True)
sys.stdin.readline()
print(len(fake.accepted), len(fake.violations), flush=True)
fake.stop()
"""


def start_fake() -> tuple[subprocess.Popen[str], str]:
    """The fake Polar in a child process; returns it and its URL."""
    child = subprocess.Popen(
        [sys.executable, "-c", FAKE, str(ROOT / "tests")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    return child, child.stdout.readline().strip()


def stop_fake(child: subprocess.Popen[str]) -> tuple[int, int]:
    """Stops the fake; returns the events it accepted and the protocol violations it saw."""
    out, _ = child.communicate("stop\n", timeout=30)
    accepted, violations = out.split()
    return int(accepted), int(violations)


def with_database(dsn: str, name: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


async def run(server_dsn: str, events: int, replicas: int) -> dict[str, float]:
    name = f"usage_bench_drain_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = with_database(server_dsn, name)
    fake, fake_url = start_fake()
    accepted = violations = -1
    try:
        await migrate.migrate_dsn(dsn)
        loaded = plans_file.load(ROOT / "bench" / "plans.toml")
        st = store.Store(await connections.create_pool(dsn, 10))
        now = dt.datetime.now(dt.UTC)
        for c in range(CUSTOMERS):
            await st.upsert_customer(
                domain.Customer(
                    f"bench-{c}",
                    "bench",
                    domain.SubscriptionStatus.ACTIVE,
                    now - dt.timedelta(days=1),
                    now + dt.timedelta(days=29),
                    periods.Cadence(periods.Interval.DAY, 30, now + dt.timedelta(days=29)),
                    provider=domain.Provider.POLAR,
                ),
                history.CadenceRequest(),
                now,
            )
        for start in range(0, events, 1000):
            await st.record(
                [
                    domain.UsageEvent(
                        event_id=ids.new_event_id(),
                        customer_id=f"bench-{i % CUSTOMERS}",
                        meter="tokens",
                        quantity=1 + i % 100,
                        idempotency_key=f"d{i}",
                        event_time=now,
                        properties={},
                        payload_hash=domain.payload_hash("tokens", 1 + i % 100, None, {}),
                    )
                    for i in range(start, min(start + 1000, events))
                ]
            )
        env = {"POLAR_ACCESS_TOKEN": POLAR_KEY, "POLAR_API_BASE": fake_url}
        adapters = providers.adapters(ProviderSettings.from_env(env), loaded.meters)
        settings = DrainSettings(interval=0.05, lease=60)
        drains = [
            Drain(drain_store.DrainStore(st.pool), adapters, loaded.meters, settings, f"b{r}")
            for r in range(replicas)
        ]
        started = time.monotonic()
        deadline = started + TIMEOUT
        reported = 0
        while reported < events and time.monotonic() < deadline:
            await asyncio.gather(*(d.drain_due() for d in drains))
            reported = int(
                await st.pool.fetchval(
                    "SELECT count(*) FROM usage_events WHERE report_state = 'reported'"
                )
            )
        seconds = time.monotonic() - started
        await st.close()
        accepted, violations = stop_fake(fake)
        return {
            "events": events,
            "reported": reported,
            "seconds": seconds,
            "events_per_s": reported / seconds,
            "accepted_by_fake": accepted,
            "violations": violations,
        }
    finally:
        if fake.poll() is None:
            fake.kill()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--replicas", type=int, default=1, help="drains in this process")
    args = p.parse_args()
    if not args.database_url:
        p.error("--database-url (or DATABASE_URL) is required")
    result = asyncio.run(run(args.database_url, args.events, args.replicas))
    print(
        f"drain: {result['reported']:,.0f}/{result['events']:,} events reported in "
        f"{result['seconds']:.2f} s = {result['events_per_s']:,.0f} events/s "
        f"(fake Polar accepted {result['accepted_by_fake']:,.0f}, "
        f"{result['violations']:.0f} protocol violations)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
