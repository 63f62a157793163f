"""Lemon Squeezy usage records (JSON:API), one record per report.

Lemon Squeezy has no idempotency and no timestamps: a record lands in the subscription item's
period current when it is applied, and a write may be applied up to `settle` seconds after the
caller gave up on it. So:

- Every report first reads the item's current usage (`meta` has the period). Events of a period
  that is already closed there are parked (a record would land in the current one); events of a
  period that has not started there yet wait; nothing is sent when the period ends before a
  record could settle.
- A `set` carries the period's value, so sending it again is harmless. A period value of 0 is
  never sent (quantity is a positive integer): an increment of 0 is delivered as is; a `set` of
  0 is delivered when the item already shows 0, and parked otherwise (nothing can lower it).
- An increment is posted only after the drain stored a checkpoint with the baseline (the usage
  before the post) and `posted_at`; that save also holds the report's lease for `hold` seconds
  (2 x HTTP timeout + settle). The post starts within one HTTP timeout of the checkpoint and is
  cut off after another, so `hold` seconds after `posted_at` its write has landed or never will.
  Until then no one reconciles: another worker cannot take the report (lease, or the retry
  delay), and a reconcile waits for `posted_at + hold`. Then current usage = baseline + value
  means it landed; the baseline unchanged means it did not, and a new checkpoint precedes the
  next post.

The read-back (`held`) is the item's current usage, one call: `meta.quantity` for the period
`meta.period_start`..`period_end`, and nothing for any other period.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
import uuid
from collections.abc import Mapping
from typing import Any

import httpx

from usage_service import domain
from usage_service.domain.plans import Meter
from usage_service.domain.reports import Report
from usage_service.providers import outcome
from usage_service.providers.config import DEFAULT_LEMONSQUEEZY_SETTLE, Endpoint
from usage_service.providers.outcome import Outcome
from usage_service.providers.readback import Held, Query

JSON_API = "application/vnd.api+json"
HOLD = "hold_seconds"  # checkpoint key: how long the drain must hold the lease from the save
CURRENT_ONLY = "Lemon Squeezy shows the current period only"
CLOSED_PERIOD = (
    "lemon squeezy: usage of a closed period cannot be recorded; records land in the current period"
)


@dataclasses.dataclass(frozen=True)
class Usage:
    """A subscription item's current-usage `meta`."""

    quantity: int
    period: str  # period_start as sent
    start: dt.datetime
    end: dt.datetime


