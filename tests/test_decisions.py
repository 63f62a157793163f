"""The decision trail: every CheckEntitlement answer says when it was decided, by which plan
rule and on which version of the customer's figures; consumes (and denials, when the service
keeps them) are kept, and GetDecision returns them exactly as they were answered."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from conftest import Service
from helpers import details, record

from usage.v1 import customer_pb2, usage_pb2, usage_pb2_grpc
from usage_service.api.server import start_server
from usage_service.domain import plans as plans_mod
from usage_service.storage import changes, connections, store

R = usage_pb2


def check(
    feature: str = "tokens",
    quantity: int = 0,
    consume: bool = False,
    key: str = "",
    customer_id: str = "cus_1",
) -> usage_pb2.CheckEntitlementRequest:
    return usage_pb2.CheckEntitlementRequest(
        customer_id=customer_id,
        feature=feature,
        quantity=quantity,
        consume=consume,
        idempotency_key=key,
    )


def get(decision_id: str) -> usage_pb2.GetDecisionRequest:
    return usage_pb2.GetDecisionRequest(decision_id=decision_id)


@pytest.fixture
async def keeping(service: Service, dsn: str, plans: plans_mod.Plans) -> AsyncIterator[Service]:
    """The same database served by a second server that keeps denials (USAGE_KEEP_DENIALS)."""
    st = store.Store(await connections.create_pool(dsn, size=5))
    running = await start_server(st, plans, "127.0.0.1:0", keep_denials=True)
    address = f"127.0.0.1:{running.port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        yield Service(
            usage=usage_pb2_grpc.UsageServiceStub(channel),
            customers=service.customers,
            channel=channel,
            db=service.db,
            address=address,
        )
    finally:
        await channel.close()
        await running.stop(1)
        await st.close()


async def test_a_consume_is_kept_exactly_as_answered(service: Service) -> None:
    await service.add_customer()
    before = dt.datetime.now(dt.UTC)
    answer = await service.usage.CheckEntitlement(check(quantity=300, consume=True, key="c"))
    after = dt.datetime.now(dt.UTC)
    assert answer.allowed and answer.event_id and answer.decision_id
    assert before <= answer.as_of_time.ToDatetime(tzinfo=dt.UTC) <= after
    kept = await service.usage.GetDecision(get(answer.decision_id))
    assert kept.response == answer  # the whole message, field by field
    assert kept.response.SerializeToString(deterministic=True) == answer.SerializeToString(
        deterministic=True
    )
    assert (kept.decision_id, kept.customer_id, kept.feature) == (
        answer.decision_id,
        "cus_1",
        "tokens",
    )
    assert (kept.quantity, kept.consume) == (300, True)
    # Upper case names the same decision.
    again = await service.usage.GetDecision(get(answer.decision_id.upper()))
    assert again == kept


async def test_a_replay_answers_with_the_original_decision(service: Service) -> None:
    await service.add_customer()
    first = await service.usage.CheckEntitlement(check(quantity=300, consume=True, key="c"))
    await service.usage.CheckEntitlement(check(quantity=5, consume=True, key="other"))
    replay = await service.usage.CheckEntitlement(check(quantity=300, consume=True, key="c"))
    assert replay.duplicate and replay.event_id == first.event_id
    assert replay.decision_id == first.decision_id
    assert replay.used == 305  # a replay's figures are today's
    kept = await service.usage.GetDecision(get(replay.decision_id))
    assert kept.response == first  # the decision itself, as it was answered then
    assert await service.db.fetchval("SELECT count(*) FROM decisions") == 2


@pytest.mark.parametrize("base", [0, 990])
async def test_racing_copies_of_a_consume_share_its_decision(service: Service, base: int) -> None:
    """Copies that waited for the original's lock find its key once they hold the lock (as a
    taken key, or, at the limit, before answering a denial): each answers its decision."""
    await service.add_customer()
    if base:
        await service.usage.RecordUsage(record(quantity=base, key="base"))
    answers = await asyncio.gather(
        *(
            service.usage.CheckEntitlement(check(quantity=10, consume=True, key="one"))
            for _ in range(16)
        )
    )
    assert all(a.allowed for a in answers)
    (original,) = [a for a in answers if not a.duplicate]
    assert {a.decision_id for a in answers} == {original.decision_id}
    kept = await service.usage.GetDecision(get(original.decision_id))
    assert kept.response == original


async def test_a_key_first_recorded_by_record_usage_replays_without_a_decision(
    service: Service,
) -> None:
    await service.add_customer()
    recorded = await service.usage.RecordUsage(record(quantity=7, key="k"))
    replay = await service.usage.CheckEntitlement(check(quantity=7, consume=True, key="k"))
    assert replay.duplicate and replay.event_id == recorded.event_id
    assert replay.decision_id == ""


async def test_plain_checks_and_denials_are_not_kept_by_default(service: Service) -> None:
    await service.add_customer()
    allowed = await service.usage.CheckEntitlement(check(quantity=1))
    denied = await service.usage.CheckEntitlement(check(quantity=5000, consume=True, key="d"))
    unknown = await service.usage.CheckEntitlement(check(customer_id="nobody"))
    assert allowed.allowed and not denied.allowed and not unknown.allowed
    assert (allowed.decision_id, denied.decision_id, unknown.decision_id) == ("", "", "")
    assert await service.db.fetchval("SELECT count(*) FROM decisions") == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.GetDecision(get(str(uuid.uuid4())))
    d = details(caught.value)
    assert (d.code, d.reason, d.domain) == (
        grpc.StatusCode.NOT_FOUND,
        "DECISION_NOT_FOUND",
        "usage.v1",
    )


async def test_denials_are_kept_when_the_service_keeps_them(
    service: Service, keeping: Service
) -> None:
    await service.add_customer()
    await service.add_customer("off", status=customer_pb2.SUBSCRIPTION_STATUS_CANCELED)
    await keeping.usage.CheckEntitlement(check(quantity=990, consume=True, key="base"))
    denials = [
        check(quantity=11, consume=True, key="over"),  # a consume past the hard limit
        check(quantity=11),  # a plain check past it
        check(feature="audit_log"),  # not in the plan
        check(customer_id="off", quantity=1, consume=True, key="k"),  # inactive
        check(customer_id="nobody"),  # unknown
    ]
    for request in denials:
        answer = await keeping.usage.CheckEntitlement(request)
        assert not answer.allowed and answer.decision_id, request
        kept = await keeping.usage.GetDecision(get(answer.decision_id))
        assert kept.response == answer, request
        assert (kept.customer_id, kept.feature, kept.quantity, kept.consume) == (
            request.customer_id,
            request.feature,
            request.quantity,
            request.consume,
        )
    # A denied consume records nothing; allowed plain checks are never kept.
    assert await service.count_events() == 1
    allowed = await keeping.usage.CheckEntitlement(check(quantity=10))
    assert allowed.allowed and allowed.decision_id == ""
    assert await service.db.fetchval("SELECT count(*) FROM decisions") == 1 + len(denials)


async def test_the_version_is_the_consumes_own_and_what_the_next_check_reads(
    service: Service,
) -> None:
    await service.add_customer()
    versions = []
    for i in range(3):
        consumed = await service.usage.CheckEntitlement(
            check(quantity=10, consume=True, key=f"c{i}")
        )
        checked = await service.usage.CheckEntitlement(check())
        assert consumed.totals_version > 0
        assert checked.totals_version == consumed.totals_version
        assert checked.used == consumed.used == 10 * (i + 1)
        versions.append(consumed.totals_version)
    assert versions == sorted(set(versions))
    head = await changes.head(service.db, "cus_1")
    assert head == versions[-1]
    # The change each consume committed holds the figures its answer gave.
    logged = await changes.since(service.db, "cus_1", 0, 100)
    consumes = {c.version: c.change for c in logged if c.version in versions}
    assert [consumes[v].figures["tokens"].quantity_sum for v in versions] == [10, 20, 30]
    assert all(c.kind == "usage" for c in consumes.values())
    # A replay, a denial and a check of an unknown customer commit nothing: they read.
    replay = await service.usage.CheckEntitlement(check(quantity=10, consume=True, key="c0"))
    denied = await service.usage.CheckEntitlement(check(quantity=5000, consume=True, key="x"))
    assert replay.totals_version == denied.totals_version == head
    # Recorded usage is a change too: the next check reads its version with its figures.
    await service.usage.RecordUsage(record(quantity=5, key="r"))
    after = await service.usage.CheckEntitlement(check())
    assert after.totals_version == await changes.head(service.db, "cus_1") > head
    assert after.used == 35
    unknown = await service.usage.CheckEntitlement(check(customer_id="nobody"))
    assert unknown.totals_version == 0


async def test_the_rule_that_decided(service: Service) -> None:
    await service.add_customer()
    await service.add_customer("payg", plan_id="metered")
    await service.add_customer("off", status=customer_pb2.SUBSCRIPTION_STATUS_PAST_DUE)

    async def rule(feature: str, customer_id: str = "cus_1") -> usage_pb2.DecisionRule:
        answer = await service.usage.CheckEntitlement(
            check(feature=feature, customer_id=customer_id)
        )
        return answer.rule

    assert await rule("tokens") == R.DecisionRule(
        plan_id="basic",
        feature="tokens",
        included=100,
        limit=1000,
        enforcement="hard",
        billing="arrears",
    )
    assert await rule("calls") == R.DecisionRule(
        plan_id="basic",
        feature="calls",
        included=10,
        limit=20,
        enforcement="soft",
        billing="arrears",
    )
    unlimited = await rule("tokens", "payg")
    assert unlimited == R.DecisionRule(
        plan_id="metered", feature="tokens", included=0, enforcement="hard", billing="arrears"
    )
    assert not unlimited.HasField("limit")
    assert await rule("sso") == R.DecisionRule(plan_id="basic", feature="sso", enabled=True)
    # Denials say what is known: the plan without the feature, the inactive customer's rule,
    # only the feature for an unknown customer.
    assert await rule("audit_log") == R.DecisionRule(plan_id="basic", feature="audit_log")
    assert await rule("tokens", "off") == await rule("tokens")
    assert await rule("tokens", "nobody") == R.DecisionRule(feature="tokens")
    consumed = await service.usage.CheckEntitlement(check(quantity=1, consume=True, key="k"))
    assert consumed.rule == await rule("tokens")


async def test_concurrent_consumes_get_their_own_decisions_in_commit_order(
    service: Service,
) -> None:
    await service.add_customer()
    answers = await asyncio.gather(
        *(
            service.usage.CheckEntitlement(check(quantity=10, consume=True, key=f"r{i}"))
            for i in range(32)
        )
    )
    assert all(a.allowed and not a.duplicate for a in answers)
    assert len({a.decision_id for a in answers}) == 32
    assert len({a.totals_version for a in answers}) == 32
    # One feature's consumes commit one after another: usage grows in commit order, and so
    # do the versions.
    by_commit = sorted(answers, key=lambda a: a.used)
    assert [a.used for a in by_commit] == [10 * (i + 1) for i in range(32)]
    versions = [a.totals_version for a in by_commit]
    assert versions == sorted(versions)
    logged = await changes.since(service.db, "cus_1", 0, 100)
    consumes = {c.version: c.change for c in logged if c.version in versions}
    assert [consumes[v].figures["tokens"].quantity_sum for v in versions] == [
        a.used for a in by_commit
    ]
    kept = await asyncio.gather(*(service.usage.GetDecision(get(a.decision_id)) for a in answers))
    assert [k.response for k in kept] == list(answers)
    assert await service.db.fetchval("SELECT count(*) FROM decisions") == 32


async def test_consumes_racing_recorders_of_the_same_customer(service: Service) -> None:
    """Consumes and RecordUsage calls of one customer, on the consumed meter and another, all
    commit (no lock-order deadlock) with versions of their own."""
    await service.add_customer()
    calls = [
        service.usage.CheckEntitlement(check(quantity=1, consume=True, key=f"c{i}"))
        for i in range(16)
    ]
    calls += [
        service.usage.RecordUsage(record(meter="tokens" if i % 2 else "calls", key=f"r{i}"))
        for i in range(16)
    ]
    answers = await asyncio.gather(*calls)
    consumed = answers[:16]
    assert all(a.allowed and a.decision_id for a in consumed)
    assert len({a.totals_version for a in consumed}) == 16
    logged = await changes.since(service.db, "cus_1", 0, 1000)
    assert {a.totals_version for a in consumed} <= {c.version for c in logged}
    last = await service.usage.CheckEntitlement(check())
    assert last.used == 24 and last.totals_version == logged[-1].version


async def test_racing_consumes_at_the_limit_keep_allowed_and_denied_alike(
    service: Service, keeping: Service
) -> None:
    """Callers race for the last 50 units: each answer, allowed or denied, is kept as given,
    and a denial is at a version at or after the last allowed consume it saw."""
    await service.add_customer()
    await service.usage.RecordUsage(record(quantity=950, key="base"))
    answers = await asyncio.gather(
        *(
            keeping.usage.CheckEntitlement(check(quantity=10, consume=True, key=f"r{i}"))
            for i in range(12)
        )
    )
    granted = [a for a in answers if a.allowed]
    denied = [a for a in answers if not a.allowed]
    assert len(granted) == 5 and len(denied) == 7
    last = max(a.totals_version for a in granted)
    assert all(a.used == 1000 and a.totals_version == last for a in denied)
    kept = await asyncio.gather(*(keeping.usage.GetDecision(get(a.decision_id)) for a in answers))
    assert [k.response for k in kept] == list(answers)


@pytest.mark.parametrize(
    ("decision_id", "problem"),
    [
        ("", "must not be empty"),
        ("not-a-uuid", "must be a UUID"),
        ("4b2725aff23c48b9a0f603c67a41627d", "must be a UUID"),  # no hyphens
        ("4b2725af-f23c-48b9-a0f6-03c67a41627d0", "must be a UUID"),  # one digit too many
    ],
)
async def test_get_decision_needs_a_uuid(service: Service, decision_id: str, problem: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.GetDecision(get(decision_id))
    d = details(caught.value)
    assert (d.code, d.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert problem in d.fields["decision_id"]
