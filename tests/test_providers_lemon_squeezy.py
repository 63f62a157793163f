"""The Lemon Squeezy adapter against a fake: JSON:API records, and no blind re-sent increment."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
from collections.abc import Iterator

import httpx
import pytest
from fakes import event, report
from fakes.base import Fault
from fakes.lemon_squeezy import JSON_API, KEY, FakeLemonSqueezy

from usage_service import domain
from usage_service.domain import plans
from usage_service.domain.reports import Report
from usage_service.providers import outcome
from usage_service.providers.config import DEFAULT_LEMONSQUEEZY_SETTLE, Endpoint, ProviderSettings
from usage_service.providers.lemon_squeezy import CLOSED_PERIOD, HOLD, LemonSqueezy
from usage_service.providers.outcome import Outcome
from usage_service.settings import ConfigError

pytestmark = pytest.mark.slow  # over HTTP against the fake providers, timeouts included

LEMON = domain.Provider.LEMON_SQUEEZY
TIMEOUT = 0.2  # seconds
SETTLE = 0.2  # seconds


@pytest.fixture
def fake() -> Iterator[FakeLemonSqueezy]:
    server = FakeLemonSqueezy({"si_1": 10, "si_2": 0}).start()
    yield server
    server.stop()


@pytest.fixture
async def adapter(fake: FakeLemonSqueezy, plans: plans.Plans) -> LemonSqueezy:
    a = LemonSqueezy(Endpoint(KEY, fake.url), plans.meters, TIMEOUT, SETTLE)
    yield a
    await a.aclose()


async def send(adapter: LemonSqueezy, r: Report) -> tuple[Outcome, Report]:
    """As the drain does: store each checkpoint with the report, then send again."""
    for _ in range(4):
        answer = await adapter.send(r)
        if not isinstance(answer, outcome.Checkpoint):
            return answer, r
        r = dataclasses.replace(r, checkpoint=answer.state)
    raise AssertionError("too many checkpoints")


async def settled(r: Report) -> None:
    """Waits until the last post of `r` may no longer land, as the drain's retry delay does."""
    posted = dt.datetime.fromisoformat(r.checkpoint["posted_at"])
    left = (posted - dt.datetime.now(dt.UTC)).total_seconds() + r.checkpoint[HOLD]
    await asyncio.sleep(max(left, 0.0))


async def test_increment_reads_a_baseline_then_posts_one_record(fake, adapter) -> None:
    r = report(LEMON, event(quantity=3, subscription_item="si_1"), value=3)
    first = await adapter.send(r)
    assert isinstance(first, outcome.Checkpoint)
    assert first.state["baseline"] == 10 and first.state["period"] == fake.period_start
    assert fake.records == []  # nothing is sent before the baseline is stored
    answer = await adapter.send(dataclasses.replace(r, checkpoint=first.state))
    assert answer == outcome.Delivered()
    (post,) = fake.writes()
    assert post.headers["content-type"] == JSON_API and post.headers["accept"] == JSON_API
    assert post.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(post.body) == {
        "data": {
            "type": "usage-records",
            "attributes": {"quantity": 3, "action": "increment"},
            "relationships": {
                "subscription-item": {"data": {"type": "subscription-items", "id": "si_1"}}
            },
        }
    }
    assert fake.usage["si_1"] == 13
    assert fake.violations == []


@pytest.mark.parametrize("kind", ["drop", "hang", "status"])
async def test_an_unknown_outcome_is_reconciled_not_resent_blindly(fake, adapter, kind) -> None:
    fake.inject(Fault(kind, 500))
    r = report(LEMON, event(quantity=4, subscription_item="si_1"), value=4)
    answer, r = await send(adapter, r)
    assert isinstance(answer, outcome.Retry) and answer.after
    assert answer.after > SETTLE  # no new attempt before the write settled
    early, r = await send(adapter, r)
    assert isinstance(early, outcome.Retry) and "settle" in early.reason
    await settled(r)
    answer, r = await send(adapter, r)  # a later attempt, as after a restart
    assert answer in (outcome.Delivered(), outcome.Delivered(duplicate=True))
    assert fake.usage["si_1"] == 14  # landed exactly once
    posted = len(fake.writes())
    assert posted == (1 if kind == "drop" else 2)  # a dropped answer is never re-sent
    assert fake.violations == []


