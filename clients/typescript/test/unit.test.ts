/** The client's pure parts: idempotency keys, backoff, the retry loop and error mapping. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { create, toBinary } from "@bufbuild/protobuf";
import { ConnectError } from "@connectrpc/connect";

import { createGrantRequest, customer, customerMessage, entitlement, grant, usageSummary } from "../src/client.js";
import { BadRequestSchema, ErrorInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";
import { GrantSchema, GrantSource, GrantState } from "../src/gen/usage/v1/credit_pb.js";
import { BillingInterval, PeriodSource } from "../src/gen/usage/v1/customer_pb.js";
import {
  CheckEntitlementResponseSchema,
  EntitlementReason,
  GetUsageSummaryResponseSchema,
} from "../src/gen/usage/v1/usage_pb.js";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { toUsageServiceError } from "../src/errors.js";
import { withRetry } from "../src/retry.js";
import { backoffMs, Code, idempotencyKey, retryPolicy, UsageServiceError } from "../src/index.js";

describe("idempotencyKey", () => {
  test("the same parts give the same key; other parts give another", () => {
    assert.equal(idempotencyKey("order", "o-1", 2), idempotencyKey("order", "o-1", 2));
    assert.notEqual(idempotencyKey("order", "o-1", 2), idempotencyKey("order", "o-1", 3));
    assert.match(idempotencyKey("x"), /^[0-9a-f]{64}$/);
  });

  test("part boundaries and types count", () => {
    assert.notEqual(idempotencyKey("ab", "c"), idempotencyKey("a", "bc"));
    assert.notEqual(idempotencyKey("a:b"), idempotencyKey("a", "b"));
    assert.notEqual(idempotencyKey(1), idempotencyKey("1"));
    assert.notEqual(idempotencyKey(1n), idempotencyKey(1));
  });

  test("at least one part is needed", () => {
    assert.throws(() => idempotencyKey(), TypeError);
  });
});

describe("backoff", () => {
  const policy = retryPolicy({ initialBackoffMs: 100, maxBackoffMs: 1_000, multiplier: 2, jitter: 0.5 });

  test("grows by the multiplier up to the cap", () => {
    const noJitter = () => 0;
    assert.deepEqual(
      [1, 2, 3, 4, 5, 6].map((retry) => backoffMs(policy, retry, noJitter)),
      [100, 200, 400, 800, 1_000, 1_000],
    );
  });

  test("jitter only shortens, by at most the jitter fraction", () => {
    assert.equal(backoffMs(policy, 2, () => 0.999999), 200 * (1 - 0.5 * 0.999999));
  });

  test("bad policies are refused", () => {
    assert.throws(() => retryPolicy({ maxAttempts: 0 }), RangeError);
    assert.throws(() => retryPolicy({ jitter: 2 }), RangeError);
  });
});

describe("withRetry", () => {
  const fast = retryPolicy({ maxAttempts: 4, initialBackoffMs: 1, maxBackoffMs: 1 });

  test("retries UNAVAILABLE, DEADLINE_EXCEEDED and ABORTED, then returns the answer", async () => {
    const codes = [Code.Unavailable, Code.DeadlineExceeded, Code.Aborted];
    const attempts: number[] = [];
    const answer = await withRetry(fast, async ({ attempt }) => {
      attempts.push(attempt);
      const code = codes[attempt - 1];
      if (code !== undefined) throw new ConnectError("try again", code);
      return "ok";
    });
    assert.equal(answer, "ok");
    assert.deepEqual(attempts, [1, 2, 3, 4]);
  });

  test("gives up after maxAttempts with the last error and the attempt count", async () => {
    let calls = 0;
    const error = await withRetry(fast, async () => {
      calls++;
      throw new ConnectError("down", Code.Unavailable);
    }).catch((e: unknown) => e);
    assert.ok(error instanceof UsageServiceError);
    assert.equal(error.codeName, "UNAVAILABLE");
    assert.equal(error.attempts, 4);
    assert.equal(calls, 4);
  });

  test("does not retry other codes", async () => {
    let calls = 0;
    const error = await withRetry(fast, async () => {
      calls++;
      throw new ConnectError("bad", Code.InvalidArgument);
    }).catch((e: unknown) => e);
    assert.ok(error instanceof UsageServiceError);
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.equal(calls, 1);
  });

  test("an aborted signal stops the retries", async () => {
    const controller = new AbortController();
    let calls = 0;
    const slow = retryPolicy({ maxAttempts: 10, initialBackoffMs: 60_000, maxBackoffMs: 60_000 });
    const pending = withRetry(
      slow,
      async () => {
        calls++;
        throw new ConnectError("down", Code.Unavailable);
      },
      controller.signal,
      () => controller.abort(),
    ).catch((e: unknown) => e);
    const error = await pending;
    assert.ok(error instanceof UsageServiceError);
    assert.equal(calls, 1);
  });
});

describe("toUsageServiceError", () => {
  test("decodes ErrorInfo and BadRequest from the error details", () => {
    const info = create(ErrorInfoSchema, { reason: "INVALID_REQUEST", domain: "usage.v1", metadata: { a: "b" } });
    const badRequest = create(BadRequestSchema, {
      fieldViolations: [{ field: "requests[3].quantity", description: "must be >= 0" }],
    });
    const connect = new ConnectError("invalid request", Code.InvalidArgument);
    // As the gRPC transport leaves them after reading grpc-status-details-bin: type name + bytes.
    connect.details = [
      { type: "google.rpc.ErrorInfo", value: toBinary(ErrorInfoSchema, info) },
      { type: "google.rpc.BadRequest", value: toBinary(BadRequestSchema, badRequest) },
    ];
    const error = toUsageServiceError(connect, 2);
    assert.equal(error.code, Code.InvalidArgument);
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.equal(error.reason, "INVALID_REQUEST");
    assert.equal(error.domain, "usage.v1");
    assert.deepEqual(error.metadata, { a: "b" });
    assert.deepEqual(error.fieldViolations, [
      { field: "requests[3].quantity", description: "must be >= 0", reason: "" },
    ]);
    assert.equal(error.violation("requests[3].quantity")?.description, "must be >= 0");
    assert.equal(error.attempts, 2);
    assert.equal(error.message, "invalid request");
    assert.equal(error.cause, connect);
  });

  test("an error without details still maps, with empty details", () => {
    const error = toUsageServiceError(new Error("boom"), 1);
    assert.equal(error.codeName, "UNKNOWN");
    assert.equal(error.reason, undefined);
    assert.deepEqual(error.fieldViolations, []);
  });
});

describe("conversions", () => {
  const base = {
    customerId: "cus_1",
    planId: "starter",
    subscriptionStatus: "ACTIVE" as const,
    currentPeriodStartTime: new Date("2026-01-31T09:00:00Z"),
    currentPeriodEndTime: new Date("2026-02-28T09:00:00Z"),
  };

  test("the cadence and anchor are sent", () => {
    const anchor = new Date("2025-10-31T09:00:00Z");
    const message = customerMessage({
      ...base,
      billingInterval: "MONTH",
      billingIntervalCount: 3,
      billingCycleAnchorTime: anchor,
    });
    assert.equal(message.billingInterval, BillingInterval.MONTH);
    assert.equal(message.billingIntervalCount, 3);
    assert.equal(customer(message).billingCycleAnchorTime?.getTime(), anchor.getTime());
  });

  test("left out, the cadence is UNSPECIFIED and there is no anchor", () => {
    const message = customerMessage(base);
    assert.equal(message.billingInterval, BillingInterval.UNSPECIFIED);
    assert.equal(message.billingIntervalCount, 0);
    assert.equal(message.billingCycleAnchorTime, undefined);
    assert.equal(message.currentPeriodSource, PeriodSource.UNSPECIFIED);
  });

  test("an unknown billing interval name is refused", () => {
    assert.throws(
      () => customerMessage({ ...base, billingInterval: "FORTNIGHT" as "DAY" }),
      /unknown billing interval "FORTNIGHT"/,
    );
  });

  test("a stored customer reads its cadence and period source", () => {
    const message = customerMessage({ ...base, billingInterval: "YEAR" });
    message.currentPeriodSource = PeriodSource.PROJECTED;
    const read = customer(message);
    assert.equal(read.billingInterval, "YEAR");
    assert.equal(read.billingIntervalCount, 0);
    assert.equal(read.billingCycleAnchorTime, undefined);
    assert.equal(read.currentPeriodSource, "PROJECTED");
  });

  test("unknown enum values read as UNSPECIFIED", () => {
    const message = customerMessage(base);
    message.billingInterval = 99 as BillingInterval;
    message.currentPeriodSource = 99 as PeriodSource;
    const read = customer(message);
    assert.equal(read.billingInterval, "UNSPECIFIED");
    assert.equal(read.currentPeriodSource, "UNSPECIFIED");
  });

  test("an entitlement carries its period source", () => {
    const response = create(CheckEntitlementResponseSchema, {
      allowed: true,
      periodSource: PeriodSource.CONFIRMED,
    });
    assert.equal(entitlement(response).periodSource, "CONFIRMED");
    assert.equal(entitlement(create(CheckEntitlementResponseSchema)).periodSource, "UNSPECIFIED");
  });

  test("a summary carries its period source and the unbilled usage", () => {
    const response = create(GetUsageSummaryResponseSchema, {
      customerId: "cus_1",
      periodSource: PeriodSource.PROJECTED,
      meters: [{ meter: "tokens", used: 120n, unbilled: 120n }],
    });
    const summary = usageSummary(response);
    assert.equal(summary.periodSource, "PROJECTED");
    assert.equal(summary.meters[0]?.unbilled, 120n);
    assert.equal(summary.meters[0]?.pending, 0n);
  });

  test("a prepaid check reads its balance, covered units and rule; an arrears one no balance", () => {
    const prepaid = entitlement(
      create(CheckEntitlementResponseSchema, {
        reason: EntitlementReason.BALANCE_EXHAUSTED,
        balance: 70n,
        covered: 30n,
        rule: { billing: "prepaid", overage: false, limit: 20n, ceiling: 30n },
      }),
    );
    assert.deepEqual([prepaid.reason, prepaid.balance, prepaid.covered], ["BALANCE_EXHAUSTED", 70n, 30n]);
    assert.deepEqual([prepaid.rule?.billing, prepaid.rule?.overage, prepaid.rule?.ceiling], ["prepaid", false, 30n]);
    const arrears = entitlement(create(CheckEntitlementResponseSchema, { rule: { billing: "arrears" } }));
    assert.deepEqual([arrears.balance, arrears.covered, arrears.rule?.ceiling], [undefined, 0n, undefined]);
  });

  test("a meter reads its credits", () => {
    const expiry = new Date("2026-02-28T09:00:00Z");
    const summary = usageSummary(
      create(GetUsageSummaryResponseSchema, {
        meters: [
          {
            meter: "tokens",
            billing: "prepaid",
            granted: 1000n,
            burned: 700n,
            balance: 300n,
            covered: 700n,
            billableOverage: 200n,
            ceiling: 1500n,
            nextExpireTime: timestampFromDate(expiry),
          },
          { meter: "calls" },
        ],
      }),
    );
    const [tokens, calls] = summary.meters;
    assert.deepEqual(
      [tokens?.billing, tokens?.granted, tokens?.burned, tokens?.balance, tokens?.covered, tokens?.billableOverage],
      ["prepaid", 1000n, 700n, 300n, 700n, 200n],
    );
    assert.deepEqual([tokens?.ceiling, tokens?.nextExpireTime?.getTime()], [1500n, expiry.getTime()]);
    assert.deepEqual([calls?.ceiling, calls?.nextExpireTime, calls?.billing], [undefined, undefined, ""]);
  });

  test("a grant reads its optional times and enum names", () => {
    const start = new Date("2026-01-31T09:00:00Z");
    const message = create(GrantSchema, {
      grantId: "g_1",
      amount: 500n,
      priority: 2,
      source: GrantSource.TOP_UP,
      state: GrantState.ACTIVE,
      burned: 120n,
      remaining: 380n,
      effectiveTime: timestampFromDate(start),
      createTime: timestampFromDate(start),
    });
    const read = grant(message);
    assert.deepEqual(
      [read.grantId, read.amount, read.priority, read.source, read.state, read.burned, read.remaining],
      ["g_1", 500n, 2, "TOP_UP", "ACTIVE", 120n, 380n],
    );
    assert.equal(read.effectiveTime?.getTime(), start.getTime());
    assert.deepEqual([read.expireTime, read.voidTime], [undefined, undefined]);
    message.source = 99 as GrantSource;
    assert.equal(grant(message).source, "UNSPECIFIED");
    assert.throws(() => grant(undefined), TypeError);
  });

  test("a grant request sends its times only when given", () => {
    const bare = createGrantRequest({ customerId: "c", feature: "tokens", amount: 10, idempotencyKey: "k" });
    assert.deepEqual(
      [bare.amount, bare.priority, bare.effectiveTime, bare.expireTime],
      [10n, 0, undefined, undefined],
    );
    const expires = new Date("2026-03-01T00:00:00Z");
    const timed = createGrantRequest({
      customerId: "c", feature: "tokens", amount: 10n, idempotencyKey: "k", priority: 3, expireTime: expires,
    });
    assert.equal(timed.priority, 3);
    assert.equal(timed.expireTime?.seconds, BigInt(expires.getTime() / 1000));
  });
});
