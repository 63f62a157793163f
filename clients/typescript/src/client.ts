import { create } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { createClient, type Client, type Transport } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import { isResumableWatchEnd, toUsageServiceError, type UsageServiceError } from "./errors.js";
import {
  Health,
  HealthCheckRequestSchema,
  HealthCheckResponse_ServingStatus,
} from "./gen/grpc/health/v1/health_pb.js";
import {
  CreateGrantRequestSchema,
  CreditService,
  GrantSource,
  GrantState,
  type CreateGrantRequest,
  type Grant as GrantMessage,
} from "./gen/usage/v1/credit_pb.js";
import {
  BillingInterval,
  CustomerSchema,
  CustomerService,
  PeriodSource,
  Provider,
  SubscriptionStatus,
  type Customer as CustomerMessage,
} from "./gen/usage/v1/customer_pb.js";
import {
  EntitlementReason,
  RecordUsageRequestSchema,
  SnapshotReason,
  UsageChangeKind,
  UsageService,
  type CheckEntitlementResponse,
  type DecisionRule as DecisionRuleMessage,
  type GetDecisionResponse,
  type GetUsageSummaryResponse,
  type MeterUsage as MeterUsageMessage,
  type RecordUsageRequest,
  type RecordUsageResponse,
  type WatchUsageResponse,
} from "./gen/usage/v1/usage_pb.js";
import { backoffMs, delay, retryPolicy, withRetry, type RetryPolicy } from "./retry.js";

/** Default deadline of each attempt, in milliseconds. */
export const DEFAULT_TIMEOUT_MS = 5_000;

/** Whole units: a safe integer number or a bigint. */
export type Quantity = number | bigint;

export type EntitlementReasonName = keyof typeof EntitlementReason;
export type SubscriptionStatusName = keyof typeof SubscriptionStatus;
export type ProviderName = keyof typeof Provider;
export type BillingIntervalName = keyof typeof BillingInterval;
export type PeriodSourceName = keyof typeof PeriodSource;
export type ServingStatusName = keyof typeof HealthCheckResponse_ServingStatus;
export type UsageChangeKindName = keyof typeof UsageChangeKind;
export type SnapshotReasonName = keyof typeof SnapshotReason;
export type GrantSourceName = keyof typeof GrantSource;
export type GrantStateName = keyof typeof GrantState;

/** A watch stream open this long had connected: its end starts the count of failed attempts anew. */
export const WATCH_STEADY_MS = 5_000;

export interface UsageClientOptions {
  /** "host:port" (plaintext HTTP/2) or a URL such as "http://host:port" / "https://host". */
  readonly address: string;
  /** Deadline of each attempt, in milliseconds (default 5000). */
  readonly timeoutMs?: number;
  /** Retries on UNAVAILABLE, DEADLINE_EXCEEDED and ABORTED (default DEFAULT_RETRY). */
  readonly retry?: Partial<RetryPolicy>;
  /** Headers sent with every call, e.g. authorization. */
  readonly headers?: Readonly<Record<string, string>>;
  /** Called before each retry, e.g. to log it. */
  readonly onRetry?: (error: UsageServiceError, attempt: number, waitMs: number) => void;
  /** A transport of your own (TLS, interceptors...); then the client does not own a connection. */
  readonly transport?: Transport;
}

/** Per-call options; unset values come from the client's options. */
export interface CallOptions {
  readonly timeoutMs?: number;
  readonly retry?: Partial<RetryPolicy>;
  /** Aborts the call and any pending retry. */
  readonly signal?: AbortSignal;
}

export interface RecordUsageInput {
  readonly customerId: string;
  readonly meter: string;
  readonly quantity: Quantity;
  /** Required: derive it from your own ids with idempotencyKey(...), never a random value per attempt. */
  readonly idempotencyKey: string;
  /** When the usage happened (default: now, at the service). */
  readonly eventTime?: Date;
  readonly properties?: Readonly<Record<string, string>>;
}

export interface RecordUsageResult {
  readonly eventId: string;
  /** True when this key had already been recorded: nothing new was stored. */
  readonly duplicate: boolean;
}

