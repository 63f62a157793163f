"""Create or update a customer, as your payment-webhook handler does.

Checks and summaries need a customer: its plan, subscription status and current billing period.
Call this whenever the subscription changes (created, renewed, upgraded, cancelled). Here the
period is the current calendar month, so running it again changes nothing.

    python upsert_customer.py CUSTOMER_ID [--plan free] [--target HOST:PORT]

The plans are those of the service's plans file (the example plans: `free` and `pro`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys

import usage_client


def this_month(now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start, (start + dt.timedelta(days=32)).replace(day=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("customer_id")
    parser.add_argument("--plan", default="free")
    parser.add_argument(
        "--target", default=os.environ.get("USAGE_SERVICE_ADDRESS", "127.0.0.1:50051")
    )
    args = parser.parse_args(argv)

    start, end = this_month(dt.datetime.now(dt.UTC))
    customer = usage_client.Customer(
        args.customer_id,
        args.plan,
        usage_client.SubscriptionStatus.ACTIVE,
        current_period_start_time=start,
        current_period_end_time=end,
        billing_interval=usage_client.BillingInterval.MONTH,
    )
    with usage_client.UsageClient(args.target) as client:
        try:
            saved = client.upsert_customer(customer)
        except usage_client.UsageError as exc:
            print(f"rejected: {exc}", file=sys.stderr)
            for violation in exc.field_violations:
                print(f"  {violation.field}: {violation.description}", file=sys.stderr)
            return 1
    print(
        f"{saved.customer_id}: plan {saved.plan_id} ({saved.subscription_status.name.lower()}), "
        f"period {saved.current_period_start_time.date()} .. {saved.current_period_end_time.date()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
