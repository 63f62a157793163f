"""Check and consume before a billable action (asyncio).

Ask the service whether the customer may use QUANTITY of FEATURE and, in the same atomic step,
record it. Racing callers can never take a customer past a hard limit. A denial is an answer, not
an error: show the reason and do not run the action.

    python check_and_consume.py CUSTOMER_ID JOB_ID QUANTITY [--feature NAME] [--target HOST:PORT]

Exit status: 0 allowed (and consumed), 3 denied, 1 rejected request, 75 try again later.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import usage_client

DENIED = 3


async def consume_then_run(
    client: usage_client.AsyncUsageClient, customer_id: str, feature: str, job_id: str, amount: int
) -> bool:
    decision = await client.check_entitlement(
        customer_id,
        feature,
        amount,
        consume=True,
        idempotency_key=usage_client.idempotency_key("job", job_id),
    )
    if not decision.allowed:
        limit = "unlimited" if decision.limit is None else decision.limit
        print(f"denied: {decision.reason.name} (used {decision.used} of {limit} {feature})")
        return False
    left = "unlimited" if decision.remaining is None else decision.remaining
    again = " (already consumed)" if decision.duplicate else ""
    print(f"allowed: {decision.reason.name}, consumed {amount}{again}; {left} {feature} left")
    # ... run the billable action for job_id here ...
    return True


async def amain(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("customer_id")
    parser.add_argument("job_id", help="your own id for the action")
    parser.add_argument("quantity", type=int)
    parser.add_argument("--feature", default="llm_tokens")
    parser.add_argument(
        "--target", default=os.environ.get("USAGE_SERVICE_ADDRESS", "127.0.0.1:50051")
    )
    args = parser.parse_args(argv)

    async with usage_client.AsyncUsageClient(args.target) as client:
        try:
            allowed = await consume_then_run(
                client, args.customer_id, args.feature, args.job_id, args.quantity
            )
        except usage_client.TransientError as exc:
            print(f"service unavailable, try again later: {exc}", file=sys.stderr)
            return 75
        except usage_client.UsageError as exc:
            print(f"rejected: {exc}", file=sys.stderr)
            return 1
    return 0 if allowed else DENIED


if __name__ == "__main__":
    sys.exit(asyncio.run(amain()))
