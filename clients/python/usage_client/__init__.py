"""A Python client for usage-service (gRPC package usage.v1).

    from usage_client import UsageClient, idempotency_key

    with UsageClient("127.0.0.1:50051") as client:
        client.record_usage(
            "cus_42", "tokens", 1234, idempotency_key=idempotency_key("completion", request_id)
        )

`AsyncUsageClient` has the same methods as coroutines. Calls have a deadline and are retried on
transient failures with the same idempotency key, so a retry never records twice.
`watch_usage` iterates over a customer's changes (`UsageChange`), resuming by itself after a
dropped stream without missing or repeating one. `create_grant`, `void_grant` and `list_grants`
keep a customer's prepaid credits (`Grant`).
"""

from __future__ import annotations

from usage_client._async import AsyncUsageClient
from usage_client._channel import DEFAULT_CHANNEL_OPTIONS, DEFAULT_TIMEOUT
from usage_client._errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServerError,
    TransientError,
    Unauthenticated,
    Unavailable,
    UsageError,
)
from usage_client._keys import idempotency_key
from usage_client._retry import RETRYABLE_CODES, RetryPolicy
from usage_client._sync import UsageClient
from usage_client._types import (
    BillingInterval,
    CreateGrantResult,
    Customer,
    Decision,
    DecisionRule,
    Entitlement,
    EntitlementReason,
    Grant,
    GrantSource,
    GrantState,
    MeterUsage,
    PeriodSource,
    Provider,
    RecordResult,
    SnapshotReason,
    SubscriptionStatus,
    ThresholdCrossing,
    UsageChange,
    UsageChangeKind,
    UsageEvent,
    UsageSummary,
    VoidGrantResult,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "DEFAULT_TIMEOUT",
    "RETRYABLE_CODES",
    "Aborted",
    "AlreadyExists",
    "AsyncUsageClient",
    "BillingInterval",
    "Cancelled",
    "CreateGrantResult",
    "Customer",
    "DeadlineExceeded",
    "Decision",
    "DecisionRule",
    "Entitlement",
    "EntitlementReason",
    "FailedPrecondition",
    "FieldViolation",
    "Grant",
    "GrantSource",
    "GrantState",
    "InvalidArgument",
    "MeterUsage",
    "NotFound",
    "PeriodSource",
    "PermissionDenied",
    "Provider",
    "RecordResult",
    "ResourceExhausted",
    "RetryPolicy",
    "ServerError",
    "SnapshotReason",
    "SubscriptionStatus",
    "ThresholdCrossing",
    "TransientError",
    "Unauthenticated",
    "Unavailable",
    "UsageChange",
    "UsageChangeKind",
    "UsageClient",
    "UsageError",
    "UsageEvent",
    "UsageSummary",
    "VoidGrantResult",
    "__version__",
    "idempotency_key",
]
