"""Drain throughput: events/s from recorded to settled against a local fake provider.

Records `--events` events for 100 customers of one provider, then runs the service's drain in
this process against that provider's fake from tests/fakes, served on 127.0.0.1 by a child
process (so it does not share this process's GIL), and times until every event is settled as
reported. Scenarios (`--scenario`, several allowed):
- polar (the default): a per-event provider that takes batches (500 events a call);
- stripe-stream: Stripe sum meters through the v2 meter event stream
  (STRIPE_METER_EVENT_STREAM=true): one summed meter event per customer and cycle, many
  customers' events in one request of at most 100;
- stripe-v1: the same through v1 meter events, one call per summed event.
`--repeats N` runs each scenario N times (interleaved) and prints the median; `--json` prints
one JSON object per run and one per scenario's median.

    .venv/bin/python bench/drain.py --database-url postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/drain.py --database-url postgresql://postgres@127.0.0.1:5432/test \
        --events 20000 --scenario polar --scenario stripe-stream --scenario stripe-v1 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
import urllib.parse
import uuid

import asyncpg

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fakes.ingest import POLAR_KEY  # noqa: E402
from fakes.stripe import KEY as STRIPE_KEY  # noqa: E402

from usage_service import domain, providers  # noqa: E402
from usage_service.domain import ids, periods  # noqa: E402
from usage_service.drain.loop import Drain, DrainSettings  # noqa: E402
from usage_service.providers.config import ProviderSettings  # noqa: E402
from usage_service.settings import plans_file  # noqa: E402
from usage_service.storage import connections, drain_store, history, migrate, store  # noqa: E402

CUSTOMERS = 100
TIMEOUT = 600.0  # seconds
SCENARIOS = ("polar", "stripe-stream", "stripe-v1")


FAKE = """
import sys
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == "polar":
    from fakes.ingest import FakePolar
    fake = FakePolar().start()
    held = lambda: len(fake.accepted)
else:
    from fakes.stripe import FakeStripe
    fake = FakeStripe({"tokens": "sum"}).start()
    held = lambda: sum(fake.totals().values())
print(fake.url, flush=True)
sys.stdin.readline()
print(held(), len(fake.violations), flush=True)
fake.stop()
"""


def start_fake(scenario: str = "polar") -> tuple[subprocess.Popen[str], str]:
    """The scenario's fake provider in a child process; returns it and its URL."""
    fake = "polar" if scenario == "polar" else "stripe"
    child = subprocess.Popen(
        [sys.executable, "-c", FAKE, str(ROOT / "tests"), fake],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    return child, child.stdout.readline().strip()


def stop_fake(child: subprocess.Popen[str]) -> tuple[int, int]:
    """Stops the fake; returns what it holds (Polar: events accepted; Stripe: the sum of the
    values of its meter events) and the protocol violations it saw."""
    out, _ = child.communicate("stop\n", timeout=30)
    accepted, violations = out.split()
    return int(accepted), int(violations)


def quantity(i: int) -> int:
    return 1 + i % 100


def expected_sum(events: int) -> int:
    return sum(quantity(i) for i in range(events))


def with_database(dsn: str, name: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


def environment(scenario: str, fake_url: str) -> dict[str, str]:
    if scenario == "polar":
        return {"POLAR_ACCESS_TOKEN": POLAR_KEY, "POLAR_API_BASE": fake_url}
    return {
        "STRIPE_API_KEY": STRIPE_KEY,
        "STRIPE_API_BASE": fake_url,
        "STRIPE_METER_EVENT_STREAM": str(scenario == "stripe-stream").lower(),
    }


async def run(
    server_dsn: str, events: int, replicas: int, scenario: str = "polar", claim: int = 0
) -> dict[str, float | str]:
    name = f"usage_bench_drain_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = with_database(server_dsn, name)
    provider = domain.Provider.POLAR if scenario == "polar" else domain.Provider.STRIPE
    fake, fake_url = start_fake(scenario)
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
                    provider=provider,
                    provider_customer_id="" if scenario == "polar" else f"cus_{c}",
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
                        quantity=quantity(i),
                        idempotency_key=f"d{i}",
                        event_time=now,
                        properties={},
                        payload_hash=domain.payload_hash("tokens", quantity(i), None, {}),
                    )
                    for i in range(start, min(start + 1000, events))
                ]
            )
        env = environment(scenario, fake_url)
        adapters = providers.adapters(ProviderSettings.from_env(env), loaded.meters)
        settings = DrainSettings(interval=0.05, lease=60, **({"claim": claim} if claim else {}))
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
            "scenario": scenario,
            "events": events,
            "reported": reported,
            "seconds": seconds,
            "events_per_s": reported / seconds,
            "accepted_by_fake": accepted,
            # what the fake should hold: Polar every event, Stripe the sum of their quantities
            "expected_by_fake": events if scenario == "polar" else expected_sum(events),
            "violations": violations,
        }
    finally:
        if fake.poll() is None:
            fake.kill()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def describe(result: dict[str, float | str]) -> str:
    """One run as a line (the Polar scenario's as it always was)."""
    polar = result["scenario"] == "polar"
    name = "drain" if polar else f"drain ({result['scenario']})"
    held = "fake Polar accepted" if polar else "fake Stripe holds a sum of"
    return (
        f"{name}: {result['reported']:,.0f}/{result['events']:,} events reported in "
        f"{result['seconds']:.2f} s = {result['events_per_s']:,.0f} events/s "
        f"({held} {result['accepted_by_fake']:,.0f}, {result['violations']:.0f} protocol "
        "violations)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--replicas", type=int, default=1, help="drains in this process")
    p.add_argument(
        "--scenario", action="append", choices=SCENARIOS, help="polar (default); repeatable"
    )
    p.add_argument("--repeats", type=int, default=1, help="runs per scenario, interleaved")
    p.add_argument("--claim", type=int, default=0, help="events claimed per cycle (0: default)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of text")
    args = p.parse_args()
    if not args.database_url:
        p.error("--database-url (or DATABASE_URL) is required")
    scenarios = args.scenario or ["polar"]
    runs: dict[str, list[dict[str, float | str]]] = {s: [] for s in scenarios}
    for _ in range(args.repeats):
        for scenario in scenarios:
            result = asyncio.run(
                run(args.database_url, args.events, args.replicas, scenario, args.claim)
            )
            runs[scenario].append(result)
            print(json.dumps(result) if args.json else describe(result), flush=True)
    if args.repeats > 1:
        for scenario, results in runs.items():
            rates = [float(r["events_per_s"]) for r in results]
            median = statistics.median(rates)
            if args.json:
                print(json.dumps({"scenario": scenario, "median_events_per_s": median}))
            else:
                each = ", ".join(f"{r:,.0f}" for r in rates)
                print(
                    f"drain ({scenario}): median of {len(rates)} = {median:,.0f} events/s ({each})"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
