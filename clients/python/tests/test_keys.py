"""idempotency_key: stable, unambiguous, short."""

from __future__ import annotations

import hashlib
import re
import uuid

import pytest

from usage_client import idempotency_key


def test_same_parts_give_the_same_key_for_ever() -> None:
    # A golden value: if this changes, every caller's retries after an upgrade would double-bill.
    golden = "invoice:45e423dd38c8149fba8a112b90c8a5acb7b10fab2b4346cb4c0acaa86474bc9c"
    assert idempotency_key("invoice", 1042, 3) == golden
    # The documented construction: a versioned SHA-256 over length-prefixed parts.
    digest = hashlib.sha256(b"usage-client/idempotency-key/v1" + b"7:invoice" + b"4:1042" + b"1:3")
    assert golden == "invoice:" + digest.hexdigest()


def test_different_parts_give_different_keys() -> None:
    keys = {
        idempotency_key("invoice", 1042, 3),
        idempotency_key("invoice", 1042, 4),
        idempotency_key("invoice", 1043, 3),
        idempotency_key("refund", 1042, 3),
        idempotency_key("invoice", 1042),
        idempotency_key("invoice", "1042:3"),
    }
    assert len(keys) == 6


def test_part_boundaries_count() -> None:
    assert idempotency_key("a:b", "c") != idempotency_key("a", "b:c")
    assert idempotency_key("ab", "c") != idempotency_key("a", "bc")
    assert idempotency_key("a", "") != idempotency_key("a")


def test_parts_are_compared_by_their_text() -> None:
    assert idempotency_key("order", 7) == idempotency_key("order", "7")
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert idempotency_key("job", u) == idempotency_key("job", str(u))


def test_keys_stay_short_and_printable_whatever_the_parts() -> None:
    key = idempotency_key("ünïcode label with spaces/and:colons" * 20, "x" * 10_000)
    assert len(key) <= 255
    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,64}:[0-9a-f]{64}", key)
    assert re.fullmatch(r"_:[0-9a-f]{64}", idempotency_key(""))


@pytest.mark.parametrize("bad", [True, 1.5, None, b"bytes"])
def test_ambiguous_parts_are_refused(bad: object) -> None:
    with pytest.raises(TypeError):
        idempotency_key("order", bad)  # type: ignore[arg-type]


def test_at_least_one_part() -> None:
    with pytest.raises(ValueError):
        idempotency_key()
