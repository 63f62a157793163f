"""On a Citus cluster (USAGE_TEST_CITUS=1), every statement of the drain, its operator commands
and the reconciliation that writes, locks or reads one customer runs on that customer's node and
touches its shards only (the checks of test_citus_plans.py). Work over several customers is a
lock-free read (DUE_*, *_CUSTOMERS, STATUS_*, IDENTIFIED), then these statements one customer at
a time. Elsewhere these tests are skipped."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from conftest import CITUS
from test_citus_plans import CUSTOMER, END, NOW, START, assert_on_customers_node

from usage_service.storage import drain_queries as d
from usage_service.storage import reconcile_queries as r

pytestmark = pytest.mark.skipif(not CITUS, reason="needs USAGE_TEST_CITUS=1 (a Citus cluster)")

C = CUSTOMER
E1 = uuid.uuid4()
LANE = "\x1f".join(("stripe", C, "tokens"))


def _id() -> str:
    return str(uuid.uuid4())


# name -> (statement, its arguments for CUSTOMER)
PER_CUSTOMER: dict[str, tuple[str, Callable[[], tuple[Any, ...]]]] = {
    # claiming
    "CLAIM_EVENTS": (d.CLAIM_EVENTS, lambda: (C, "stripe", 100)),
    "CLAIM_BATCHES": (d.CLAIM_BATCHES, lambda: (C, "polar", 100, [_id()], 100, "w", 30.0)),
    "PERIOD_FIGURES": (d.PERIOD_FIGURES, lambda: (C, "stripe", ["tokens"], [START], [END])),
    "INSERT_REPORT": (
        d.INSERT_REPORT,
        lambda: (C, _id(), "stripe", LANE, "[]", 5, "w", 30.0, NOW, NOW),
    ),
    "ASSIGN_EVENTS": (d.ASSIGN_EVENTS, lambda: (C, _id(), [E1])),
    "UNASSIGN_EVENTS": (d.UNASSIGN_EVENTS, lambda: (C, _id())),
    "CLAIM_REPORT": (d.CLAIM_REPORT, lambda: (C, _id(), "w", 30.0, NOW)),
    # sending and settling
    "SAVE_CHECKPOINT": (d.SAVE_CHECKPOINT, lambda: (C, _id(), "w", "{}", 30.0)),
    "RETRY_LATER": (d.RETRY_LATER, lambda: (C, _id(), "w", 1.0, "later")),
    "CLOSE_REPORT": (d.CLOSE_REPORT, lambda: (C, _id(), "failed", "no")),
    "SETTLE_DELIVERED": (d.SETTLE_DELIVERED, lambda: (C, [_id()])),
    "DRAIN_LOCK_CUSTOMER": (d.LOCK_CUSTOMER, lambda: (C,)),
    "PARK_EVENTS": (d.PARK_EVENTS, lambda: (C, _id(), [E1], ["no"])),
    "PARK_REPORT_EVENTS": (d.PARK_REPORT_EVENTS, lambda: (C, _id(), "no")),
    "MARK_REPORTED": (d.MARK_REPORTED, lambda: (C, [_id()])),
    "DRAIN_LOCK_TOTALS": (d.LOCK_TOTALS, lambda: (C, ["tokens"], [NOW], [1])),
    "ADJUST_TOTALS": (d.ADJUST_TOTALS, lambda: (C, ["tokens"], [NOW], [1], 1, 0, 0)),
    # operator commands
    "REQUEUE": (d.REQUEUE, lambda: ("", [], C)),
    "LOCK_MOVABLE_REPORTS": (d.LOCK_MOVABLE_REPORTS, lambda: ("", C)),
    "MOVE_EVENTS": (d.MOVE_EVENTS, lambda: ("", C, [_id()])),
    "COUNT_IN_OPEN_REPORTS": (d.COUNT_IN_OPEN_REPORTS, lambda: ("", C)),
    "RELEASE_EVENTS": (d.RELEASE_EVENTS, lambda: (C, [_id()])),
    "ABANDON_REPORTS": (d.ABANDON_REPORTS, lambda: (C, [_id()], "abandoned")),
    # reconciliation
    "FIGURES": (r.FIGURES, lambda: (C, START, END, "")),
    "SENT": (r.SENT, lambda: (C, "polar", "tokens", START, END)),
    "CUSTOMER_PROVIDERS": (r.CUSTOMER_PROVIDERS, lambda: (C,)),
    "FIXES": (r.FIXES, lambda: (C, [LANE])),
    "QUEUED": (r.QUEUED, lambda: (C, [str(E1)])),
    "SENT_TO": (r.SENT_TO, lambda: (C, LANE, START, END)),
    "FIXED_SINCE": (r.FIXED_SINCE, lambda: (C, LANE, NOW)),
    "INSERT_FIX": (r.INSERT_FIX, lambda: (C, _id(), "stripe", LANE, "[]", 5, NOW)),
    "LATEST_SENT": (r.LATEST_SENT, lambda: (C, "stripe", "tokens", START, END)),
    "EVENTS": (r.EVENTS, lambda: (C, [E1])),
}


@pytest.mark.parametrize("name", sorted(PER_CUSTOMER))
async def test_a_drain_statement_runs_on_the_customers_node(dsn: str, name: str) -> None:
    sql, args = PER_CUSTOMER[name]
    await assert_on_customers_node(dsn, sql, args())


def test_every_statement_is_checked() -> None:
    """A new statement of these modules is added above, or to the lock-free reads."""
    lock_free = {"DUE_EVENTS", "DUE_LANE_EVENTS", "DUE_REPORTS", "PARKED_CUSTOMERS"}
    lock_free |= {"MOVABLE_CUSTOMERS", "STATUS_EVENTS", "STATUS_REASONS", "STATUS_RETRYING"}
    lock_free |= {"CUSTOMERS", "IDENTIFIED", "LOCK_LANE"}  # LOCK_LANE: an advisory lock
    checked = {sql for sql, _ in PER_CUSTOMER.values()}
    for module in (d, r):
        for name, value in vars(module).items():
            statement = isinstance(value, str) and re.search(r"\b(SELECT|UPDATE|INSERT)\b", value)
            if name.isupper() and not name.startswith("_") and statement and name not in lock_free:
                assert value in checked, name
