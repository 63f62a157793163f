"""The decision trail: entitlement decisions kept as they were answered, for GetDecision.

Every consume keeps its decision in its own transaction; denials are kept when the service is
set to keep them. The answer is kept as the serialized response, returned byte for byte.
Statements: decisions_queries.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

import asyncpg

from usage_service.storage import decisions_queries as q
from usage_service.storage.rows import Conn


@dataclasses.dataclass(frozen=True)
class Kept:
    """One kept decision: the request as checked and the answer as given."""

    customer_id: str
    decision_id: str
    feature: str
    quantity: int
    consume: bool
    allowed: bool
    event_id: str | None  # the consumed event; None when nothing was consumed
    response: bytes  # the answer, serialized
    created_at: dt.datetime


async def keep(conn: Conn | asyncpg.Pool, d: Kept) -> None:
    await conn.execute(
        q.KEEP,
        d.customer_id,
        d.decision_id,
        d.feature,
        d.quantity,
        d.consume,
        d.allowed,
        d.event_id,
        d.response,
        d.created_at,
    )


async def keep_many(conn: Conn, kept: Sequence[Kept]) -> None:
    if not kept:
        return
    await conn.execute(
        q.KEEP_MANY,
        [d.customer_id for d in kept],
        [d.decision_id for d in kept],
        [d.feature for d in kept],
        [d.quantity for d in kept],
        [d.consume for d in kept],
        [d.allowed for d in kept],
        [d.event_id for d in kept],
        [d.response for d in kept],
        [d.created_at for d in kept],
    )


async def get(conn: Conn | asyncpg.Pool, decision_id: str) -> Kept | None:
    """The decision with this id (a UUID), None when none is kept."""
    row = await conn.fetchrow(q.GET, decision_id)
    if row is None:
        return None
    return Kept(
        customer_id=row["customer_id"],
        decision_id=str(row["decision_id"]),
        feature=row["feature"],
        quantity=row["quantity"],
        consume=row["consume"],
        allowed=row["allowed"],
        event_id=None if row["event_id"] is None else str(row["event_id"]),
        response=bytes(row["response"]),
        created_at=row["created_at"],
    )