export interface CheckEntitlementInput {
  readonly customerId: string;
  /** A meter name or a boolean feature name of the customer's plan. */
  readonly feature: string;
  /** The amount about to be used; 0 (default) asks "is any left?". */
  readonly quantity?: Quantity;
  /** Record `quantity` as usage, atomically with the decision, when allowed. */
  readonly consume?: boolean;
  /** Required when consume is true. */
  readonly idempotencyKey?: string;
  readonly properties?: Readonly<Record<string, string>>;
}

export interface Entitlement {
  readonly allowed: boolean;
  /** Why: WITHIN_LIMIT, FEATURE_ENABLED, SOFT_LIMIT_EXCEEDED, LIMIT_EXCEEDED, ... */
  readonly reason: EntitlementReasonName;
  /** Usage in the current period, after this call's consumption if any. */
  readonly used: bigint;
  readonly included: bigint;
  /** undefined: unlimited. */
  readonly limit: bigint | undefined;
  /** undefined: unlimited. */
  readonly remaining: bigint | undefined;
  readonly periodStartTime: Date | undefined;
  readonly periodEndTime: Date | undefined;
  /** The recorded event when consumed; "" otherwise. */
  readonly eventId: string;
  /** True when the idempotency key had already been consumed: nothing new was recorded. */
  readonly duplicate: boolean;
  /** Whether the period was confirmed by a webhook (CONFIRMED) or projected from the cadence. */
  readonly periodSource: PeriodSourceName;
  /**
   * Names this decision for getDecision: every consume is kept, and denials when the service keeps
   * them (USAGE_KEEP_DENIALS); "" when the decision is not kept.
   */
  readonly decisionId: string;
  /** When the decision was taken. */
  readonly asOfTime: Date | undefined;
  /** The version of the customer's figures the decision read; for a consume, the one its usage committed as. */
  readonly totalsVersion: bigint;
  /** The plan rule that decided. */
  readonly rule: DecisionRule | undefined;
  /**
   * Prepaid features: the units left in the customer's grants, after this call's consumption if
   * any. undefined for features paid in arrears.
   */
  readonly balance: bigint | undefined;
  /** The units of this call's consumption that grants paid for (the rest is overage). */
  readonly covered: bigint;
}

/**
 * The plan rule an entitlement decision applied: a metered feature's allowance, limit (undefined:
 * unlimited), enforcement ("hard" or "soft"), how it is paid (billing "arrears" or "prepaid"),
 * whether a prepaid feature allows usage beyond its grants (overage) and a soft limit's hard
 * ceiling (undefined: none); or a boolean feature's enabled. Empty where it is not known (an
 * unknown customer, a feature outside the plan).
 */
export interface DecisionRule {
  readonly planId: string;
  readonly feature: string;
  readonly included: bigint;
  readonly limit: bigint | undefined;
  readonly enforcement: string;
  readonly enabled: boolean;
  readonly billing: string;
  readonly overage: boolean;
  readonly ceiling: bigint | undefined;
}

/** A kept decision: the request as it was checked, and the answer exactly as checkEntitlement gave it. */
export interface Decision {
  readonly decisionId: string;
  readonly customerId: string;
  readonly feature: string;
  readonly quantity: bigint;
  readonly consume: boolean;
  readonly response: Entitlement;
}

export interface MeterUsage {
  readonly meter: string;
  readonly used: bigint;
  readonly included: bigint;
  readonly limit: bigint | undefined;
  readonly remaining: bigint | undefined;
  readonly overage: bigint;
  readonly reported: bigint;
  readonly pending: bigint;
  readonly failed: bigint;
  readonly aggregation: string;
  readonly unit: string;
  /** Recorded for a customer with no payment provider: never reported. */
  readonly unbilled: bigint;
  /**
   * "arrears" (all usage is reported) or "prepaid" (usage burns grants first; only the rest is
   * reported, as overage, when the plan allows overage).
   */
  readonly billing: string;
  /** Prepaid features, over the grants that can be burned now: units granted, burned, left. */
  readonly granted: bigint;
  readonly burned: bigint;
  readonly balance: bigint;
  /** The earliest expiry of a grant with units left; undefined when none expires. */
  readonly nextExpireTime: Date | undefined;
  /** Usage in the period that grants paid for: never reported. */
  readonly covered: bigint;
  /** Prepaid features that allow overage: the period's usage beyond the grants, billed as overage. */
  readonly billableOverage: bigint;
  /** A soft limit's hard ceiling; undefined: none. */
  readonly ceiling: bigint | undefined;
}

