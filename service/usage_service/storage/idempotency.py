"""Idempotency: judging a group of record requests against the events already stored under
their keys, as if each request ran alone after the ones before it. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, TypeAlias

from usage_service import domain
from usage_service.domain.errors import KeyConflict

Key: TypeAlias = tuple[str, str]  # (customer_id, idempotency_key)


class Recorded(NamedTuple):  # a tuple: a batch makes one per event
    event_id: str
    duplicate: bool


class Replan(Exception):
    """A key turned out to be taken by another payload: roll back and judge the group again."""


def resolve(
    requests: Sequence[Sequence[domain.UsageEvent]], known: Mapping[Key, tuple[str, bytes]]
) -> tuple[list[list[Recorded] | KeyConflict], list[tuple[domain.UsageEvent, int]]]:
    """Judges requests in order, as if each ran alone after the ones before it: `known` holds
    stored events (key -> event_id, payload hash). Returns each request's answers (or its key
    conflict: the request stores nothing) and the events to insert with their acceptance order
    (their place among the events to insert, in request order), sorted by key."""
    winners = dict(known)
    answers: list[list[Recorded] | KeyConflict] = []
    fresh: list[domain.UsageEvent] = []
    for events in requests:
        mine: dict[Key, tuple[str, bytes]] = {}
        out: list[Recorded] = []
        new: list[domain.UsageEvent] = []
        conflict: KeyConflict | None = None
        for i, e in enumerate(events):
            key = (e.customer_id, e.idempotency_key)
            seen = mine.get(key) or winners.get(key)
            if seen is None:
                mine[key] = (e.event_id, e.payload_hash)
                new.append(e)
                out.append(Recorded(e.event_id, duplicate=False))
            elif seen[1] != e.payload_hash:
                conflict = KeyConflict(i, seen[0])
                break
            else:
                out.append(Recorded(seen[0], duplicate=True))
        if conflict is not None:
            answers.append(conflict)
            continue
        winners.update(mine)
        fresh.extend(new)
        answers.append(out)
    # Rows go in key order, so concurrent writers take unique-index locks in one order.
    ordered = sorted(((e, i) for i, e in enumerate(fresh)), key=by_key)
    return answers, ordered


def by_key(pair: tuple[domain.UsageEvent, int]) -> Key:
    return pair[0].customer_id, pair[0].idempotency_key


def key_owner(event_id: object, payload_hash: bytes | None) -> tuple[str, bytes] | None:
    """(event_id, payload hash) of the event stored under a key, None when there is none."""
    return (
        None if event_id is None or payload_hash is None else (str(event_id), bytes(payload_hash))
    )