async def test_a_fresh_adapter_reconciles_a_stored_baseline(fake, adapter, plans) -> None:
    fake.inject(Fault("drop"))
    r = report(LEMON, event(quantity=2, subscription_item="si_1"), value=2)
    answer, r = await send(adapter, r)
    assert isinstance(answer, outcome.Retry)
    await settled(r)
    other = LemonSqueezy(Endpoint(KEY, fake.url), plans.meters, TIMEOUT, SETTLE)  # a replica
    try:
        assert await other.send(r) == outcome.Delivered(duplicate=True)
    finally:
        await other.aclose()
    assert fake.usage["si_1"] == 12 and len(fake.writes()) == 1


async def test_a_checkpoint_that_was_not_stored_never_skips_reconciling(fake, adapter) -> None:
    r = report(LEMON, event(quantity=2, subscription_item="si_1"), value=2)
    mine = await adapter.send(r)  # the drain fails to store this one (its lease ran out) ...
    assert isinstance(mine, outcome.Checkpoint)
    theirs = {"baseline": 10, "period": fake.period_start, "nonce": "another worker's"}
    fake.usage["si_1"] = 12  # ... while another worker stored its own and posted
    answer = await adapter.send(dataclasses.replace(r, checkpoint=theirs))
    assert answer == outcome.Delivered(duplicate=True)
    assert fake.writes() == []


async def test_set_meters_send_set_and_repeat_it_only_once_the_last_one_settled(
    fake, adapter
) -> None:
    """A set may be sent again, but not while an earlier one may still land: it would land
    after the newer set of the next report."""
    r = report(LEMON, event(meter="seats", quantity=5, subscription_item="si_2"), value=5)
    fake.inject(Fault("drop"))
    answer, r = await send(adapter, r)
    assert isinstance(answer, outcome.Retry) and answer.after is not None and answer.after > 0
    early = await adapter.send(r)
    assert isinstance(early, outcome.Retry) and "settle" in early.reason
    assert len(fake.writes()) == 1
    await settled(r)
    answer, r = await send(adapter, r)
    assert answer == outcome.Delivered()
    assert fake.records == [("si_2", "set", 5), ("si_2", "set", 5)]
    assert fake.usage["si_2"] == 5


async def test_429_honours_retry_after(fake, adapter) -> None:
    fake.inject(Fault("status", 429, {"Retry-After": "3"}, {"errors": [{"detail": "slow down"}]}))
    r = report(LEMON, event(meter="seats", quantity=1, subscription_item="si_2"), value=1)
    answer, _ = await send(adapter, r)
    assert answer == outcome.Retry("lemon squeezy 429: slow down", 3.0)


async def test_unknown_items_and_missing_items_are_permanent(fake, adapter) -> None:
    gone = report(LEMON, event(meter="seats", subscription_item="si_404"), value=1)
    answer = await adapter.send(gone)
    assert isinstance(answer, outcome.Failed) and "404" in answer.reason
    missing = report(LEMON, event(subscription_item=""), value=1)
    answer = await adapter.send(missing)
    assert isinstance(answer, outcome.Failed) and "subscription item" in answer.reason


async def test_a_period_change_during_an_unknown_outcome_is_parked(fake, adapter) -> None:
    fake.inject(Fault("drop"))
    r = report(LEMON, event(quantity=2, subscription_item="si_1"), value=2)
    answer, r = await send(adapter, r)
    now = dt.datetime.now(dt.UTC)
    fake.roll_over(now, now + dt.timedelta(days=30))
    await settled(r)
    answer, r = await send(adapter, r)
    assert isinstance(answer, outcome.Failed) and "period changed" in answer.reason


def previous_period(fake: FakeLemonSqueezy) -> dt.datetime:
    """A time in the period before the fake's current one."""
    return dt.datetime.fromisoformat(fake.period_start) - dt.timedelta(days=1)


async def test_lemon_squeezy_set_of_a_closed_period_is_parked_not_clobbering(fake, adapter) -> None:
    fake.usage["si_2"] = 3  # the current period's figure
    late = event(meter="seats", when=previous_period(fake), subscription_item="si_2")
    answer = await adapter.send(report(LEMON, late, value=10))  # the old period's value
    assert answer == outcome.Failed(CLOSED_PERIOD)
    assert fake.usage["si_2"] == 3 and fake.writes() == []
    assert fake.violations == []


