"""Lemon Squeezy usage records (JSON:API), one record per report.

Lemon Squeezy has no idempotency, so an increment is never re-sent blindly. Before the first send
the adapter reads the subscription item's current usage and asks the drain to store it with the
report (a Checkpoint). Sending again after an unknown outcome first compares the current usage with
that baseline: baseline + value means it landed; the baseline unchanged means it did not.
A `set` carries the period's value, so sending it again is harmless.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import httpx

from usage_service import domain
from usage_service.plans import Meter
from usage_service.providers import outcome
from usage_service.providers.config import Endpoint
from usage_service.providers.outcome import Outcome, Report

JSON_API = "application/vnd.api+json"


class LemonSqueezy:
    provider = domain.Provider.LEMON_SQUEEZY

    def __init__(self, endpoint: Endpoint, meters: Mapping[str, Meter], timeout: float) -> None:
        self._http = httpx.AsyncClient(
            base_url=endpoint.base_url,
            headers={"Authorization": f"Bearer {endpoint.api_key}", "Accept": JSON_API},
            timeout=timeout,
        )
        self._meters = meters
        # report id -> nonce of the checkpoint this process has just asked to store: only a send
        # with that very checkpoint may post without reconciling first.
        self._fresh: dict[str, str] = {}

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
        if meter.lemon_squeezy_action == "set":
            return await self._record(item, report.value, "set")
        if report.value == 0:
            return outcome.Delivered()
        if "baseline" not in report.checkpoint:
            usage = await self._current_usage(item)
            if not isinstance(usage, dict):
                return usage
            nonce = uuid.uuid4().hex
            self._fresh[report.report_id] = nonce
            return outcome.Checkpoint(
                {"baseline": usage["quantity"], "period": usage["period"], "nonce": nonce}
            )
        if self._fresh.pop(report.report_id, None) == report.checkpoint.get("nonce"):
            return await self._record(item, report.value, "increment")  # nothing sent since
        return await self._reconcile(item, report)

    async def _reconcile(self, item: str, report: Report) -> Outcome:
        usage = await self._current_usage(item)
        if not isinstance(usage, dict):
            return usage
        baseline = int(report.checkpoint["baseline"])
        quantity = int(usage["quantity"])
        if usage["period"] != report.checkpoint.get("period"):
            return outcome.Failed(
                "lemon squeezy: the billing period changed while an increment's outcome was "
                "unknown; check the subscription item's usage by hand"
            )
        if quantity >= baseline + report.value:
            return outcome.Delivered(duplicate=True)
        if quantity == baseline:
            return await self._record(item, report.value, "increment")
        return outcome.Failed(
            f"lemon squeezy: current usage {quantity} is neither {baseline} nor "
            f"{baseline + report.value}; check the subscription item's usage by hand"
        )

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

    async def _current_usage(self, item: str) -> dict[str, Any] | Outcome:
        answer = await self._call("GET", f"/v1/subscription-items/{item}/current-usage", None)
        if not isinstance(answer, httpx.Response):
            return answer
        try:
            meta = answer.json()["meta"]
            return {"quantity": int(meta["quantity"]), "period": str(meta.get("period_start"))}
        except (ValueError, KeyError, TypeError) as exc:
            return outcome.Retry(f"lemon squeezy: unreadable current-usage answer: {exc!r}")

    async def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None
    ) -> httpx.Response | Outcome:
        """The one place Lemon Squeezy answers become outcomes."""
        headers = {"Content-Type": JSON_API} if body is not None else {}
        try:
            response = await self._http.request(method, path, json=body, headers=headers)
        except httpx.TransportError as exc:
            return outcome.Retry(f"lemon squeezy: {type(exc).__name__}: {exc}")
        if response.is_success:
            return response
        reason = f"lemon squeezy {response.status_code}: {_error_text(response)}"
        if outcome.retryable(response.status_code):
            return outcome.Retry(reason, outcome.retry_after(response.headers))
        return outcome.Failed(reason)


def _error_text(response: httpx.Response) -> str:
    try:
        errors = response.json()["errors"]
        return "; ".join(str(e.get("detail") or e.get("title") or e) for e in errors)
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.text[:300] or response.reason_phrase
