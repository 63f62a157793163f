"""Webhooks of threshold alerts, sent to a real HTTP receiver on 127.0.0.1: signed so that the
receiver verifies them with the secret alone (using the README's own snippet), delivered at
least once with the same id and body, retried with backoff, shared between deliverers."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import pathlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import grpc
import prometheus_client
import pytest
from alerts_support import ALERT_PLANS, alert_plans, alerter, count, eventually, pool
from conftest import Service
from fakes.base import Call, Fault
from fakes.webhooks import Receiver
from helpers import active_customer, record
from process import ServiceProcess

from usage.v1 import customer_pb2, customer_pb2_grpc, usage_pb2_grpc
from usage_service.alerts.background import AlertSettings
from usage_service.alerts.webhooks import Deliverer, Target
from usage_service.domain.plans import Plans
from usage_service.settings import ConfigError
from usage_service.storage import alerts

SECRET = "whsec_0123456789abcdef0123"
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def plans() -> Plans:
    return alert_plans()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def readme_verify() -> Callable[..., bool]:
    """`verify` as the README's "Alerts and webhooks" section shows it."""
    text = README.read_text()
    section = text[text.index("## Alerts and webhooks") :]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    verify: Callable[..., bool] = namespace["verify"]
    return verify


def target(url: str) -> Target:
    return Target(url, SECRET, timeout=5.0, backoff_base=0.05, backoff_cap=0.2)


@contextlib.asynccontextmanager
async def deliverer(db: asyncpg.Pool, url: str) -> AsyncIterator[Deliverer]:
    d = Deliverer(db, target(url), interval=60.0)
    try:
        yield d
    finally:
        await d.aclose()


@contextlib.asynccontextmanager
async def delivering(d: Deliverer) -> AsyncIterator[Deliverer]:
    task = asyncio.create_task(d.run())
    try:
        yield d
    finally:
        d.stop()
        await task


async def crossing(service: Service, db: asyncpg.Pool, plans: Plans, used: int = 800) -> str:
    """cus_1 crosses 80% of its tokens limit; the alert's id."""
    await service.add_customer()
    await service.usage.RecordUsage(record(quantity=used, key=f"cross-{used}"))
    assert await alerter(db, plans).catch_up() == 1
    [row] = await alerts.alerts_of(db, "cus_1")
    return str(row["alert_id"])


def signed_at(call: Call) -> int:
    stamp = call.headers["usage-signature"].split(",")[0]
    assert stamp.startswith("t=")
    return int(stamp[2:])


def deliveries(outcome: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "usage_webhook_deliveries_total", {"outcome": outcome}
    )
    return value or 0.0


async def outbox_empty(db: asyncpg.Pool) -> bool:
    return await count(db, "usage_webhook_outbox") == 0


async def test_a_webhook_is_signed_and_verifiable_with_the_secret_alone(
    service: Service, plans: Plans, dsn: str, receiver: Receiver
) -> None:
    async with pool(dsn) as db:
        alert_id = await crossing(service, db, plans)
        async with deliverer(db, receiver.hook_url) as d:
            assert await d.deliver_due() == 1
        assert await outbox_empty(db)
    [call] = receiver.deliveries()
    verify = readme_verify()
    header = call.headers["usage-signature"]
    assert verify(SECRET, header, call.body)
    assert abs(signed_at(call) - time.time()) < 60
    assert not verify("whsec_another_secret_0000", header, call.body)
    assert not verify(SECRET, header, call.body.replace(b"800", b"900"))
    assert not verify(SECRET, header, call.body, now=signed_at(call) + 301)  # too old
    assert verify(SECRET, header, call.body, now=signed_at(call) + 299)
    assert call.headers["usage-event-id"] == alert_id
    assert call.headers["content-type"] == "application/json"
    event = json.loads(call.body)
    assert (event["id"], event["type"]) == (alert_id, "usage.threshold_crossed")
    data = event["data"]
    assert (data["customer_id"], data["feature"], data["threshold"]) == (
        "cus_1",
        "tokens",
        "80% of limit",
    )
    assert (data["amount"], data["used"]) == (800, 800)


async def test_a_receiver_failing_twice_gets_the_same_event_three_times(
    service: Service, plans: Plans, dsn: str, receiver: Receiver
) -> None:
    receiver.inject(Fault("status", 500), Fault("status", 503))
    rejected, delivered = deliveries("rejected"), deliveries("delivered")
    async with pool(dsn) as db:
        alert_id = await crossing(service, db, plans)
        async with deliverer(db, receiver.hook_url) as d, delivering(d):
            await eventually(lambda: outbox_empty(db))
    calls = receiver.deliveries()
    assert [c.status for c in calls] == [500, 503, 200]
    assert {c.headers["usage-event-id"] for c in calls} == {alert_id}
    assert len({c.body for c in calls}) == 1
    verify = readme_verify()
    assert all(verify(SECRET, c.headers["usage-signature"], c.body) for c in calls)
    assert (deliveries("rejected") - rejected, deliveries("delivered") - delivered) == (2, 1)