export interface UsageSummary {
  readonly customerId: string;
  readonly planId: string;
  readonly subscriptionStatus: SubscriptionStatusName;
  readonly periodStartTime: Date | undefined;
  readonly periodEndTime: Date | undefined;
  readonly meters: readonly MeterUsage[];
  /** Whether the period was confirmed by a webhook (CONFIRMED) or projected from the cadence. */
  readonly periodSource: PeriodSourceName;
}

/** A threshold of the plan reached by a customer's usage in a period. */
export interface ThresholdCrossing {
  /** Stable: the same in every stream and in the webhook, for de-duplication. */
  readonly alertId: string;
  readonly feature: string;
  /** As declared, e.g. "80% of included", "100% of limit", "1000". */
  readonly threshold: string;
  /** The usage the threshold stands for in this period. */
  readonly amount: bigint;
  /** The usage that crossed it. */
  readonly used: bigint;
}

/**
 * One message of watchUsage: a snapshot, or a committed change and the figures after it.
 * `version` increases strictly (it may skip numbers: changes to meters not watched are left out).
 * SNAPSHOT, ROLLOVER and CUSTOMER carry every meter watched; USAGE and DRAIN the meters they
 * changed; CREDIT the meter whose balance a grant changed; THRESHOLD carries `threshold`.
 */
export interface UsageChange {
  readonly version: bigint;
  /** SNAPSHOT, USAGE, ROLLOVER, CUSTOMER, DRAIN, THRESHOLD or CREDIT. */
  readonly kind: UsageChangeKindName;
  /** When the change committed (a snapshot: when it was read). */
  readonly commitTime: Date | undefined;
  /** SNAPSHOT only: INITIAL, or RESUME_TOO_OLD when the changes after the version resumed from
   * are no longer kept; UNSPECIFIED for other kinds. */
  readonly snapshotReason: SnapshotReasonName;
  readonly planId: string;
  readonly subscriptionStatus: SubscriptionStatusName;
  /** The billing period the figures belong to (a late event can change an earlier period). */
  readonly periodStartTime: Date | undefined;
  readonly periodEndTime: Date | undefined;
  readonly meters: readonly MeterUsage[];
  /** THRESHOLD only. */
  readonly threshold: ThresholdCrossing | undefined;
}

export interface WatchUsageInput {
  readonly customerId: string;
  /** Only these meters; default all of them. */
  readonly meters?: readonly string[];
  /** Start after this version (the last one you saw) instead of with a snapshot. */
  readonly resumeAfterVersion?: bigint | number;
  /** Stops the watch: the iteration ends, without an error. */
  readonly signal?: AbortSignal;
  /** How a stream that ended is resumed (default: the client's retry policy). */
  readonly retry?: Partial<RetryPolicy>;
}

export interface Customer {
  readonly customerId: string;
  readonly planId: string;
  readonly subscriptionStatus: SubscriptionStatusName;
  readonly currentPeriodStartTime: Date | undefined;
  readonly currentPeriodEndTime: Date | undefined;
  readonly provider: ProviderName;
  readonly providerCustomerId: string;
  /** Meter -> Lemon Squeezy subscription item id. */
  readonly subscriptionItems: Readonly<Record<string, string>>;
  /** The cadence: periods are billingIntervalCount billingIntervals long (count 0 means 1). */
  readonly billingInterval: BillingIntervalName;
  readonly billingIntervalCount: number;
  /** A boundary of the cadence whose day of month periods keep. */
  readonly billingCycleAnchorTime: Date | undefined;
  /** Whether currentPeriod* was confirmed by a webhook (CONFIRMED) or projected from the cadence. */
  readonly currentPeriodSource: PeriodSourceName;
}

