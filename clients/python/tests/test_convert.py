"""Records <-> usage.v1 messages for the billing cadence, period source and unbilled fields."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from usage.v1 import customer_pb2, usage_pb2

from usage_client import BillingInterval, Customer, PeriodSource, SubscriptionStatus, _convert

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
