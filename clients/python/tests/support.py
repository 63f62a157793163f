"""Helpers shared by the live tests."""

from __future__ import annotations

import datetime as dt
import uuid

import usage_client

PERIOD = dt.timedelta(days=30)
# For tests that stop the server: bounded (at most ~60 s), and patient enough for a restart.
PATIENT = usage_client.RetryPolicy(max_attempts=120, initial_backoff=0.05, max_backoff=0.5)
# Reconnect soon after the server is back (the client's defaults allow up to 5 s between tries).
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 500)]


def new_customer(
    client: usage_client.UsageClient,
    plan_id: str = "starter",
    status: usage_client.SubscriptionStatus = usage_client.SubscriptionStatus.ACTIVE,
) -> usage_client.Customer:
    now = dt.datetime.now(dt.UTC)
    customer = usage_client.Customer(
        customer_id=f"cus_{uuid.uuid4().hex[:16]}",
        plan_id=plan_id,
        subscription_status=status,
        current_period_start_time=now - dt.timedelta(days=1),
        current_period_end_time=now - dt.timedelta(days=1) + PERIOD,
    )
    return client.upsert_customer(customer)