export interface CustomerInput {
  readonly customerId: string;
  readonly planId: string;
  readonly subscriptionStatus: SubscriptionStatusName;
  readonly currentPeriodStartTime: Date;
  readonly currentPeriodEndTime: Date;
  /** Default UNSPECIFIED: metered and checked, never reported to a provider. */
  readonly provider?: ProviderName;
  readonly providerCustomerId?: string;
  readonly subscriptionItems?: Readonly<Record<string, string>>;
  /** Default UNSPECIFIED: the service infers the cadence from the period sent. */
  readonly billingInterval?: BillingIntervalName;
  /** Default 0, which means 1. */
  readonly billingIntervalCount?: number;
  /** Default: taken from the period sent. */
  readonly billingCycleAnchorTime?: Date;
}

/**
 * Prepaid units of a metered feature that the customer's usage of it burns down, in burn order:
 * lower priority first, then the earliest expiry, then the oldest.
 */
export interface Grant {
  readonly grantId: string;
  readonly customerId: string;
  readonly feature: string;
  readonly amount: bigint;
  /** Lower numbers burn first. */
  readonly priority: number;
  /** Usage timed earlier never burns it. */
  readonly effectiveTime: Date | undefined;
  /** undefined: never expires. */
  readonly expireTime: Date | undefined;
  /** PLAN, ROLLOVER or TOP_UP. */
  readonly source: GrantSourceName;
  readonly burned: bigint;
  /** Units left: 0 once spent, expired or voided. */
  readonly remaining: bigint;
  /** Units an expiry or a void removed. */
  readonly forfeited: bigint;
  /** Set once voided. */
  readonly voidTime: Date | undefined;
  /** ACTIVE, PENDING (not effective yet), SPENT, EXPIRED or VOIDED. */
  readonly state: GrantStateName;
  /** The key it was created under (plan and rollover grants: one the service chose). */
  readonly idempotencyKey: string;
  readonly createTime: Date | undefined;
}

export interface CreateGrantInput {
  readonly customerId: string;
  /** A sum or count meter. */
  readonly feature: string;
  /** Units to grant: > 0. */
  readonly amount: Quantity;
  /** Required: derive it from your own ids (e.g. the purchase) with idempotencyKey(...). */
  readonly idempotencyKey: string;
  /** >= 0, default 0; lower burns first. */
  readonly priority?: number;
  /** Default: now, at the service. Not more than 5 minutes in the past. */
  readonly effectiveTime?: Date;
  /** Default: never expires. */
  readonly expireTime?: Date;
}

export interface CreateGrantResult {
  readonly grant: Grant;
  /** True when this key had already created the grant: nothing new was granted. */
  readonly duplicate: boolean;
}

export interface VoidGrantResult {
  /** The grant after the void. */
  readonly grant: Grant;
  /** Units this call removed (0 when the grant was already voided, expired or spent). */
  readonly voided: bigint;
}

export interface ListGrantsFilter {
  /** Only this feature's grants. */
  readonly feature?: string;
  /** Also spent, expired and voided grants (default: only active and pending ones). */
  readonly includeInactive?: boolean;
}

function toBigInt(quantity: Quantity | undefined): bigint {
  return quantity === undefined ? 0n : BigInt(quantity);
}

function toDate(timestamp: Timestamp | undefined): Date | undefined {
  return timestamp === undefined ? undefined : timestampDate(timestamp);
}

function enumValue<E extends Record<string, string | number>>(
  values: E,
  name: string,
  what: string,
): number {
  const value = values[name];
  if (typeof value !== "number") {
    throw new TypeError(`unknown ${what} "${name}"`);
  }
  return value;
}

function enumName<N extends string>(values: Record<number, string>, value: number): N {
  return (values[value] ?? "UNSPECIFIED") as N;
}

function recordRequest(input: RecordUsageInput): RecordUsageRequest {
  return create(RecordUsageRequestSchema, {
    customerId: input.customerId,
    meter: input.meter,
    quantity: toBigInt(input.quantity),
    idempotencyKey: input.idempotencyKey,
    eventTime: input.eventTime === undefined ? undefined : timestampFromDate(input.eventTime),
    properties: { ...(input.properties ?? {}) },
  });
}

function recordResult(response: RecordUsageResponse): RecordUsageResult {
  return { eventId: response.eventId, duplicate: response.duplicate };
}