class LemonSqueezy:
    provider = domain.Provider.LEMON_SQUEEZY
    reporting = outcome.Reporting(lanes=True)

    def __init__(
        self,
        endpoint: Endpoint,
        meters: Mapping[str, Meter],
        timeout: float,
        settle: float = DEFAULT_LEMONSQUEEZY_SETTLE,
        transport: httpx.AsyncBaseTransport | None = None,  # tests: httpx.MockTransport
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=endpoint.base_url,
            headers={
                "Authorization": f"Bearer {endpoint.api_key}",
                "Accept": JSON_API,
                "Content-Type": JSON_API,
            },
            timeout=timeout,
            transport=transport,
        )
        self._meters = meters
        self._timeout = timeout
        self.hold = 2 * timeout + settle
        # report id -> (nonce, monotonic time) of the checkpoint this process has just asked to
        # store: only a send with that very checkpoint, soon enough, may post without reconciling.
        self._fresh: dict[str, tuple[str, float]] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, report: Report) -> Outcome:
        first = report.events[0]
        meter = self._meters.get(first.meter)
        if meter is None:
            return outcome.Failed(f"meter {first.meter!r} is not in the plans file")
        item = first.subscription_item
        if not item:
            return outcome.Failed(f"the customer has no subscription item for meter {meter.name!r}")
        fresh = self._fresh.pop(report.report_id, None)
        if meter.lemon_squeezy_action == "set":
            return await self._set(item, report, fresh)
        if report.value <= 0:
            return outcome.Delivered()  # nothing to add
        if "baseline" not in report.checkpoint:
            usage = await self._current_usage(item)
            if not isinstance(usage, Usage):
                return usage
            return self._outside(usage, report) or self._checkpoint(report, usage)
        if self._is_fresh(report, fresh):
            return await self._post(item, report, "increment", fresh)
        return await self._reconcile(item, report)

    async def held(self, query: Query) -> Held:
        """The item's usage when the query's period is the item's current one (one call)."""
        if not query.subscription_item:
            return Held(None, why="lemon squeezy: the customer has no subscription item")
        usage = await self._current_usage(query.subscription_item)
        if isinstance(usage, outcome.Retry | outcome.Failed):
            return Held(None, why=usage.reason)
        if not isinstance(usage, Usage):
            return Held(None, why=f"lemon squeezy: unexpected answer {usage!r}")
        if (usage.start, usage.end) != (query.start, query.end):
            return Held(None, why=CURRENT_ONLY)
        return Held(usage.quantity)

    def _is_fresh(self, report: Report, fresh: tuple[str, float] | None) -> bool:
        """Whether this send carries the checkpoint this process just asked to store."""
        return fresh is not None and fresh[0] == report.checkpoint.get("nonce")

    async def _post(
        self, item: str, report: Report, action: str, fresh: tuple[str, float] | None
    ) -> Outcome:
        """Posts right after its checkpoint was stored; an unknown outcome waits out the hold."""
        assert fresh is not None
        if time.monotonic() - fresh[1] > self._timeout:  # too late to post within the hold
            return outcome.Retry("lemon squeezy: checkpoint stored too late to post", self.hold)
        answer = await self._record(item, report.value, action)
        if isinstance(answer, outcome.Retry):  # maybe applied later: wait until it settled
            wait = self.hold - (time.monotonic() - fresh[1])
            return outcome.Retry(answer.reason, max(answer.after or 0.0, wait))
        return answer

    def _settling(self, report: Report) -> outcome.Retry | None:
        """A wait while the last post of the report may still land, else None."""
        hold = max(self.hold, float(report.checkpoint.get(HOLD, 0.0)))
        posted = report.checkpoint.get("posted_at")
        if not posted:
            return None
        age = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(posted)).total_seconds()
        if age >= hold:
            return None
        return outcome.Retry("lemon squeezy: waiting for the last record to settle", hold - age)

    def _checkpoint(self, report: Report, usage: Usage) -> outcome.Checkpoint:
        """The state stored before an increment is posted."""
        nonce = uuid.uuid4().hex
        self._fresh[report.report_id] = (nonce, time.monotonic())
        return outcome.Checkpoint(
            {
                "baseline": usage.quantity,
                "period": usage.period,
                "posted_at": outcome.iso(dt.datetime.now(dt.UTC)),
                "nonce": nonce,
                HOLD: self.hold,
            },
            hold=self.hold,
        )

    async def _reconcile(self, item: str, report: Report) -> Outcome:
        wait = self._settling(report)
        if wait is not None:
            return wait
        usage = await self._current_usage(item)
        if not isinstance(usage, Usage):
            return usage
        baseline = int(report.checkpoint["baseline"])
        if usage.period != report.checkpoint.get("period"):
            return outcome.Failed(
                "lemon squeezy: the billing period changed while an increment's outcome was "
                "unknown; check the subscription item's usage by hand"
            )
        if usage.quantity >= baseline + report.value:
            return outcome.Delivered(duplicate=True)
        if usage.quantity == baseline:  # it never landed: post again, under a new checkpoint
            return self._outside(usage, report) or self._checkpoint(report, usage)
        return outcome.Failed(
            f"lemon squeezy: current usage {usage.quantity} is neither {baseline} nor "
            f"{baseline + report.value}; check the subscription item's usage by hand"
        )

    async def _set(self, item: str, report: Report, fresh: tuple[str, float] | None) -> Outcome:
        """A set of the period's value. Sending it again is harmless, but a late one must not
        land after a newer set: like an increment, it is posted under a checkpoint that holds
        the lane until it has settled."""
        if report.value > 0 and self._is_fresh(report, fresh):
            return await self._post(item, report, "set", fresh)
        wait = self._settling(report)
        if wait is not None:
            return wait
        usage = await self._current_usage(item)
        if not isinstance(usage, Usage):
            return usage
        wrong = self._outside(usage, report)
        if wrong is not None:
            return wrong
        if report.value > 0:
            return self._checkpoint(report, usage)
        if usage.quantity == 0:
            return outcome.Delivered()
        return outcome.Failed(
            f"lemon squeezy: the period's value is 0, which a usage record cannot carry, and the "
            f"subscription item shows {usage.quantity}; correct it in Lemon Squeezy"
        )

    def _outside(self, usage: Usage, report: Report) -> Outcome | None:
        """Why the report's events cannot be recorded in the item's current period now."""
        if min(e.event_time for e in report.events) < usage.start:
            return outcome.Failed(CLOSED_PERIOD)
        if max(e.event_time for e in report.events) >= usage.end:
            return outcome.Retry("lemon squeezy: the events' period has not started there yet")
        left = (usage.end - dt.datetime.now(dt.UTC)).total_seconds()
        if left < self.hold:  # a record might land in the next period: wait for it, then park
            reason = "lemon squeezy: the period ends before a record could settle"
            return outcome.Retry(reason, max(left, 1.0))
        return None

    async def _record(self, item: str, quantity: int, action: str) -> Outcome:
        body = {
            "data": {
                "type": "usage-records",
                "attributes": {"quantity": quantity, "action": action},
                "relationships": {
                    "subscription-item": {"data": {"type": "subscription-items", "id": item}}
                },
            }
        }
        answer = await self._call("POST", "/v1/usage-records", body)
        return answer if not isinstance(answer, httpx.Response) else outcome.Delivered()

    async def _current_usage(self, item: str) -> Usage | Outcome:
        answer = await self._call("GET", f"/v1/subscription-items/{item}/current-usage", None)
        if not isinstance(answer, httpx.Response):
            return answer
        try:
            meta = answer.json()["meta"]
            return Usage(
                quantity=int(meta["quantity"]),
                period=str(meta["period_start"]),
                start=_time(meta["period_start"]),
                end=_time(meta["period_end"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            return outcome.Retry(f"lemon squeezy: unreadable current-usage answer: {exc!r}")

    async def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None
    ) -> httpx.Response | Outcome:
        """The one place Lemon Squeezy answers become outcomes. A call never outlives the HTTP
        timeout, whole (httpx's timeout is per step)."""
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._http.request(method, path, json=body)
        except TimeoutError:
            return outcome.Retry("lemon squeezy: no answer within the timeout")
        except httpx.TransportError as exc:
            return outcome.Retry(f"lemon squeezy: {type(exc).__name__}: {exc}")
        if response.is_success:
            return response
        reason = f"lemon squeezy {response.status_code}: {_error_text(response)}"
        if outcome.retryable(response.status_code):
            return outcome.Retry(reason, outcome.retry_after(response.headers))
        return outcome.Failed(reason)


def _time(text: Any) -> dt.datetime:
    when = dt.datetime.fromisoformat(str(text))
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _error_text(response: httpx.Response) -> str:
    try:
        errors = response.json()["errors"]
        return "; ".join(str(e.get("detail") or e.get("title") or e) for e in errors)
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.text[:300] or response.reason_phrase
