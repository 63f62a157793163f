"""usage.v1.UsageService."""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc

from usage.v1 import usage_pb2, usage_pb2_grpc
from usage_service import domain
from usage_service.api import convert, validation, watch
from usage_service.api.errors import customer_not_found, out_of_range, rpc
from usage_service.api.validation import Violations
from usage_service.domain.errors import TotalOutOfRange
from usage_service.domain.ids import new_event_id, new_event_ids
from usage_service.domain.plans import Plans
from usage_service.storage.store import Store
from usage_service.storage.watch import Hub

Context = grpc.aio.ServicerContext[Any, Any]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UsageService(usage_pb2_grpc.UsageServiceServicer):
    def __init__(self, store: Store, plans: Plans, hub: Hub) -> None:
        self.store = store
        self.plans = plans
        self.hub = hub
        # meter -> the plans that meter it (where a consume locks the totals row)
        self._metering = {
            meter: tuple(
                pid
                for pid, p in plans.plans.items()
                if meter in p.metered and meter not in p.enabled
            )
            for meter in plans.meters
        }

    @rpc
    async def RecordUsage(
        self, request: usage_pb2.RecordUsageRequest, context: Context
    ) -> usage_pb2.RecordUsageResponse:
        v = Violations()
        event = validation.usage_event(v, "", request, self.plans, _now())
        v.check()
        assert event is not None
        try:
            (answer,) = await self.store.submit([event])
        except TotalOutOfRange:
            raise out_of_range("quantity") from None
        return usage_pb2.RecordUsageResponse(event_id=answer.event_id, duplicate=answer.duplicate)

    @rpc
    async def BatchRecordUsage(
        self, request: usage_pb2.BatchRecordUsageRequest, context: Context
    ) -> usage_pb2.BatchRecordUsageResponse:
        v = Violations()
        count = len(request.requests)
        if not 1 <= count <= validation.MAX_BATCH:
            v.add("requests", f"must hold 1..{validation.MAX_BATCH} requests, not {count}")
            v.check()
        now = _now()
        ids = new_event_ids(count)
        events = [
            validation.usage_event(v, f"requests[{i}].", item, self.plans, now, ids[i])
            for i, item in enumerate(request.requests)
        ]
        v.check()
        stored = [e for e in events if e is not None]
        try:
            first = domain.first_overflow(stored, {})
            if first >= 0:
                raise TotalOutOfRange(first)
            answers = await self.store.submit(stored)
        except TotalOutOfRange as exc:
            raise out_of_range(f"requests[{exc.index}].quantity") from None
        response = usage_pb2.BatchRecordUsageResponse()
        add = response.responses.add
        for a in answers:
            if a.duplicate:
                add(event_id=a.event_id, duplicate=True)
            else:
                add(event_id=a.event_id)
        return response

    @rpc
    async def CheckEntitlement(
        self, request: usage_pb2.CheckEntitlementRequest, context: Context
    ) -> usage_pb2.CheckEntitlementResponse:
        v = Violations()
        validation.text(v, "customer_id", request.customer_id)
        validation.text(v, "feature", request.feature)
        if request.quantity < 0:
            v.add("quantity", f"must be >= 0, not {request.quantity}")
        if request.consume:
            validation.text(v, "idempotency_key", request.idempotency_key)
            if request.quantity == 0:
                v.add("quantity", "consume needs a quantity > 0")
            if request.feature and request.feature not in self.plans.meters:
                v.add("feature", "consume needs a metered feature (a meter in the plans file)")
            validation.properties(
                v, "properties", request.properties, self.plans.meters.get(request.feature)
            )
        v.check()
        feature = request.feature
        meter = self.plans.meters.get(feature)

        def gate(customer: domain.Customer | None) -> domain.Decision | None:
            return domain.gate(customer, self.plans, feature)

        def decide(customer: domain.Customer, totals: domain.Totals) -> domain.Decision:
            assert meter is not None
            metered = self.plans.plans[customer.plan_id].metered[feature]
            return domain.decide(metered, meter.aggregation, totals, request.quantity)

        if not request.consume:
            read = await self.store.check_read(request.customer_id, feature, _now())
            decision = gate(read.customer)
            if decision is None:
                assert read.customer is not None
                decision = decide(read.customer, read.totals)
            return convert.decision_to_proto(decision, read.period)

        now = _now()
        event = domain.UsageEvent(
            event_id=new_event_id(),
            customer_id=request.customer_id,
            meter=feature,
            quantity=request.quantity,
            idempotency_key=request.idempotency_key,
            event_time=now,
            properties=dict(request.properties),
            payload_hash=domain.payload_hash(feature, request.quantity, None, request.properties),
        )
        try:
            result = await self.store.consume(event, gate, decide, self._metering.get(feature, ()))
        except TotalOutOfRange:
            raise out_of_range("quantity") from None
        customer = result.customer
        if result.duplicate:  # a replay, whatever happened to the customer since
            assert meter is not None
            plan = self.plans.plans.get(customer.plan_id) if customer else None
            metered = plan.metered.get(feature) if plan else None
            answer = domain.replayed(metered, meter.aggregation, result.totals)
            return convert.decision_to_proto(answer, result.period, result.event_id, True)
        assert result.decision is not None
        if not result.decision.allowed:
            return convert.decision_to_proto(result.decision, result.period)
        answer = result.decision
        if result.event_id:
            assert meter is not None
            answer = domain.after_consume(
                answer, meter.aggregation, result.totals, request.quantity
            )
        return convert.decision_to_proto(answer, result.period, result.event_id)

    @rpc
    async def GetUsageSummary(
        self, request: usage_pb2.GetUsageSummaryRequest, context: Context
    ) -> usage_pb2.GetUsageSummaryResponse:
        v = Violations()
        validation.text(v, "customer_id", request.customer_id)
        if request.meter and request.meter not in self.plans.meters:
            v.add("meter", f"unknown meter {request.meter[:100]!r}")
        v.check()
        found = await self.store.get_customer(request.customer_id, _now())
        if found is None:
            raise customer_not_found(request.customer_id)
        customer, period = found
        totals = await self.store.period_totals(customer, period)
        meters = domain.summarise(self.plans, customer, totals, request.meter)
        return usage_pb2.GetUsageSummaryResponse(
            customer_id=customer.customer_id,
            plan_id=customer.plan_id,
            period_start_time=convert.ts(period.start),
            period_end_time=convert.ts(period.end),
            subscription_status=convert.STATUS_TO_PROTO[customer.subscription_status],
            meters=[convert.meter_to_proto(m) for m in meters],
            period_source=convert.SOURCE_TO_PROTO[period.source],
        )

    async def WatchUsage(self, request: usage_pb2.WatchUsageRequest, context: Context) -> None:
        await watch.serve(self.hub, self.plans, request, context)