export function entitlement(response: CheckEntitlementResponse): Entitlement {
  return {
    allowed: response.allowed,
    reason: enumName<EntitlementReasonName>(EntitlementReason, response.reason),
    used: response.used,
    included: response.included,
    limit: response.limit,
    remaining: response.remaining,
    periodStartTime: toDate(response.periodStartTime),
    periodEndTime: toDate(response.periodEndTime),
    eventId: response.eventId,
    duplicate: response.duplicate,
    periodSource: enumName<PeriodSourceName>(PeriodSource, response.periodSource),
    decisionId: response.decisionId,
    asOfTime: toDate(response.asOfTime),
    totalsVersion: response.totalsVersion,
    rule: response.rule === undefined ? undefined : decisionRule(response.rule),
    balance: response.balance,
    covered: response.covered,
  };
}

function decisionRule(rule: DecisionRuleMessage): DecisionRule {
  return {
    planId: rule.planId,
    feature: rule.feature,
    included: rule.included,
    limit: rule.limit,
    enforcement: rule.enforcement,
    enabled: rule.enabled,
    billing: rule.billing,
    overage: rule.overage,
    ceiling: rule.ceiling,
  };
}

export function decision(response: GetDecisionResponse): Decision {
  if (response.response === undefined) {
    throw new TypeError("the service answered without the decision's response");
  }
  return {
    decisionId: response.decisionId,
    customerId: response.customerId,
    feature: response.feature,
    quantity: response.quantity,
    consume: response.consume,
    response: entitlement(response.response),
  };
}

function meterUsage(meter: MeterUsageMessage): MeterUsage {
  return {
    meter: meter.meter,
    used: meter.used,
    included: meter.included,
    limit: meter.limit,
    remaining: meter.remaining,
    overage: meter.overage,
    reported: meter.reported,
    pending: meter.pending,
    failed: meter.failed,
    aggregation: meter.aggregation,
    unit: meter.unit,
    unbilled: meter.unbilled,
    billing: meter.billing,
    granted: meter.granted,
    burned: meter.burned,
    balance: meter.balance,
    nextExpireTime: toDate(meter.nextExpireTime),
    covered: meter.covered,
    billableOverage: meter.billableOverage,
    ceiling: meter.ceiling,
  };
}

export function usageSummary(response: GetUsageSummaryResponse): UsageSummary {
  return {
    customerId: response.customerId,
    planId: response.planId,
    subscriptionStatus: enumName<SubscriptionStatusName>(SubscriptionStatus, response.subscriptionStatus),
    periodStartTime: toDate(response.periodStartTime),
    periodEndTime: toDate(response.periodEndTime),
    meters: response.meters.map(meterUsage),
    periodSource: enumName<PeriodSourceName>(PeriodSource, response.periodSource),
  };
}

export function usageChange(message: WatchUsageResponse): UsageChange {
  const threshold = message.threshold;
  return {
    version: message.version,
    kind: enumName<UsageChangeKindName>(UsageChangeKind, message.kind),
    commitTime: toDate(message.commitTime),
    snapshotReason: enumName<SnapshotReasonName>(SnapshotReason, message.snapshotReason),
    planId: message.planId,
    subscriptionStatus: enumName<SubscriptionStatusName>(SubscriptionStatus, message.subscriptionStatus),
    periodStartTime: toDate(message.periodStartTime),
    periodEndTime: toDate(message.periodEndTime),
    meters: message.meters.map(meterUsage),
    threshold:
      threshold === undefined
        ? undefined
        : {
            alertId: threshold.alertId,
            feature: threshold.feature,
            threshold: threshold.threshold,
            amount: threshold.amount,
            used: threshold.used,
          },
  };
}

export function customerMessage(input: CustomerInput): CustomerMessage {
  return create(CustomerSchema, {
    customerId: input.customerId,
    planId: input.planId,
    subscriptionStatus: enumValue(SubscriptionStatus, input.subscriptionStatus, "subscription status"),
    currentPeriodStartTime: timestampFromDate(input.currentPeriodStartTime),
    currentPeriodEndTime: timestampFromDate(input.currentPeriodEndTime),
    provider: enumValue(Provider, input.provider ?? "UNSPECIFIED", "provider"),
    providerCustomerId: input.providerCustomerId ?? "",
    subscriptionItems: { ...(input.subscriptionItems ?? {}) },
    billingInterval: enumValue(BillingInterval, input.billingInterval ?? "UNSPECIFIED", "billing interval"),
    billingIntervalCount: input.billingIntervalCount ?? 0,
    billingCycleAnchorTime:
      input.billingCycleAnchorTime === undefined ? undefined : timestampFromDate(input.billingCycleAnchorTime),
  });
}