async def test_a_receiver_that_cannot_be_reached_is_retried_visibly(
    service: Service, plans: Plans, dsn: str, receiver: Receiver
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/hooks"
    failed = deliveries("network_error")
    async with pool(dsn) as db:
        alert_id = await crossing(service, db, plans)
        before = dt.datetime.now(dt.UTC)
        async with deliverer(db, closed) as d:
            assert await d.deliver_due() == 0
        [waiting] = await alerts.webhooks(db)
        assert waiting["attempts"] == 1
        assert waiting["last_error"].startswith("ConnectError")
        assert waiting["next_attempt_at"] > before  # backed off
        assert deliveries("network_error") - failed == 1
        async with deliverer(db, receiver.hook_url) as d, delivering(d):  # the receiver is back
            await eventually(lambda: outbox_empty(db))
    [call] = receiver.deliveries()
    assert call.headers["usage-event-id"] == alert_id


async def test_a_webhook_whose_sender_died_is_sent_once_its_lease_runs_out(
    service: Service, plans: Plans, dsn: str, receiver: Receiver
) -> None:
    async with pool(dsn) as db:
        alert_id = await crossing(service, db, plans)
        now = dt.datetime.now(dt.UTC)
        lease = dt.timedelta(milliseconds=300)
        assert await alerts.claim_webhook(db, "cus_1", alert_id, "dead", now, lease) is not None
        async with deliverer(db, receiver.hook_url) as d:
            assert await d.deliver_due() == 0  # leased to the dead sender
            await eventually(d.deliver_due)
    [call] = receiver.deliveries()
    assert call.headers["usage-event-id"] == alert_id


async def test_two_deliverers_send_each_webhook_once(
    service: Service, plans: Plans, dsn: str, receiver: Receiver
) -> None:
    await service.add_customer()
    await service.usage.RecordUsage(record(quantity=1000, key="all"))  # 80% and 100%
    for i in range(10):
        await service.usage.RecordUsage(record(meter="calls", key=f"c{i}"))  # 100% of included
    async with pool(dsn) as a, pool(dsn) as b:
        assert await alerter(a, plans).catch_up() == 3
        async with deliverer(a, receiver.hook_url) as one, deliverer(b, receiver.hook_url) as two:
            sent = await asyncio.gather(one.deliver_due(), two.deliver_due())
        assert sum(sent) == 3
        assert await outbox_empty(a)
    ids = [c.headers["usage-event-id"] for c in receiver.deliveries()]
    assert len(ids) == len(set(ids)) == 3


def test_webhook_settings() -> None:
    pair = {"USAGE_WEBHOOK_URL": "https://hooks.example.com/usage", "USAGE_WEBHOOK_SECRET": SECRET}
    s = AlertSettings.from_env(pair)
    t = s.target()
    assert t is not None and (t.url, t.secret) == (pair["USAGE_WEBHOOK_URL"], SECRET)
    assert SECRET not in repr(s) and SECRET not in str(s) and SECRET not in repr(t)
    assert AlertSettings.from_env({}).target() is None
    assert AlertSettings.from_env({}).interval == 10.0
    for one in ("USAGE_WEBHOOK_URL", "USAGE_WEBHOOK_SECRET"):
        with pytest.raises(ConfigError) as caught:
            AlertSettings.from_env({one: pair[one]})
        assert str(caught.value) == "USAGE_WEBHOOK_URL and USAGE_WEBHOOK_SECRET go together"
    with pytest.raises(ConfigError) as caught:
        AlertSettings.from_env({**pair, "USAGE_WEBHOOK_URL": "ftp://example.com"})
    assert str(caught.value) == (
        "USAGE_WEBHOOK_URL: 'ftp://example.com' is not an http:// or https:// URL"
    )
    with pytest.raises(ConfigError) as caught:
        AlertSettings.from_env({**pair, "USAGE_WEBHOOK_SECRET": "short-secret"})
    assert str(caught.value) == "USAGE_WEBHOOK_SECRET: must be at least 16 characters"


@pytest.mark.process
def test_serve_sends_a_signed_webhook_for_a_crossing(
    dsn: str, tmp_path: pathlib.Path, receiver: Receiver
) -> None:
    """`usage-service serve` as a process: usage past a threshold reaches the receiver."""
    plans_path = tmp_path / "plans.toml"
    plans_path.write_text(ALERT_PLANS)
    env = {
        "DATABASE_URL": dsn,
        "USAGE_PLANS_FILE": str(plans_path),
        "USAGE_WEBHOOK_URL": receiver.hook_url,
        "USAGE_WEBHOOK_SECRET": SECRET,
    }
    service = ServiceProcess(env)
    try:
        with grpc.insecure_channel(service.address) as channel:
            customers = customer_pb2_grpc.CustomerServiceStub(channel)
            customers.UpsertCustomer(customer_pb2.UpsertCustomerRequest(customer=active_customer()))
            usage = usage_pb2_grpc.UsageServiceStub(channel)
            usage.RecordUsage(record(quantity=850, key="a"))
        give_up = time.monotonic() + 30
        while not receiver.deliveries():
            assert time.monotonic() < give_up, "".join(service.output)
            time.sleep(0.05)
    finally:
        assert service.terminate() == 0
    [call] = receiver.deliveries()
    assert readme_verify()(SECRET, call.headers["usage-signature"], call.body)
    data = json.loads(call.body)["data"]
    assert (data["customer_id"], data["threshold"], data["used"]) == ("cus_1", "80% of limit", 850)
