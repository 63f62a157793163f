"""Threshold alerts as signed webhooks, delivered at least once from the outbox.

Each alert's body is made once, when the alert is recorded, and kept: every attempt sends the
same bytes with the same `Usage-Event-Id` (the alert id), signed anew at the time of sending:

    Usage-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

Any 2xx settles a webhook; any other answer or a network error is retried with capped
exponential backoff and jitter, for as long as it takes (the waiting ones are in the metrics).
Workers lease what they send, so replicas share the outbox and a worker that dies mid-send
leaves its webhooks to be sent again once their leases run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import random
import socket
import uuid

import asyncpg
import httpx

from usage_service import metrics
from usage_service.storage import alerts

log = logging.getLogger(__name__)

EVENT_TYPE = "usage.threshold_crossed"
BALANCE_EVENT_TYPE = "credits.balance_low"  # a prepaid feature's balance alert
BALANCE_PREFIX = "balance "  # how a balance alert is named: "balance 1000"
EVENT_ID_HEADER = "Usage-Event-Id"
SIGNATURE_HEADER = "Usage-Signature"
BATCH = 100  # webhooks read per look at the outbox
CONCURRENCY = 8  # webhooks in flight per process
LEASE_MARGIN = dt.timedelta(seconds=30)  # a lease outlasts the send's timeout by this much
MAX_ROUNDS = 10  # looks at the outbox per wake, while there is work


def body(alert: alerts.Alert) -> str:
    """The webhook's JSON body for an alert."""
    c = alert.crossing
    low = c.threshold.startswith(BALANCE_PREFIX)
    event = {
        "id": alert.alert_id,
        "type": BALANCE_EVENT_TYPE if low else EVENT_TYPE,
        "created": int(alert.created_at.timestamp()),
        "data": {
            "customer_id": alert.customer_id,
            "feature": c.feature,
            "threshold": c.threshold,
            "amount": c.amount,
            ("balance" if low else "used"): c.used,
            "period_start": _rfc3339(c.period_start),
            "period_end": _rfc3339(c.period_end),
            "version": alert.version,
        },
    }
    return json.dumps(event, separators=(",", ":"))


def _rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def signature(secret: str, timestamp: int, raw_body: bytes) -> str:
    """The Usage-Signature header value: `t=<timestamp>,v1=<hex HMAC-SHA256>`."""
    signed = str(timestamp).encode() + b"." + raw_body
    mac = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where webhooks go, and how they are retried."""

    url: str
    secret: str = dataclasses.field(repr=False)
    timeout: float  # seconds per attempt
    backoff_base: float  # seconds, doubled per attempt
    backoff_cap: float  # seconds

    def backoff(self, attempts: int) -> float:
        """The wait after the `attempts`-th failed attempt: capped exponential, with jitter
        over the upper half of the step."""
        step = min(self.backoff_cap, self.backoff_base * float(2 ** min(attempts - 1, 30)))
        return step * random.uniform(0.5, 1.0)


class Deliverer:
    """Sends the outbox's due webhooks, every `interval` and when woken."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        target: Target,
        interval: float,
        client: httpx.AsyncClient | None = None,
        owner: str = "",
    ) -> None:
        self.pool = pool
        self.target = target
        self.interval = interval
        self.client = client or httpx.AsyncClient(timeout=target.timeout)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    def wake(self) -> None:
        """Looks at the outbox now (a webhook was just queued)."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def aclose(self) -> None:
        await self.client.aclose()

    async def run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            wait = self.interval
            try:
                await self.deliver_due()
                wait = await self._until_next()
            except Exception:
                log.exception("delivering webhooks failed", extra={"action": "webhook"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _until_next(self) -> float:
        """Seconds until the next webhook may be sent (at most `interval`); sets the gauges."""
        backlog = await alerts.webhook_backlog(self.pool)
        now = dt.datetime.now(dt.UTC)
        oldest = (now - backlog.oldest).total_seconds() if backlog.oldest else 0.0
        metrics.webhook_backlog(backlog.waiting, max(oldest, 0.0))
        if backlog.next_due is None:
            return self.interval
        return min(self.interval, max((backlog.next_due - now).total_seconds(), 0.0))

    async def deliver_due(self) -> int:
        """Sends what is due now; returns how many webhooks were accepted."""
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(customer_id: str, alert_id: str) -> bool:
            async with gate:
                return await self._deliver(customer_id, alert_id)

        accepted = 0
        for _ in range(MAX_ROUNDS):
            due = await alerts.due_webhooks(self.pool, dt.datetime.now(dt.UTC), BATCH)
            results = await asyncio.gather(*(one(c, a) for c, a in due))
            accepted += sum(results)
            if len(due) < BATCH or self._stopping.is_set():
                break
        return accepted

    async def _deliver(self, customer_id: str, alert_id: str) -> bool:
        now = dt.datetime.now(dt.UTC)
        lease = dt.timedelta(seconds=self.target.timeout) + LEASE_MARGIN
        w = await alerts.claim_webhook(self.pool, customer_id, alert_id, self.owner, now, lease)
        if w is None:
            return False
        outcome, error = await self.send(w)
        metrics.webhook_delivery(outcome)
        if outcome == "delivered":
            await alerts.webhook_delivered(self.pool, customer_id, alert_id)
            return True
        delay = self.target.backoff(w.attempts)
        at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
        await alerts.webhook_retry(self.pool, w, self.owner, at, error)
        log.warning(
            "webhook %s not accepted (attempt %d): %s; again in %.1fs",
            alert_id,
            w.attempts,
            error,
            delay,
            extra={"action": "webhook", "alert_id": alert_id},
        )
        return False

    async def send(self, w: alerts.Webhook) -> tuple[str, str]:
        """POSTs the webhook once: ("delivered", ""), ("rejected", why) for an answer other
        than 2xx, or ("network_error", why)."""
        raw = w.body.encode()
        now = int(dt.datetime.now(dt.UTC).timestamp())
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: w.alert_id,
            SIGNATURE_HEADER: signature(self.target.secret, now, raw),
        }
        try:
            answer = await self.client.post(self.target.url, content=raw, headers=headers)
        except httpx.HTTPError as exc:
            return "network_error", f"{type(exc).__name__}: {exc}"[:500]
        if answer.is_success:
            return "delivered", ""
        return "rejected", f"HTTP {answer.status_code}"