export function customer(message: CustomerMessage | undefined): Customer {
  if (message === undefined) {
    throw new TypeError("the service answered without a customer");
  }
  return {
    customerId: message.customerId,
    planId: message.planId,
    subscriptionStatus: enumName<SubscriptionStatusName>(SubscriptionStatus, message.subscriptionStatus),
    currentPeriodStartTime: toDate(message.currentPeriodStartTime),
    currentPeriodEndTime: toDate(message.currentPeriodEndTime),
    provider: enumName<ProviderName>(Provider, message.provider),
    providerCustomerId: message.providerCustomerId,
    subscriptionItems: { ...message.subscriptionItems },
    billingInterval: enumName<BillingIntervalName>(BillingInterval, message.billingInterval),
    billingIntervalCount: message.billingIntervalCount,
    billingCycleAnchorTime: toDate(message.billingCycleAnchorTime),
    currentPeriodSource: enumName<PeriodSourceName>(PeriodSource, message.currentPeriodSource),
  };
}

export function createGrantRequest(input: CreateGrantInput): CreateGrantRequest {
  return create(CreateGrantRequestSchema, {
    customerId: input.customerId,
    feature: input.feature,
    amount: toBigInt(input.amount),
    priority: input.priority ?? 0,
    effectiveTime: input.effectiveTime === undefined ? undefined : timestampFromDate(input.effectiveTime),
    expireTime: input.expireTime === undefined ? undefined : timestampFromDate(input.expireTime),
    idempotencyKey: input.idempotencyKey,
  });
}

export function grant(message: GrantMessage | undefined): Grant {
  if (message === undefined) {
    throw new TypeError("the service answered without a grant");
  }
  return {
    grantId: message.grantId,
    customerId: message.customerId,
    feature: message.feature,
    amount: message.amount,
    priority: message.priority,
    effectiveTime: toDate(message.effectiveTime),
    expireTime: toDate(message.expireTime),
    source: enumName<GrantSourceName>(GrantSource, message.source),
    burned: message.burned,
    remaining: message.remaining,
    forfeited: message.forfeited,
    voidTime: toDate(message.voidTime),
    state: enumName<GrantStateName>(GrantState, message.state),
    idempotencyKey: message.idempotencyKey,
    createTime: toDate(message.createTime),
  };
}

/**
 * A usage-service client: every call has a deadline, is retried with backoff on UNAVAILABLE,
 * DEADLINE_EXCEEDED and ABORTED with the very same request (so the same idempotency key), and fails with a
 * UsageServiceError carrying the service's ErrorInfo and BadRequest details.
 *
 * One client holds one HTTP/2 connection; share it, and close() it when done.
 */
export class UsageClient {
  /** The generated clients, for anything the methods below do not cover (no retries there). */
  readonly usage: Client<typeof UsageService>;
  readonly customers: Client<typeof CustomerService>;
  readonly credits: Client<typeof CreditService>;
  readonly health: Client<typeof Health>;

  private readonly sessionManager: Http2SessionManager | undefined;
  private readonly timeoutMs: number;
  private readonly retry: RetryPolicy;
  private readonly headers: Readonly<Record<string, string>>;
  private readonly onRetry: UsageClientOptions["onRetry"];
  /** Aborted by close(), which ends the watches under way. */
  private closing = new AbortController();

  constructor(options: UsageClientOptions) {
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    if (!(this.timeoutMs > 0)) {
      throw new RangeError(`timeoutMs must be > 0, got ${this.timeoutMs}`);
    }
    this.retry = retryPolicy(options.retry);
    this.headers = { ...(options.headers ?? {}) };
    this.onRetry = options.onRetry;
    let transport = options.transport;
    if (transport === undefined) {
      const baseUrl = options.address.includes("://") ? options.address : `http://${options.address}`;
      this.sessionManager = new Http2SessionManager(baseUrl, { idleConnectionTimeoutMs: 60_000 });
      transport = createGrpcTransport({ baseUrl, sessionManager: this.sessionManager });
    }
    this.usage = createClient(UsageService, transport);
    this.customers = createClient(CustomerService, transport);
    this.credits = createClient(CreditService, transport);
    this.health = createClient(Health, transport);
  }

