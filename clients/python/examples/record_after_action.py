"""Record usage after a billable action.

Run the action first, then record what it used. The idempotency key is derived from your own id
for the action, so recording it again (a retry, a crash and re-run, a redelivered job) never bills
twice: the service answers with the original event and duplicate=True.

    python record_after_action.py CUSTOMER_ID REQUEST_ID TOKENS [--meter NAME] [--target HOST:PORT]
"""

from __future__ import annotations

import argparse
import os
import sys

import usage_client


def run_billable_action(tokens: int) -> int:
    """Stands for your own work (an LLM completion, an export, ...); returns the units it used."""
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("customer_id")
    parser.add_argument("request_id", help="your own id for the action")
    parser.add_argument("tokens", type=int)
    parser.add_argument("--meter", default="llm_tokens")
    parser.add_argument(
        "--target", default=os.environ.get("USAGE_SERVICE_ADDRESS", "127.0.0.1:50051")
    )
    args = parser.parse_args(argv)

    used = run_billable_action(args.tokens)
    key = usage_client.idempotency_key("completion", args.request_id)
    with usage_client.UsageClient(args.target) as client:
        try:
            result = client.record_usage(args.customer_id, args.meter, used, idempotency_key=key)
        except usage_client.TransientError as exc:
            # Still unknown after the client's retries: keep the key and try again later.
            print(f"not recorded yet, retry later with key {key}: {exc}", file=sys.stderr)
            return 75
        except usage_client.UsageError as exc:
            print(f"rejected: {exc}", file=sys.stderr)
            for violation in exc.field_violations:
                print(f"  {violation.field}: {violation.description}", file=sys.stderr)
            return 1
    note = " (already recorded)" if result.duplicate else ""
    print(f"recorded {used} {args.meter} for {args.customer_id}: event {result.event_id}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