async def test_lemon_squeezy_increment_of_a_closed_period_is_parked(fake, adapter) -> None:
    late = event(quantity=4, when=previous_period(fake), subscription_item="si_1")
    answer, _ = await send(adapter, report(LEMON, late, value=4))
    assert answer == outcome.Failed(CLOSED_PERIOD)
    assert fake.usage["si_1"] == 10 and fake.writes() == []


async def test_lemon_squeezy_events_of_a_period_not_started_there_wait(fake, adapter) -> None:
    now = dt.datetime.now(dt.UTC)
    fake.roll_over(now - dt.timedelta(days=30), now - dt.timedelta(seconds=1))  # not renewed yet
    answer = await adapter.send(
        report(LEMON, event(meter="seats", when=now, subscription_item="si_2"), value=2)
    )
    assert isinstance(answer, outcome.Retry) and "not started" in answer.reason
    fake.roll_over(now - dt.timedelta(days=30), now + dt.timedelta(seconds=adapter.hold / 2))
    answer = await adapter.send(
        report(LEMON, event(meter="seats", subscription_item="si_2"), value=2)
    )
    assert isinstance(answer, outcome.Retry) and "ends before" in answer.reason
    assert answer.after is not None and 1 <= answer.after <= adapter.hold / 2 + 1
    assert fake.writes() == []


async def test_lemon_squeezy_never_sends_a_quantity_of_zero(fake, adapter) -> None:
    zero_sum = report(LEMON, event(quantity=0, subscription_item="si_1"), value=0)
    assert await adapter.send(zero_sum) == outcome.Delivered()  # nothing to add
    zero_set = report(LEMON, event(meter="seats", quantity=0, subscription_item="si_2"), value=0)
    assert await adapter.send(zero_set) == outcome.Delivered()  # the item already shows 0
    fake.usage["si_2"] = 5
    answer = await adapter.send(zero_set)  # 0 cannot be set over 5: visible, never silent
    assert isinstance(answer, outcome.Failed) and "shows 5" in answer.reason
    assert fake.writes() == [] and fake.violations == []


async def test_lemon_squeezy_fake_refuses_what_the_sdk_would_not_send(fake) -> None:
    record = {
        "data": {
            "type": "usage-records",
            "attributes": {"quantity": 0, "action": "increment"},
            "relationships": {
                "subscription-item": {"data": {"type": "subscription-items", "id": "si_1"}}
            },
        }
    }
    headers = {"Authorization": f"Bearer {KEY}", "Accept": JSON_API, "Content-Type": JSON_API}
    async with httpx.AsyncClient(base_url=fake.url, headers=headers) as client:
        zero = await client.post("/v1/usage-records", json=record)
        record["data"]["attributes"] = {"quantity": 2, "action": "add"}  # type: ignore[index]
        action = await client.post("/v1/usage-records", json=record)
        plain = await client.get(
            "/v1/subscription-items/si_1/current-usage", headers={"Accept": "application/json"}
        )
        current = await client.get("/v1/subscription-items/si_1/current-usage")
    assert zero.status_code == 422 and action.status_code == 422
    (error,) = zero.json()["errors"]
    assert error["status"] == "422" and error["source"] == {"pointer": "/data/attributes/quantity"}
    assert {"detail", "title"} <= set(error)
    assert set(current.json()["meta"]) == {
        "period_start",
        "period_end",
        "quantity",
        "interval_unit",
        "interval_quantity",
    }
    assert plain.status_code == 200
    assert len(fake.violations) == 3 and fake.usage["si_1"] == 10


def test_lemon_squeezy_settle_seconds_is_validated() -> None:
    assert ProviderSettings.from_env({}).lemon_squeezy_settle == DEFAULT_LEMONSQUEEZY_SETTLE
    assert (
        ProviderSettings.from_env({"LEMONSQUEEZY_SETTLE_SECONDS": "2.5"}).lemon_squeezy_settle
        == 2.5
    )
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ConfigError, match="LEMONSQUEEZY_SETTLE_SECONDS"):
            ProviderSettings.from_env({"LEMONSQUEEZY_SETTLE_SECONDS": bad})