  /** Closes the connection and ends every watchUsage iteration; calls made afterwards open a new one. */
  close(): void {
    this.closing.abort();
    this.closing = new AbortController();
    this.sessionManager?.abort();
  }

  private call<T>(options: CallOptions | undefined, run: (callOptions: {
    timeoutMs: number;
    signal: AbortSignal | undefined;
    headers: Record<string, string>;
  }) => Promise<T>): Promise<T> {
    const policy = options?.retry === undefined ? this.retry : retryPolicy(options.retry, this.retry);
    const callOptions = {
      timeoutMs: options?.timeoutMs ?? this.timeoutMs,
      signal: options?.signal,
      headers: { ...this.headers },
    };
    return withRetry(policy, () => run(callOptions), options?.signal, this.onRetry);
  }

  /** Records one usage event; OK means it is committed. A retry of the same key returns the original. */
  async recordUsage(input: RecordUsageInput, options?: CallOptions): Promise<RecordUsageResult> {
    const request = recordRequest(input);
    return recordResult(await this.call(options, (o) => this.usage.recordUsage(request, o)));
  }

  /** Records 1..1000 events atomically; results come in the same order. */
  async batchRecordUsage(
    inputs: readonly RecordUsageInput[],
    options?: CallOptions,
  ): Promise<RecordUsageResult[]> {
    const request = { requests: inputs.map(recordRequest) };
    const response = await this.call(options, (o) => this.usage.batchRecordUsage(request, o));
    return response.responses.map(recordResult);
  }

  /** May the customer use `feature` now? A denial is an answer (allowed: false), not an error. */
  async checkEntitlement(input: CheckEntitlementInput, options?: CallOptions): Promise<Entitlement> {
    const request = {
      customerId: input.customerId,
      feature: input.feature,
      quantity: toBigInt(input.quantity),
      consume: input.consume ?? false,
      idempotencyKey: input.idempotencyKey ?? "",
      properties: { ...(input.properties ?? {}) },
    };
    return entitlement(await this.call(options, (o) => this.usage.checkEntitlement(request, o)));
  }

  /**
   * A kept decision (an Entitlement's decisionId): the request as checked and the answer exactly as it
   * was given. UsageServiceError with reason DECISION_NOT_FOUND when no decision is kept under the id.
   */
  async getDecision(decisionId: string, options?: CallOptions): Promise<Decision> {
    return decision(await this.call(options, (o) => this.usage.getDecision({ decisionId }, o)));
  }

  /** The customer's usage in the current billing period, per meter (or only `meter`). */
  async getUsageSummary(
    customerId: string,
    filter: { readonly meter?: string } = {},
    options?: CallOptions,
  ): Promise<UsageSummary> {
    const request = { customerId, meter: filter.meter ?? "" };
    return usageSummary(await this.call(options, (o) => this.usage.getUsageSummary(request, o)));
  }

