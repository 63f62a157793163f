/**
 * @usage-service/client: a TypeScript client for usage-service (usage.v1 over gRPC).
 *
 *   const client = new UsageClient({ address: "127.0.0.1:50051" });
 *   const key = idempotencyKey("chat-completion", requestId);
 *   await client.recordUsage({ customerId, meter: "llm_tokens", quantity: 1234, idempotencyKey: key });
 */
export {
  DEFAULT_TIMEOUT_MS,
  UsageClient,
  WATCH_STEADY_MS,
  type BillingIntervalName,
  type CallOptions,
  type CheckEntitlementInput,
  type CreateGrantInput,
  type CreateGrantResult,
  type Customer,
  type CustomerInput,
  type Decision,
  type DecisionRule,
  type Entitlement,
  type EntitlementReasonName,
  type Grant,
  type GrantSourceName,
  type GrantStateName,
  type ListGrantsFilter,
  type MeterUsage,
  type PeriodSourceName,
  type ProviderName,
  type Quantity,
  type RecordUsageInput,
  type RecordUsageResult,
  type ServingStatusName,
  type SnapshotReasonName,
  type SubscriptionStatusName,
  type ThresholdCrossing,
  type UsageChange,
  type UsageChangeKindName,
  type UsageClientOptions,
  type UsageSummary,
  type VoidGrantResult,
  type WatchUsageInput,
} from "./client.js";
export {
  UsageServiceError,
  isResumableWatchEnd,
  isRetryableCode,
  type FieldViolation,
  type GrpcCodeName,
  type UsageServiceErrorInit,
} from "./errors.js";
export { idempotencyKey, type KeyPart } from "./keys.js";
export { DEFAULT_RETRY, backoffMs, retryPolicy, type RetryPolicy } from "./retry.js";
export { Code } from "@connectrpc/connect";
