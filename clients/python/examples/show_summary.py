"""Show a customer's usage in the current billing period.

python show_summary.py CUSTOMER_ID [--meter NAME] [--target HOST:PORT]

`pending` is usage waiting to be reported to the customer's payment provider; `unbilled` is
usage of a customer with no provider, which is never reported.
"""

from __future__ import annotations

import argparse
import os
import sys

import usage_client


def render(summary: usage_client.UsageSummary) -> str:
    start = summary.period_start_time.date() if summary.period_start_time else "?"
    end = summary.period_end_time.date() if summary.period_end_time else "?"
    lines = [
        f"{summary.customer_id}: plan {summary.plan_id} "
        f"({summary.subscription_status.name.lower()}), period {start} .. {end}",
        f"{'meter':<12}{'used':>10}{'included':>10}{'limit':>10}{'left':>10}"
        f"{'overage':>10}{'pending':>10}{'unbilled':>10}  unit",
    ]
    for m in summary.meters:
        limit = "-" if m.limit is None else str(m.limit)
        left = "-" if m.remaining is None else str(m.remaining)
        lines.append(
            f"{m.meter:<12}{m.used:>10}{m.included:>10}{limit:>10}{left:>10}"
            f"{m.overage:>10}{m.pending:>10}{m.unbilled:>10}  {m.unit}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("customer_id")
    parser.add_argument("--meter", default=None, help="only this meter")
    parser.add_argument(
        "--target", default=os.environ.get("USAGE_SERVICE_ADDRESS", "127.0.0.1:50051")
    )
    args = parser.parse_args(argv)

    with usage_client.UsageClient(args.target) as client:
        try:
            summary = client.get_usage_summary(args.customer_id, args.meter)
        except usage_client.NotFound:
            print(f"no customer {args.customer_id!r}", file=sys.stderr)
            return 1
    print(render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