  /**
   * The customer's usage as it changes: a SNAPSHOT, then one UsageChange per committed change, in
   * order (`for await (const change of client.watchUsage({ customerId }))`).
   *
   * The stream has no deadline. When it ends in a way that says nothing about the watch (see
   * isResumableWatchEnd: UNAVAILABLE, e.g. a server shutting down; a dropped connection; a caller
   * that read too slowly, RESOURCE_EXHAUSTED SLOW_CONSUMER), it is resumed after the last version
   * yielded, with backoff (onRetry is told): nothing is missed or repeated. Other ends throw their
   * UsageServiceError (NOT_FOUND for an unknown customer), and so does a stream that cannot be
   * resumed within `retry.maxAttempts` attempts in a row. Aborting `signal`, close(), or leaving
   * the loop cancels the stream and ends the iteration without an error.
   */
  async *watchUsage(input: WatchUsageInput): AsyncGenerator<UsageChange, void, undefined> {
    const policy = input.retry === undefined ? this.retry : retryPolicy(input.retry, this.retry);
    const meters = [...(input.meters ?? [])];
    let last = input.resumeAfterVersion === undefined ? undefined : BigInt(input.resumeAfterVersion);
    let failures = 0; // attempts in a row that ended without a sign the stream worked
    // Aborted by the caller's signal or close(), and when the iteration ends: cancels the stream.
    const stop = new AbortController();
    const sources = [input.signal, this.closing.signal];
    const onStop = () => stop.abort();
    for (const source of sources) {
      if (source?.aborted) stop.abort();
      source?.addEventListener("abort", onStop, { once: true });
    }
    try {
      while (!stop.signal.aborted) {
        const started = performance.now();
        let waitMs: number;
        try {
          const request = { customerId: input.customerId, meters, resumeAfterVersion: last };
          const options = { signal: stop.signal, headers: { ...this.headers } };
          for await (const message of this.usage.watchUsage(request, options)) {
            const change = usageChange(message);
            last = change.version;
            failures = 0;
            yield change;
          }
          return; // the server ended the stream: the watch is over
        } catch (thrown) {
          if (stop.signal.aborted) {
            return;
          }
          failures = performance.now() - started >= WATCH_STEADY_MS ? 1 : failures + 1;
          const error = toUsageServiceError(thrown, failures);
          if (failures >= policy.maxAttempts || !isResumableWatchEnd(error)) {
            throw error;
          }
          waitMs = backoffMs(policy, failures);
          this.onRetry?.(error, failures, waitMs);
        }
        try {
          await delay(waitMs, stop.signal);
        } catch {
          return; // stopped while waiting
        }
      }
    } finally {
      for (const source of sources) source?.removeEventListener("abort", onStop);
      stop.abort();
    }
  }

  /** Creates or replaces a customer (plan, subscription status, billing period and cadence, provider). */
  async upsertCustomer(input: CustomerInput, options?: CallOptions): Promise<Customer> {
    const message = customerMessage(input);
    const response = await this.call(options, (o) =>
      this.customers.upsertCustomer({ customer: message }, o),
    );
    return customer(response.customer);
  }

  /** A customer; UsageServiceError with codeName NOT_FOUND for an unknown id. */
  async getCustomer(customerId: string, options?: CallOptions): Promise<Customer> {
    const response = await this.call(options, (o) => this.customers.getCustomer({ customerId }, o));
    return customer(response.customer);
  }

  /**
   * Grants prepaid units of a feature (a top-up, e.g. a credit-pack purchase). The same key again
   * answers the original grant with duplicate: true (so a retry never grants twice); with another
   * grant, UsageServiceError ALREADY_EXISTS.
   */
  async createGrant(input: CreateGrantInput, options?: CallOptions): Promise<CreateGrantResult> {
    const request = createGrantRequest(input);
    const response = await this.call(options, (o) => this.credits.createGrant(request, o));
    return { grant: grant(response.grant), duplicate: response.duplicate };
  }

  /**
   * Voids a grant: its remaining units are removed from now on. Voiding it again removes nothing
   * (voided: 0n), so a retried call answers 0n when an earlier attempt took effect. NOT_FOUND
   * (reason GRANT_NOT_FOUND) for an unknown grant.
   */
  async voidGrant(customerId: string, grantId: string, options?: CallOptions): Promise<VoidGrantResult> {
    const response = await this.call(options, (o) => this.credits.voidGrant({ customerId, grantId }, o));
    return { grant: grant(response.grant), voided: response.voided };
  }

  /** The customer's grants in burn order, with what each has left (active and pending ones by default). */
  async listGrants(customerId: string, filter: ListGrantsFilter = {}, options?: CallOptions): Promise<Grant[]> {
    const request = { customerId, feature: filter.feature ?? "", includeInactive: filter.includeInactive ?? false };
    const response = await this.call(options, (o) => this.credits.listGrants(request, o));
    return response.grants.map(grant);
  }

  /** The standard grpc.health.v1 check: "SERVING" when the service can take calls. */
  async checkHealth(service = "", options?: CallOptions): Promise<ServingStatusName> {
    const request = create(HealthCheckRequestSchema, { service });
    const response = await this.call(options, (o) => this.health.check(request, o));
    return enumName<ServingStatusName>(HealthCheckResponse_ServingStatus, response.status);
  }
}
