"""usage.v1.UsageService."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import grpc
from pydantic import Field

from usage.v1 import usage_pb2, usage_pb2_grpc
from usage_service import domain, settings
from usage_service.api import convert, validation, watch
from usage_service.api.errors import customer_not_found, decision_not_found, out_of_range, rpc
from usage_service.api.validation import Violations
from usage_service.domain.errors import TotalOutOfRange
from usage_service.domain.ids import new_decision_id, new_event_id, new_event_ids
from usage_service.domain.plans import Plans
from usage_service.domain.rules import rule
from usage_service.storage import decisions
from usage_service.storage.store import Consumed, Store
from usage_service.storage.watch import Hub

Context = grpc.aio.ServicerContext[Any, Any]


class DecisionSettings(settings.Group):
    # keep denied checks for GetDecision too (consumes are always kept)
    keep_denials: settings.Flag = Field(False, validation_alias="USAGE_KEEP_DENIALS")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _serialized(answer: usage_pb2.CheckEntitlementResponse) -> bytes:
    return answer.SerializeToString(deterministic=True)


class UsageService(usage_pb2_grpc.UsageServiceServicer):
    def __init__(self, store: Store, plans: Plans, hub: Hub, keep_denials: bool = False) -> None:
        self.store = store
        self.plans = plans
        self.hub = hub
        self.keep_denials = keep_denials
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

        def decide(
            customer: domain.Customer, totals: domain.Totals, balance: int | None
        ) -> domain.Decision:
            assert meter is not None
            metered = self.plans.plans[customer.plan_id].metered[feature]
            return domain.decide(metered, meter.aggregation, totals, request.quantity, balance)

        if not request.consume:
            now = _now()
            read = await self.store.check_read(request.customer_id, feature, now)
            decision = gate(read.customer)
            if decision is None:
                assert read.customer is not None and read.period is not None
                metered = self.plans.plans[read.customer.plan_id].metered[feature]
                balance = None
                if metered.prepaid:
                    balance = (await self.store.check_credit(read, metered, now)).balance
                # a check consumes nothing: no units are covered by it
                decision = dataclasses.replace(
                    decide(read.customer, read.totals, balance), covered=0
                )
            answer = convert.decision_to_proto(
                decision,
                read.period,
                as_of=now,
                rule=rule(self.plans, read.customer.plan_id if read.customer else "", feature),
                version=read.version,
            )
            if not decision.allowed and self.keep_denials:
                answer.decision_id = new_decision_id()
                denial = decisions.Kept(
                    customer_id=request.customer_id,
                    decision_id=answer.decision_id,
                    feature=feature,
                    quantity=request.quantity,
                    consume=False,
                    allowed=False,
                    event_id=None,
                    response=_serialized(answer),
                    created_at=now,
                )
                await self.store.keep_decision(denial)
            return answer

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
        assert meter is not None

        replayed_credit: tuple[int, int] | None = None

        def answer_to(c: Consumed) -> usage_pb2.CheckEntitlementResponse:
            plan_id = c.customer.plan_id if c.customer else ""
            if c.duplicate:  # a replay, whatever happened to the customer since
                plan = self.plans.plans.get(plan_id)
                metered = plan.metered.get(feature) if plan else None
                decision = domain.replayed(metered, meter.aggregation, c.totals)
                if replayed_credit is not None:  # what its grants paid, and today's balance
                    balance, covered = replayed_credit
                    decision = dataclasses.replace(decision, balance=balance, covered=covered)
            else:
                assert c.decision is not None
                decision = c.decision
                if c.event_id:
                    decision = domain.after_consume(
                        decision, meter.aggregation, c.totals, request.quantity
                    )
            return convert.decision_to_proto(
                decision,
                c.period,
                c.event_id,
                c.duplicate,
                as_of=now,
                rule=rule(self.plans, plan_id, feature),
                version=c.version,
                decision_id=c.decision_id,
            )

        kept: list[tuple[Consumed, usage_pb2.CheckEntitlementResponse]] = []

        def keep(c: Consumed) -> bytes | None:
            assert c.decision is not None
            if not c.decision.allowed and not self.keep_denials:
                return None
            answer = answer_to(c)
            kept.append((c, answer))
            return _serialized(answer)

        try:
            result = await self.store.consume(
                event, gate, decide, self._metering.get(feature, ()), keep
            )
        except TotalOutOfRange:
            raise out_of_range("quantity") from None
        if kept and kept[-1][0] is result:  # answered as kept
            return kept[-1][1]
        replayed_credit = await self._replayed_credit(result, feature, now)
        return answer_to(result)

    async def _replayed_credit(
        self, c: Consumed, feature: str, now: dt.datetime
    ) -> tuple[int, int] | None:
        """For a replayed consume of a feature prepaid in the customer's plan: its balance now,
        and the units the replayed consume's grants paid for."""
        if not c.duplicate or c.customer is None or c.period is None:
            return None
        plan = self.plans.plans.get(c.customer.plan_id)
        metered = plan.metered.get(feature) if plan else None
        if metered is None or not metered.prepaid:
            return None
        credit = await self.store.credit(c.customer, {feature: metered}, c.period, now)
        covered = await self.store.burned_by(c.customer.customer_id, c.event_id)
        return credit[feature].balance, covered

    @rpc
    async def GetDecision(
        self, request: usage_pb2.GetDecisionRequest, context: Context
    ) -> usage_pb2.GetDecisionResponse:
        v = Violations()
        validation.uuid(v, "decision_id", request.decision_id)
        v.check()
        kept = await self.store.get_decision(request.decision_id)
        if kept is None:
            raise decision_not_found(request.decision_id)
        return usage_pb2.GetDecisionResponse(
            decision_id=kept.decision_id,
            customer_id=kept.customer_id,
            feature=kept.feature,
            quantity=kept.quantity,
            consume=kept.consume,
            response=usage_pb2.CheckEntitlementResponse.FromString(kept.response),
        )

    @rpc
    async def GetUsageSummary(
        self, request: usage_pb2.GetUsageSummaryRequest, context: Context
    ) -> usage_pb2.GetUsageSummaryResponse:
        v = Violations()
        validation.text(v, "customer_id", request.customer_id)
        if request.meter and request.meter not in self.plans.meters:
            v.add("meter", f"unknown meter {request.meter[:100]!r}")
        v.check()
        now = _now()
        found = await self.store.get_customer(request.customer_id, now)
        if found is None:
            raise customer_not_found(request.customer_id)
        customer, period = found
        totals = await self.store.period_totals(customer, period)
        plan = self.plans.plans.get(customer.plan_id)
        prepaid = {n: f for n, f in plan.metered.items() if f.prepaid} if plan else {}
        credit = await self.store.credit(customer, prepaid, period, now) if prepaid else {}
        meters = domain.summarise(self.plans, customer, totals, request.meter, credit)
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
