"""usage.v1.CreditService: prepaid credits (grants) of metered features."""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc

from usage.v1 import credit_pb2, credit_pb2_grpc
from usage_service.api import convert, validation
from usage_service.api.errors import customer_not_found, grant_not_found, rpc
from usage_service.api.validation import Violations
from usage_service.domain import credits, ids
from usage_service.domain.credits import Grant, GrantSource, GrantState
from usage_service.domain.plans import Aggregation, Plans
from usage_service.storage.store import Store

Context = grpc.aio.ServicerContext[Any, Any]
MAX_PRIORITY = 2**31 - 1
MAX_PAST = dt.timedelta(minutes=5)  # how far back a new grant's effective time may be
# Keys the service gives the plan's own grants: a caller's key may not take their form.
_RESERVED_KEYS = tuple(f"{s.value}:" for s in (GrantSource.PLAN, GrantSource.ROLLOVER))

SOURCE_TO_PROTO = {
    GrantSource.PLAN: credit_pb2.GRANT_SOURCE_PLAN,
    GrantSource.ROLLOVER: credit_pb2.GRANT_SOURCE_ROLLOVER,
    GrantSource.TOP_UP: credit_pb2.GRANT_SOURCE_TOP_UP,
}
STATE_TO_PROTO = {
    GrantState.ACTIVE: credit_pb2.GRANT_STATE_ACTIVE,
    GrantState.PENDING: credit_pb2.GRANT_STATE_PENDING,
    GrantState.SPENT: credit_pb2.GRANT_STATE_SPENT,
    GrantState.EXPIRED: credit_pb2.GRANT_STATE_EXPIRED,
    GrantState.VOIDED: credit_pb2.GRANT_STATE_VOIDED,
}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def grant_to_proto(g: Grant, now: dt.datetime) -> credit_pb2.Grant:
    state = g.state(now)
    out = credit_pb2.Grant(
        grant_id=g.grant_id,
        customer_id=g.customer_id,
        feature=g.feature,
        amount=g.amount,
        priority=g.priority,
        effective_time=convert.ts(g.effective_at),
        source=SOURCE_TO_PROTO[g.source],
        burned=g.burned,
        remaining=g.amount - g.burned if state in (GrantState.ACTIVE, GrantState.PENDING) else 0,
        forfeited=g.forfeited(now),
        state=STATE_TO_PROTO[state],
        idempotency_key=g.idempotency_key,
        create_time=convert.ts(g.created_at),
    )
    if g.expires_at is not None:
        out.expire_time.CopyFrom(convert.ts(g.expires_at))
    if g.voided_at is not None:
        out.void_time.CopyFrom(convert.ts(g.voided_at))
    return out


class CreditService(credit_pb2_grpc.CreditServiceServicer):
    def __init__(self, store: Store, plans: Plans) -> None:
        self.store = store
        self.plans = plans

    def _feature(self, v: Violations, field: str, feature: str, required: bool = True) -> None:
        if not feature:
            if required:
                v.add(field, "must not be empty")
            return
        meter = self.plans.meters.get(feature)
        if meter is None:
            v.add(field, f"unknown meter {feature[:100]!r}")
        elif meter.aggregation not in (Aggregation.SUM, Aggregation.COUNT):
            v.add(field, f"grants need a sum or count meter, not a {meter.aggregation} one")

    @rpc
    async def CreateGrant(
        self, request: credit_pb2.CreateGrantRequest, context: Context
    ) -> credit_pb2.CreateGrantResponse:
        now = _now()
        v = Violations()
        validation.text(v, "customer_id", request.customer_id)
        self._feature(v, "feature", request.feature)
        if request.amount <= 0:
            v.add("amount", f"must be > 0, not {request.amount}")
        if request.priority < 0:
            v.add("priority", f"must be >= 0, not {request.priority}")
        validation.text(v, "idempotency_key", request.idempotency_key)
        if request.idempotency_key.startswith(_RESERVED_KEYS):
            v.add("idempotency_key", f"must not start with {' or '.join(_RESERVED_KEYS)}")
        effective = None
        if request.HasField("effective_time"):
            effective = validation.bounded_time(v, "effective_time", request.effective_time)
            if effective is not None and effective < now - MAX_PAST:
                v.add("effective_time", "must not be more than 5 minutes in the past")
        expires = None
        if request.HasField("expire_time"):
            expires = validation.bounded_time(v, "expire_time", request.expire_time)
            if expires is not None and expires <= (effective or now):
                v.add("expire_time", "must be after effective_time (default now)")
        v.check()
        found = await self.store.get_customer(request.customer_id, now)
        if found is None:
            raise customer_not_found(request.customer_id)
        customer, period = found
        grant = Grant(
            customer_id=request.customer_id,
            grant_id=ids.new_event_id(),
            feature=request.feature,
            amount=request.amount,
            priority=request.priority,
            effective_at=effective or now,
            expires_at=expires,
            source=GrantSource.TOP_UP,
            idempotency_key=request.idempotency_key,
            created_at=now,
        )
        fingerprint = credits.payload_hash(
            request.feature, request.amount, request.priority, effective, expires
        )
        stored, duplicate = await self.store.create_grant(grant, fingerprint, customer, period)
        return credit_pb2.CreateGrantResponse(
            grant=grant_to_proto(stored, now), duplicate=duplicate
        )

    @rpc
    async def VoidGrant(
        self, request: credit_pb2.VoidGrantRequest, context: Context
    ) -> credit_pb2.VoidGrantResponse:
        v = Violations()
        validation.text(v, "customer_id", request.customer_id)
        validation.uuid(v, "grant_id", request.grant_id)
        v.check()
        now = _now()
        found = await self.store.get_customer(request.customer_id, now)
        if found is None:
            raise grant_not_found(request.customer_id, request.grant_id)
        customer, period = found
        done = await self.store.void_grant(customer, request.grant_id, period, now)
        if done is None:
            raise grant_not_found(request.customer_id, request.grant_id)
        grant, voided = done
        return credit_pb2.VoidGrantResponse(grant=grant_to_proto(grant, now), voided=voided)

    @rpc
    async def ListGrants(
        self, request: credit_pb2.ListGrantsRequest, context: Context
    ) -> credit_pb2.ListGrantsResponse:
        v = Violations()
        validation.text(v, "customer_id", request.customer_id)
        self._feature(v, "feature", request.feature, required=False)
        v.check()
        now = _now()
        found = await self.store.get_customer(request.customer_id, now)
        if found is None:
            raise customer_not_found(request.customer_id)
        customer, period = found
        plan = self.plans.plans.get(customer.plan_id)
        made = {
            name: f
            for name, f in (plan.metered.items() if plan else ())
            if f.prepaid and f.grant is not None and request.feature in ("", name)
        }
        grants = await self.store.list_grants(customer, made, period, request.feature, now)
        live = (GrantState.ACTIVE, GrantState.PENDING)
        return credit_pb2.ListGrantsResponse(
            grants=[
                grant_to_proto(g, now)
                for g in grants
                if request.include_inactive or g.state(now) in live
            ]
        )
