"""Records <-> usage.v1 messages for the billing cadence, period source and unbilled fields, the
messages of WatchUsage, and prepaid credits."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from usage.v1 import credit_pb2, customer_pb2, usage_pb2

from usage_client import (
    BillingInterval,
    Customer,
    DecisionRule,
    EntitlementReason,
    GrantSource,
    GrantState,
    PeriodSource,
    SnapshotReason,
    SubscriptionStatus,
    ThresholdCrossing,
    UsageChangeKind,
    _convert,
)

START = dt.datetime(2026, 1, 31, 9, 0, tzinfo=dt.UTC)
END = dt.datetime(2026, 2, 28, 9, 0, tzinfo=dt.UTC)
BASE = Customer("cus_1", "starter", SubscriptionStatus.ACTIVE, START, END)


def test_the_cadence_and_anchor_are_sent() -> None:
    anchor = dt.datetime(2025, 10, 31, 9, 0, tzinfo=dt.UTC)
    message = _convert.customer_message(
        dataclasses.replace(
            BASE,
            billing_interval=BillingInterval.MONTH,
            billing_interval_count=3,
            billing_cycle_anchor_time=anchor,
        )
    )
    assert message.billing_interval == customer_pb2.BILLING_INTERVAL_MONTH
    assert message.billing_interval_count == 3
    assert message.billing_cycle_anchor_time.ToDatetime(tzinfo=dt.UTC) == anchor


def test_a_customer_without_cadence_sends_it_unspecified() -> None:
    read_back = dataclasses.replace(BASE, current_period_source=PeriodSource.PROJECTED)
    message = _convert.customer_message(read_back)
    assert message.billing_interval == customer_pb2.BILLING_INTERVAL_UNSPECIFIED
    assert message.billing_interval_count == 0
    assert not message.HasField("billing_cycle_anchor_time")
    assert message.current_period_source == customer_pb2.PERIOD_SOURCE_UNSPECIFIED  # output only


def test_a_naive_anchor_is_refused() -> None:
    with pytest.raises(ValueError, match="billing_cycle_anchor_time"):
        _convert.customer_message(
            dataclasses.replace(BASE, billing_cycle_anchor_time=dt.datetime(2026, 1, 31))
        )


def test_a_stored_customer_reads_its_cadence_and_period_source() -> None:
    message = _convert.customer_message(
        dataclasses.replace(
            BASE, billing_interval=BillingInterval.YEAR, billing_cycle_anchor_time=START
        )
    )
    message.current_period_source = customer_pb2.PERIOD_SOURCE_PROJECTED
    read = _convert.customer(message)
    assert read.billing_interval is BillingInterval.YEAR
    assert read.billing_interval_count == 0
    assert read.billing_cycle_anchor_time == START
    assert read.billing_cycle_anchor_time.tzinfo is not None
    assert read.current_period_source is PeriodSource.PROJECTED


def test_a_customer_without_anchor_reads_none() -> None:
    read = _convert.customer(_convert.customer_message(BASE))
    assert read.billing_cycle_anchor_time is None
    assert read.billing_interval is BillingInterval.UNSPECIFIED


def test_unknown_enum_values_read_as_unspecified() -> None:
    message = customer_pb2.Customer(billing_interval=99, current_period_source=99)  # type: ignore[arg-type]
    read = _convert.customer(message)
    assert read.billing_interval is BillingInterval.UNSPECIFIED
    assert read.current_period_source is PeriodSource.UNSPECIFIED


def test_entitlement_carries_the_period_source() -> None:
    response = usage_pb2.CheckEntitlementResponse(
        allowed=True, period_source=customer_pb2.PERIOD_SOURCE_CONFIRMED
    )
    assert _convert.entitlement(response).period_source is PeriodSource.CONFIRMED
    assert _convert.entitlement(usage_pb2.CheckEntitlementResponse()).period_source is (
        PeriodSource.UNSPECIFIED
    )


def test_summary_carries_the_period_source_and_unbilled_usage() -> None:
    response = usage_pb2.GetUsageSummaryResponse(
        customer_id="cus_1",
        period_source=customer_pb2.PERIOD_SOURCE_PROJECTED,
        meters=[usage_pb2.MeterUsage(meter="tokens", used=120, unbilled=120)],
    )
    result = _convert.summary(response)
    assert result.period_source is PeriodSource.PROJECTED
    assert result.meter("tokens").unbilled == 120
    assert result.meter("tokens").pending == 0


def test_a_watch_message_reads_as_a_usage_change() -> None:
    message = usage_pb2.WatchUsageResponse(
        version=42,
        kind=usage_pb2.USAGE_CHANGE_KIND_THRESHOLD,
        plan_id="starter",
        subscription_status=customer_pb2.SUBSCRIPTION_STATUS_PAST_DUE,
        meters=[usage_pb2.MeterUsage(meter="tokens", used=800, included=1000, limit=5000)],
        threshold=usage_pb2.ThresholdCrossing(
            alert_id="al_1", feature="tokens", threshold="80% of included", amount=800, used=801
        ),
    )
    message.commit_time.FromDatetime(START)
    message.period_start_time.FromDatetime(START)
    message.period_end_time.FromDatetime(END)
    change = _convert.usage_change(message)
    assert (change.version, change.kind, change.snapshot_reason) == (
        42,
        UsageChangeKind.THRESHOLD,
        SnapshotReason.UNSPECIFIED,
    )
    assert (change.commit_time, change.period_start_time, change.period_end_time) == (
        START,
        START,
        END,
    )
    assert (change.plan_id, change.subscription_status) == ("starter", SubscriptionStatus.PAST_DUE)
    assert (change.meter("tokens").used, change.meter("tokens").limit) == (800, 5000)
    assert change.meter("tokens").remaining is None  # not sent: unlimited
    assert change.threshold == ThresholdCrossing("al_1", "tokens", "80% of included", 800, 801)
    with pytest.raises(KeyError):
        change.meter("calls")


def test_a_bare_snapshot_and_unknown_values() -> None:
    message = usage_pb2.WatchUsageResponse(
        version=1, snapshot_reason=usage_pb2.SNAPSHOT_REASON_RESUME_TOO_OLD
    )
    message.kind = 99  # type: ignore[assignment]  # a kind added after this client was built
    change = _convert.usage_change(message)
    assert change.kind is UsageChangeKind.UNSPECIFIED
    assert change.snapshot_reason is SnapshotReason.RESUME_TOO_OLD
    assert (change.commit_time, change.period_start_time, change.threshold) == (None, None, None)
    assert change.meters == ()


def test_a_watch_request_resumes_only_when_told() -> None:
    fresh = _convert.watch_request("cus_1", ["tokens"], None)
    assert not fresh.HasField("resume_after_version") and list(fresh.meters) == ["tokens"]
    resumed = _convert.watch_request("cus_1", (), 0)
    assert resumed.HasField("resume_after_version") and resumed.resume_after_version == 0


def test_a_prepaid_check_reads_its_balance_and_an_arrears_one_none() -> None:
    prepaid = usage_pb2.CheckEntitlementResponse(
        allowed=False,
        reason=usage_pb2.ENTITLEMENT_REASON_BALANCE_EXHAUSTED,
        balance=0,
        rule=usage_pb2.DecisionRule(
            plan_id="p", feature="tokens", billing="prepaid", overage=False, limit=20, ceiling=30
        ),
    )
    read = _convert.entitlement(prepaid)
    assert (read.reason, read.balance, read.covered) == (EntitlementReason.BALANCE_EXHAUSTED, 0, 0)
    assert read.rule == DecisionRule(
        plan_id="p", feature="tokens", limit=20, billing="prepaid", overage=False, ceiling=30
    )
    consumed = _convert.entitlement(usage_pb2.CheckEntitlementResponse(balance=70, covered=30))
    assert (consumed.balance, consumed.covered) == (70, 30)
    arrears = _convert.entitlement(
        usage_pb2.CheckEntitlementResponse(rule=usage_pb2.DecisionRule(billing="arrears"))
    )
    assert arrears.balance is None
    assert arrears.rule is not None and arrears.rule.ceiling is None


def test_a_meter_reads_its_credits() -> None:
    message = usage_pb2.MeterUsage(
        meter="tokens",
        used=900,
        billing="prepaid",
        granted=1000,
        burned=700,
        balance=300,
        covered=700,
        billable_overage=200,
        ceiling=1500,
    )
    message.next_expire_time.FromDatetime(END)
    read = _convert.meter_usage(message)
    assert (read.billing, read.granted, read.burned, read.balance) == ("prepaid", 1000, 700, 300)
    assert (read.covered, read.billable_overage, read.ceiling) == (700, 200, 1500)
    assert read.next_expire_time == END
    bare = _convert.meter_usage(usage_pb2.MeterUsage(meter="tokens"))
    assert (bare.next_expire_time, bare.ceiling, bare.billing) == (None, None, "")


def test_a_grant_reads_with_its_optional_times() -> None:
    message = credit_pb2.Grant(
        grant_id="g_1",
        customer_id="cus_1",
        feature="tokens",
        amount=500,
        priority=2,
        source=credit_pb2.GRANT_SOURCE_TOP_UP,
        burned=120,
        remaining=380,
        state=credit_pb2.GRANT_STATE_ACTIVE,
        idempotency_key="pack-1",
    )
    message.effective_time.FromDatetime(START)
    message.create_time.FromDatetime(START)
    read = _convert.grant(message)
    assert (read.grant_id, read.amount, read.priority, read.burned, read.remaining) == (
        "g_1",
        500,
        2,
        120,
        380,
    )
    assert (read.source, read.state) == (GrantSource.TOP_UP, GrantState.ACTIVE)
    assert (read.effective_time, read.create_time) == (START, START)
    assert (read.expire_time, read.void_time) == (None, None)
    message.expire_time.FromDatetime(END)
    message.void_time.FromDatetime(END)
    message.state = credit_pb2.GRANT_STATE_VOIDED
    message.source = 99  # type: ignore[assignment]  # a source added after this client was built
    voided = _convert.grant(message)
    assert (voided.expire_time, voided.void_time, voided.state) == (END, END, GrantState.VOIDED)
    assert voided.source is GrantSource.UNSPECIFIED


def test_a_grant_request_sends_times_only_when_given() -> None:
    bare = _convert.create_grant_request("cus_1", "tokens", 10, "k", 0, None, None)
    assert not bare.HasField("effective_time") and not bare.HasField("expire_time")
    timed = _convert.create_grant_request("cus_1", "tokens", 10, "k", 3, START, END)
    assert timed.priority == 3
    assert timed.effective_time.ToDatetime(tzinfo=dt.UTC) == START
    assert timed.expire_time.ToDatetime(tzinfo=dt.UTC) == END
    with pytest.raises(ValueError, match="effective_time"):
        _convert.create_grant_request("cus_1", "tokens", 10, "k", 0, dt.datetime(2026, 1, 1), None)
