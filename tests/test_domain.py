"""The pure domain: aggregation and decisions, without I/O."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from usage_service import domain
from usage_service.domain import ids
from usage_service.domain.plans import Aggregation, Enforcement, MeteredFeature

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def event(q: int, minutes: int) -> domain.UsageEvent:
    return domain.UsageEvent("e", "c", "m", q, "k", T0 + dt.timedelta(minutes=minutes), {}, b"")


def test_fold_keeps_every_aggregation_and_the_last_of_equal_times() -> None:
    totals = domain.fold([(event(5, 2), 7), (event(9, 1), 8), (event(3, 2), 6)])
    assert (totals.event_count, totals.quantity_sum, totals.quantity_max) == (3, 17, 9)
    # equal times: the one the service accepted last (highest acceptance order) wins
    assert (totals.last_quantity, totals.last_event_time) == (5, T0 + dt.timedelta(minutes=2))
    assert totals.last_seq == 7


def test_decide_hard_soft_and_is_any_left() -> None:
    hard = MeteredFeature("m", included=5, limit=10, enforcement=Enforcement.HARD)
    soft = MeteredFeature("m", included=5, limit=10, enforcement=Enforcement.SOFT)
    at_9 = domain.Totals(event_count=3, quantity_sum=9)
    assert domain.decide(hard, Aggregation.SUM, at_9, 1).allowed
    assert domain.decide(hard, Aggregation.SUM, at_9, 2).reason is domain.Reason.LIMIT_EXCEEDED
    assert domain.decide(soft, Aggregation.SUM, at_9, 2).reason is domain.Reason.SOFT_LIMIT_EXCEEDED
    assert domain.decide(hard, Aggregation.SUM, at_9, 0).allowed  # one left
    at_10 = domain.Totals(quantity_sum=10)
    assert not domain.decide(hard, Aggregation.SUM, at_10, 0).allowed  # none left
    # A count meter counts the event, whatever its quantity.
    assert domain.decide(hard, Aggregation.COUNT, at_9, 500).allowed


def test_progress_is_in_quantities_for_sum_and_events_otherwise() -> None:
    t = domain.Totals(
        event_count=4,
        quantity_sum=40,
        reported_count=1,
        reported_sum=15,
        failed_count=1,
        failed_sum=5,
        unbilled_count=1,
        unbilled_sum=7,
    )
    assert t.progress(Aggregation.SUM) == (15, 13, 5, 7)
    assert t.progress(Aggregation.LAST) == (1, 1, 1, 1)


def test_payload_hash_ignores_a_defaulted_time_but_not_a_given_one() -> None:
    base = domain.payload_hash("m", 1, None, {"a": "1"})
    assert base == domain.payload_hash("m", 1, None, {"a": "1"})
    assert base != domain.payload_hash("m", 1, T0, {"a": "1"})
    assert base != domain.payload_hash("m", 2, None, {"a": "1"})
    assert base != domain.payload_hash("m", 1, None, {"a": "2"})


def _reference_hash(
    meter: str, quantity: int, event_time: dt.datetime | None, properties: dict[str, str]
) -> bytes:
    """The fingerprint as first stored: keys recorded then must still match their retries."""
    stamp = event_time.astimezone(dt.UTC).isoformat() if event_time else ""
    text = json.dumps([meter, quantity, stamp, sorted(properties.items())], separators=(",", ":"))
    return hashlib.sha256(text.encode()).digest()


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    meter=st.text(max_size=20),
    quantity=st.integers(min_value=0, max_value=2**63 - 1),
    event_time=st.none() | st.datetimes(timezones=st.just(dt.UTC)),
    properties=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=5),
)
def test_payload_hash_bytes_never_change(
    meter: str,
    quantity: int,
    event_time: dt.datetime | None,
    properties: dict[str, str],
) -> None:
    want = _reference_hash(meter, quantity, event_time, properties)
    assert domain.payload_hash(meter, quantity, event_time, properties) == want


def test_payload_hash_is_pinned() -> None:
    got = domain.payload_hash("tokens", 7, T0, {"model": "é", "a": '"'})
    assert got.hex() == _reference_hash("tokens", 7, T0, {"model": "é", "a": '"'}).hex()
    assert domain.payload_hash("m", 1, None, {}).hex() == (
        hashlib.sha256(b'["m",1,"",[]]').hexdigest()
    )


def test_event_ids_are_random_version_4_uuids() -> None:
    made = {ids.new_event_id() for _ in range(1000)} | set(ids.new_event_ids(1000))
    assert len(made) == 2000
    for text in made:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_a_forked_child_never_hands_out_its_parents_ids() -> None:
    """Ids come from random bytes read ahead; a child forked after the parent read them (as
    `serve --workers` may) reads its own."""
    ids.new_event_id()  # the parent has bytes read ahead
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.write(write, json.dumps(ids.new_event_ids(50)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = set(json.loads(pipe.read()))
    assert len(child) == 50 and not child & set(ids.new_event_ids(50))
