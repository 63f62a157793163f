"""A group of check-and-consumes of one customer's meter, decided in arrival order against its
locked totals row (and grants), as if each ran alone after the ones before it. Pure: the store
does the reads and writes (Store.consume)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, TypeAlias

import asyncpg

from usage_service import domain
from usage_service.domain import credits as model
from usage_service.domain import periods
from usage_service.domain.errors import KeyConflict
from usage_service.domain.plans import Aggregation, MeteredFeature
from usage_service.storage import credits, idempotency


@dataclasses.dataclass(frozen=True)
class Consumed:
    """The outcome of a check-and-consume. For a replayed key, `decision` is None and `totals`
    already hold the earlier consumption. `period`: the one containing the event. `version`:
    the customer's change version the figures are at (for a consume, the one it committed as).
    `decision_id`: the kept decision ('' none; a replay's is the original consume's)."""

    customer: domain.Customer | None
    decision: domain.Decision | None
    totals: domain.Totals = dataclasses.field(default_factory=domain.Totals)
    event_id: str = ""
    duplicate: bool = False
    period: periods.Period | None = None
    version: int = 0
    decision_id: str = ""


# Given a decision of a consume (with the id it is to be kept under), its answer serialized to
# be kept, or None when the decision is not to be kept.
Keep: TypeAlias = Callable[[Consumed], bytes | None]
Gate: TypeAlias = Callable[[domain.Customer | None], domain.Decision | None]
Decide: TypeAlias = Callable[[domain.Customer, domain.Totals, int | None], domain.Decision]


def keep_nothing(consumed: Consumed) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Request:
    """One check-and-consume: the event it would store, and its caller's rules."""

    event: domain.UsageEvent
    gate: Gate
    decide: Decide
    metering_plans: Sequence[str] = ()
    keep: Keep = keep_nothing


class Seen(NamedTuple):
    """The event stored under a consume's key, and the decision that consumed it ('' none)."""

    event_id: str
    payload_hash: bytes
    decision_id: str


def seen_in(rows: Sequence[asyncpg.Record]) -> dict[str, Seen]:
    """Key -> the event stored under it, from rows with seen_* columns (CONSUME_LOCK)."""
    found = {}
    for r in rows:
        owner = idempotency.key_owner(r["seen_event_id"], r["seen_payload_hash"])
        if owner is not None:
            decision = r["seen_decision_id"]
            found[r["seen_key"]] = Seen(*owner, "" if decision is None else str(decision))
    return found


@dataclasses.dataclass(frozen=True)
class Credit:
    """A prepaid feature's grants as locked for the group, and the time they burn at."""

    feature: MeteredFeature
    aggregation: Aggregation
    grants: Sequence[model.Grant]
    burn_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Planned:
    """What the group does with one request. `before`: the figures it was decided on (those
    of the consumes allowed before it, `allowed_before` of them). An allowed consume has
    `after` (and its feature's `credit` detail, for the change log); a replay names the stored
    event (`seen`) or the earlier request of the group that consumed its key (`winner`)."""

    request: Request
    before: domain.Totals
    allowed_before: int
    decision: domain.Decision | None = None
    gated: bool = False
    seen: Seen | None = None
    winner: int = -1
    after: domain.Totals | None = None
    credit: Mapping[str, list[object]] | None = None


