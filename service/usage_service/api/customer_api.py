"""usage.v1.CustomerService."""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc

from usage.v1 import customer_pb2, customer_pb2_grpc
from usage_service import domain
from usage_service.api import convert, validation
from usage_service.api.errors import customer_not_found, rpc
from usage_service.api.validation import Violations
from usage_service.domain import periods
from usage_service.domain.plans import Plans
from usage_service.storage import history
from usage_service.storage.store import Store

Context = grpc.aio.ServicerContext[Any, Any]


class CustomerService(customer_pb2_grpc.CustomerServiceServicer):
    def __init__(self, store: Store, plans: Plans) -> None:
        self.store = store
        self.plans = plans

    @rpc
    async def UpsertCustomer(
        self, request: customer_pb2.UpsertCustomerRequest, context: Context
    ) -> customer_pb2.UpsertCustomerResponse:
        c = request.customer
        v = Violations()
        if not request.HasField("customer"):
            v.add("customer", "is required")
            v.check()
        validation.text(v, "customer.customer_id", c.customer_id)
        if not c.plan_id:
            v.add("customer.plan_id", "must not be empty")
        elif c.plan_id not in self.plans.plans:
            v.add("customer.plan_id", f"unknown plan {c.plan_id[:100]!r}")
        status = convert.STATUS_FROM_PROTO.get(c.subscription_status)
        if status is None:
            v.add("customer.subscription_status", "must be set to a known status")
        provider = convert.PROVIDER_FROM_PROTO.get(c.provider)
        if provider is None:
            v.add("customer.provider", "unknown provider")
        validation.provider_customer_id(
            v, "customer.provider_customer_id", provider, c.provider_customer_id
        )
        start = _period_time(v, c, "current_period_start_time")
        end = _period_time(v, c, "current_period_end_time")
        if start and end and start >= end:
            v.add("customer.current_period_end_time", "must be after current_period_start_time")
        asked = _cadence(v, c)
        for meter, item in c.subscription_items.items():
            if meter not in self.plans.meters:
                v.add(f"customer.subscription_items[{meter[:100]!r}]", "unknown meter")
            validation.text(v, f"customer.subscription_items[{meter[:100]!r}]", item)
        v.check()
        assert status is not None and provider is not None and start and end and asked
        saved, period = await self.store.upsert_customer(
            domain.Customer(
                customer_id=c.customer_id,
                plan_id=c.plan_id,
                subscription_status=status,
                period_start=start,
                period_end=end,
                cadence=periods.Cadence(periods.Interval.MONTH, 1, end),  # set by the store
                provider=provider,
                provider_customer_id=c.provider_customer_id,
                subscription_items=dict(c.subscription_items),
            ),
            asked,
            _now(),
        )
        return customer_pb2.UpsertCustomerResponse(
            customer=convert.customer_to_proto(saved, period)
        )

    @rpc
    async def GetCustomer(
        self, request: customer_pb2.GetCustomerRequest, context: Context
    ) -> customer_pb2.GetCustomerResponse:
        v = Violations()
        validation.text(v, "customer_id", request.customer_id)
        v.check()
        found = await self.store.get_customer(request.customer_id, _now())
        if found is None:
            raise customer_not_found(request.customer_id)
        return customer_pb2.GetCustomerResponse(customer=convert.customer_to_proto(*found))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _period_time(v: Violations, c: customer_pb2.Customer, name: str) -> dt.datetime | None:
    if not c.HasField(name):
        v.add(f"customer.{name}", "is required")
        return None
    return validation.bounded_time(v, f"customer.{name}", getattr(c, name))


def _cadence(v: Violations, c: customer_pb2.Customer) -> history.CadenceRequest | None:
    """The cadence asked for: none (infer it), or an interval with a count and an anchor."""
    before = len(v)
    interval = None
    if c.billing_interval != customer_pb2.BILLING_INTERVAL_UNSPECIFIED:
        interval = convert.INTERVAL_FROM_PROTO.get(c.billing_interval)
        if interval is None:
            v.add("customer.billing_interval", "unknown billing interval")
    count = c.billing_interval_count or 1
    if interval is None and c.billing_interval_count:
        v.add("customer.billing_interval_count", "needs a billing_interval")
    elif interval is not None and not 1 <= count <= periods.MAX_INTERVAL_COUNT[interval]:
        v.add(
            "customer.billing_interval_count",
            f"must be 1..{periods.MAX_INTERVAL_COUNT[interval]} for {interval.value}, not {count}",
        )
    anchor = None
    if c.HasField("billing_cycle_anchor_time"):
        anchor = validation.bounded_time(
            v, "customer.billing_cycle_anchor_time", c.billing_cycle_anchor_time
        )
    if len(v) > before:
        return None
    return history.CadenceRequest(interval, count, anchor)
