"""The idempotency resolver on its own: how a group of record requests is judged against the keys
already stored, before anything is written."""

from __future__ import annotations

import datetime as dt
import uuid

from usage_service import domain
from usage_service.domain.errors import KeyConflict
from usage_service.storage.idempotency import Recorded, resolve

WHEN = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def usage(key: str, quantity: int = 1, customer_id: str = "c1") -> domain.UsageEvent:
    return domain.UsageEvent(
        event_id=str(uuid.uuid4()),
        customer_id=customer_id,
        meter="tokens",
        quantity=quantity,
        idempotency_key=key,
        event_time=WHEN,
        properties={},
        payload_hash=domain.payload_hash("tokens", quantity, None, {}),
    )


def test_new_keys_are_inserted_in_key_order_with_their_acceptance_order() -> None:
    b, a, c = usage("b"), usage("a"), usage("c", customer_id="c0")
    answers, ordered = resolve([[b, a], [c]], {})
    assert answers == [
        [Recorded(b.event_id, False), Recorded(a.event_id, False)],
        [Recorded(c.event_id, False)],
    ]
    # sorted by (customer, key) for the unique index; the number is the place in request order
    assert ordered == [(c, 2), (a, 1), (b, 0)]


def test_a_stored_key_with_the_same_payload_is_a_duplicate_of_the_stored_event() -> None:
    retry = usage("k")
    answers, ordered = resolve([[retry]], {("c1", "k"): ("stored-id", retry.payload_hash)})
    assert answers == [[Recorded("stored-id", True)]]
    assert ordered == []


def test_a_stored_key_with_another_payload_fails_its_whole_request_only() -> None:
    fresh, clash = usage("new"), usage("k", quantity=2)
    other = usage("other")
    known = {("c1", "k"): ("stored-id", usage("k", quantity=1).payload_hash)}
    answers, ordered = resolve([[fresh, clash], [other]], known)
    conflict = answers[0]
    assert isinstance(conflict, KeyConflict)
    assert (conflict.index, conflict.event_id) == (1, "stored-id")
    assert answers[1] == [Recorded(other.event_id, False)]
    assert ordered == [(other, 0)]  # the failed request stores nothing, `fresh` included


def test_later_requests_see_the_earlier_ones_of_the_group() -> None:
    first, same, changed = usage("k"), usage("k"), usage("k", quantity=5)
    answers, ordered = resolve([[first], [same], [changed]], {})
    assert answers[0] == [Recorded(first.event_id, False)]
    assert answers[1] == [Recorded(first.event_id, True)]
    conflict = answers[2]
    assert isinstance(conflict, KeyConflict)
    assert (conflict.index, conflict.event_id) == (0, first.event_id)
    assert ordered == [(first, 0)]


def test_a_key_repeated_inside_one_request() -> None:
    a, again = usage("k"), usage("k")
    answers, ordered = resolve([[a, again]], {})
    assert answers == [[Recorded(a.event_id, False), Recorded(a.event_id, True)]]
    assert ordered == [(a, 0)]
    b, changed = usage("j"), usage("j", quantity=9)
    answers, ordered = resolve([[b, changed]], {})
    conflict = answers[0]
    assert isinstance(conflict, KeyConflict)
    assert (conflict.index, conflict.event_id) == (1, b.event_id)
    assert ordered == []


def test_a_failed_request_claims_none_of_its_keys() -> None:
    """Its new keys stay free: a later request of the group may use them with any payload."""
    taken = usage("k", quantity=1)
    known = {("c1", "k"): ("stored-id", taken.payload_hash)}
    loser = [usage("free", quantity=1), usage("k", quantity=2)]
    winner = usage("free", quantity=3)
    answers, ordered = resolve([loser, [winner]], known)
    assert isinstance(answers[0], KeyConflict)
    assert answers[1] == [Recorded(winner.event_id, False)]
    assert ordered == [(winner, 0)]


def test_keys_are_per_customer() -> None:
    mine, theirs = usage("k", quantity=1), usage("k", quantity=2, customer_id="c2")
    answers, ordered = resolve([[mine], [theirs]], {})
    assert answers == [[Recorded(mine.event_id, False)], [Recorded(theirs.event_id, False)]]
    assert ordered == [(mine, 0), (theirs, 1)]