@dataclasses.dataclass
class Group:
    """Requests of one customer's meter in one period (`customer` None: unknown), in arrival
    order; `seen` the keys found stored; `fresh` whether they (and `head`, the customer's
    change version) were read once the locks were held; `totals` the locked row (None: not
    locked, as nothing needs deciding); `credit` the locked grants of a prepaid feature."""

    customer: domain.Customer | None
    period: periods.Period | None
    requests: Sequence[Request]
    seen: dict[str, Seen]
    fresh: bool = False
    head: int | None = None
    totals: domain.Totals | None = None
    credit: Credit | None = None
    decided: list[Planned] = dataclasses.field(default_factory=list)

    def deciding(self) -> bool:
        """Whether any request needs the totals decided (not a replay, not gated)."""
        return self.customer is not None and any(
            r.event.idempotency_key not in self.seen and r.gate(self.customer) is None
            for r in self.requests
        )

    def saw(self, seen: dict[str, Seen], head: int) -> bool:
        """Takes keys and the version read once the locks are held; whether any key is new."""
        new = seen.keys() - self.seen.keys()
        self.seen, self.head, self.fresh = seen, head, True
        return bool(new)

    def decide(self) -> None:
        """Plans every request in order: a key stored or consumed earlier in the group is a
        replay; else the gate, then the decision on the figures the ones before left."""
        totals = self.totals or domain.Totals()
        grants = list(self.credit.grants) if self.credit else []
        winners: dict[str, int] = {}
        allowed = 0
        self.decided = []
        for n, r in enumerate(self.requests):
            e = r.event
            seen = self.seen.get(e.idempotency_key)
            if seen is not None or e.idempotency_key in winners:
                winner = winners.get(e.idempotency_key, -1)
                self.decided.append(Planned(r, totals, allowed, seen=seen, winner=winner))
                continue
            denial = r.gate(self.customer)
            if denial is not None or self.customer is None:
                self.decided.append(Planned(r, totals, allowed, denial, gated=True))
                continue
            balance = None
            if self.credit is not None:
                balance = model.balance(grants, self.credit.burn_at, at=e.event_time)
            decision = r.decide(self.customer, totals, balance)
            if not decision.allowed:
                self.decided.append(Planned(r, totals, allowed, decision))
                continue
            unbilled = self.customer.provider is domain.Provider.NONE
            after = totals.plus(e.quantity, e.event_time, unbilled)
            detail = None
            if self.credit is not None:
                assert self.period is not None
                c = self.credit
                (burned,), grants = model.burn(
                    grants, c.aggregation, [(e.quantity, e.event_time)], c.burn_at
                )
                state = "unbilled" if unbilled else "pending"
                cover = model.covering(c.feature, c.aggregation, e.quantity, burned, state)
                after = after.billed_as(cover.counts(state, e.quantity))
                detail = credits.credit_detail(
                    self.customer.customer_id, c.feature, grants, self.period, c.burn_at
                )
            self.decided.append(Planned(r, totals, allowed, decision, after=after, credit=detail))
            winners[e.idempotency_key] = n
            totals = after
            allowed += 1

    def allowed(self) -> list[Planned]:
        return [p for p in self.decided if p.after is not None]

    def needs_fresh_keys(self) -> bool:
        """Whether a denial was decided on keys read before the locks were held: its key may
        have been consumed meanwhile (then it is a replay)."""
        return not self.fresh and any(
            p.decision is not None and not p.decision.allowed and not p.gated for p in self.decided
        )

    def needs_head(self) -> bool:
        """Whether an answer is at the version before the group's consumes."""
        return any(p.after is None and p.winner < 0 and p.allowed_before == 0 for p in self.decided)

    def outcomes(self, versions: Sequence[int], head: int) -> list[Consumed | BaseException]:
        """Each request's outcome, given the versions the allowed consumes committed as and
        the version before them (decision ids of replays of the group: `replays_of`)."""

        def version(allowed_before: int) -> int:
            return versions[allowed_before - 1] if allowed_before else head

        out: list[Consumed | BaseException] = []
        for p in self.decided:
            e = p.request.event
            c, period, before = self.customer, self.period, p.before
            if p.seen is not None or p.winner >= 0:  # as it is now: after the ones before
                if p.seen is not None:
                    owner = (p.seen.event_id, p.seen.payload_hash)
                else:
                    won = self.decided[p.winner].request.event
                    owner = (won.event_id, won.payload_hash)
                if owner[1] != e.payload_hash:
                    out.append(KeyConflict(0, owner[0]))
                    continue
                decision_id = p.seen.decision_id if p.seen is not None else ""
                at = version(p.allowed_before)
                out.append(Consumed(c, None, before, owner[0], True, period, at, decision_id))
            elif p.after is not None:
                at = versions[p.allowed_before]
                out.append(Consumed(c, p.decision, before, e.event_id, period=period, version=at))
            elif p.gated:
                out.append(Consumed(c, p.decision, period=period, version=version(0)))
            else:
                at = version(p.allowed_before)
                out.append(Consumed(c, p.decision, before, period=period, version=at))
        return out

    def replays_of(
        self, outcomes: list[Consumed | BaseException]
    ) -> list[Consumed | BaseException]:
        """`outcomes` with each replay of an earlier request of the group given that request's
        kept decision id."""
        for n, p in enumerate(self.decided):
            replay = outcomes[n]
            won = outcomes[p.winner] if p.winner >= 0 else None
            if isinstance(replay, Consumed) and isinstance(won, Consumed):
                outcomes[n] = dataclasses.replace(replay, decision_id=won.decision_id)
        return outcomes
