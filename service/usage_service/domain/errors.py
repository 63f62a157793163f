"""Refusals the domain defines, raised by storage and answered by the API."""

from __future__ import annotations

import datetime as dt


class KeyConflict(Exception):
    """An idempotency key already names an event with another payload."""

    def __init__(self, index: int, event_id: str) -> None:
        super().__init__(f"item {index}: idempotency key already used with another payload")
        self.index = index
        self.event_id = event_id


class GrantKeyConflict(Exception):
    """An idempotency key already names a grant with another request."""

    def __init__(self, grant_id: str) -> None:
        super().__init__("idempotency key already used for another grant")
        self.grant_id = grant_id


class TotalOutOfRange(Exception):
    """An event would take its customer's and meter's total past int64: nothing is stored."""

    def __init__(self, index: int) -> None:
        super().__init__(f"item {index}: the total would exceed the largest int64")
        self.index = index


class PeriodsPruned(Exception):
    """A webhook would move boundaries before the horizon `prune` closed."""

    def __init__(self, horizon: dt.datetime) -> None:
        super().__init__(f"periods before {horizon.isoformat()} were pruned and are closed")
        self.horizon = horizon


class ValueOutOfRange(Exception):
    """A figure would leave the range the database stores (int64): nothing is stored."""


class ConcurrencyConflict(Exception):
    """A concurrent write conflicted (a deadlock or a serialization failure): retry."""


class DatabaseUnavailable(Exception):
    """The database cannot be reached or refuses work for now: retry."""
