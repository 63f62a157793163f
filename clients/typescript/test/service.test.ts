/** Every RPC of usage.v1 (and grpc.health.v1) through the client, against a live usage-service. */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  idempotencyKey,
  UsageServiceError,
  type Customer,
  type CustomerInput,
  type MeterUsage,
  type UsageClient,
} from "../src/index.js";
import { activeCustomer, Fixture, uniqueId } from "./harness.js";

const DAY_MS = 24 * 60 * 60 * 1000;

const fixture = new Fixture();
let client: UsageClient;

before(async () => {
  client = await fixture.start();
});

after(async () => {
  await fixture.stop();
});

/** Awaits a promise that must fail, and returns its UsageServiceError. */
async function failure(promise: Promise<unknown>): Promise<UsageServiceError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof UsageServiceError, `expected a UsageServiceError, got ${String(error)}`);
    return error;
  }
  assert.fail("the call succeeded");
}

async function newCustomer(planId = "starter"): Promise<string> {
  const customerId = uniqueId("cus");
  await client.upsertCustomer(activeCustomer(customerId, planId));
  return customerId;
}

async function used(customerId: string, meter: string): Promise<bigint> {
  const summary = await client.getUsageSummary(customerId, { meter });
  assert.equal(summary.meters.length, 1);
  return summary.meters[0]!.used;
}

describe("health", () => {
  test("the standard grpc.health.v1 check answers SERVING", async () => {
    assert.equal(await client.checkHealth(), "SERVING");
  });
});

describe("CustomerService", () => {
  test("UpsertCustomer then GetCustomer round-trips every field", async () => {
    const start = new Date(Date.now() - 3 * DAY_MS);
    const end = new Date(start.getTime() + 7 * DAY_MS);
    const input: CustomerInput = {
      customerId: uniqueId("cus"),
      planId: "starter",
      subscriptionStatus: "ACTIVE",
      currentPeriodStartTime: start,
      currentPeriodEndTime: end,
      provider: "LEMON_SQUEEZY",
      providerCustomerId: "ls-123",
      subscriptionItems: { llm_tokens: "item-1" },
    };
    // The answer adds the cadence inferred from the period (a week, anchored on its end) and says
    // the period is confirmed (now lies inside it).
    const expected: Customer = {
      customerId: input.customerId,
      planId: "starter",
      subscriptionStatus: "ACTIVE",
      currentPeriodStartTime: start,
      currentPeriodEndTime: end,
      provider: "LEMON_SQUEEZY",
      providerCustomerId: "ls-123",
      subscriptionItems: { llm_tokens: "item-1" },
      billingInterval: "WEEK",
      billingIntervalCount: 1,
      billingCycleAnchorTime: end,
      currentPeriodSource: "CONFIRMED",
    };
    assert.deepEqual(await client.upsertCustomer(input), expected);
    assert.deepEqual(await client.getCustomer(input.customerId), expected);
  });

  test("UpsertCustomer replaces the customer", async () => {
    const customerId = await newCustomer();
    await client.upsertCustomer({ ...activeCustomer(customerId), subscriptionStatus: "PAST_DUE" });
    assert.equal((await client.getCustomer(customerId)).subscriptionStatus, "PAST_DUE");
  });

  test("GetCustomer of an unknown id is NOT_FOUND with ErrorInfo CUSTOMER_NOT_FOUND", async () => {
    const customerId = uniqueId("missing");
    const error = await failure(client.getCustomer(customerId));
    assert.equal(error.codeName, "NOT_FOUND");
    assert.equal(error.reason, "CUSTOMER_NOT_FOUND");
    assert.equal(error.domain, "usage.v1");
    assert.equal(error.metadata.customer_id, customerId);
    assert.equal(error.attempts, 1, "NOT_FOUND is not retried");
  });

  test("UpsertCustomer with an unknown plan is INVALID_ARGUMENT naming the field", async () => {
    const error = await failure(
      client.upsertCustomer({ ...activeCustomer(uniqueId("cus")), planId: "no-such-plan" }),
    );
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.equal(error.reason, "INVALID_REQUEST");
    assert.deepEqual(
      error.fieldViolations.map((v) => v.field),
      ["customer.plan_id"],
    );
  });
});

describe("RecordUsage", () => {
  test("a new key records an event; the same key again is a duplicate of it", async () => {
    const customerId = await newCustomer();
    const key = idempotencyKey("test-record", customerId);
    const input = { customerId, meter: "llm_tokens", quantity: 42, idempotencyKey: key };
    const first = await client.recordUsage(input);
    assert.equal(first.duplicate, false);
    assert.ok(first.eventId.length > 0);
    const again = await client.recordUsage(input);
    assert.deepEqual(again, { eventId: first.eventId, duplicate: true });
    assert.equal(await used(customerId, "llm_tokens"), 42n, "the duplicate was not counted");
  });

  test("the same key with another payload is ALREADY_EXISTS and the first event stays", async () => {
    const customerId = await newCustomer();
    const key = idempotencyKey("test-conflict", customerId);
    const first = await client.recordUsage({ customerId, meter: "llm_tokens", quantity: 5, idempotencyKey: key });
    const error = await failure(
      client.recordUsage({ customerId, meter: "llm_tokens", quantity: 6, idempotencyKey: key }),
    );
    assert.equal(error.codeName, "ALREADY_EXISTS");
    assert.equal(error.reason, "IDEMPOTENCY_KEY_REUSED");
    assert.equal(error.domain, "usage.v1");
    assert.equal(error.metadata.event_id, first.eventId);
    assert.equal(error.attempts, 1);
    assert.equal(await used(customerId, "llm_tokens"), 5n);
  });

  test("event time and properties are accepted", async () => {
    const customerId = await newCustomer();
    const result = await client.recordUsage({
      customerId,
      meter: "llm_tokens",
      quantity: 3n,
      idempotencyKey: idempotencyKey("test-props", customerId),
      eventTime: new Date(Date.now() - 60_000),
      properties: { model: "small" },
    });
    assert.equal(result.duplicate, false);
    assert.equal(await used(customerId, "llm_tokens"), 3n);
  });

  test("a negative quantity and a missing key are INVALID_ARGUMENT with a BadRequest", async () => {
    const customerId = await newCustomer();
    const error = await failure(
      client.recordUsage({ customerId, meter: "llm_tokens", quantity: -1, idempotencyKey: "" }),
    );
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.equal(error.reason, "INVALID_REQUEST");
    const fields = error.fieldViolations.map((v) => v.field).sort();
    assert.deepEqual(fields, ["idempotency_key", "quantity"]);
    assert.ok(error.violation("quantity")!.description.length > 0);
    assert.equal(error.attempts, 1, "INVALID_ARGUMENT is not retried");
  });
});

describe("BatchRecordUsage", () => {
  test("records in order and reports duplicates per item, never failing the batch", async () => {
    const customerId = await newCustomer();
    const item = (n: number, quantity = 10) => ({
      customerId,
      meter: "llm_tokens",
      quantity,
      idempotencyKey: idempotencyKey("test-batch", customerId, n),
    });
    const earlier = await client.recordUsage(item(0));
    const results = await client.batchRecordUsage([item(0), item(1), item(2), item(1)]);
    assert.equal(results.length, 4);
    assert.deepEqual(results[0], { eventId: earlier.eventId, duplicate: true });
    assert.equal(results[1]!.duplicate, false);
    assert.equal(results[2]!.duplicate, false);
    assert.notEqual(results[1]!.eventId, results[2]!.eventId);
    assert.deepEqual(results[3], { eventId: results[1]!.eventId, duplicate: true });
    assert.equal(await used(customerId, "llm_tokens"), 30n);
  });

  test("one bad item is INVALID_ARGUMENT naming its index, and nothing is stored", async () => {
    const customerId = await newCustomer();
    const items = [0, 1, 2, 3].map((n) => ({
      customerId,
      meter: "llm_tokens",
      quantity: n === 3 ? -5 : 1,
      idempotencyKey: idempotencyKey("test-batch-bad", customerId, n),
    }));
    const error = await failure(client.batchRecordUsage(items));
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.equal(error.reason, "INVALID_REQUEST");
    assert.equal(error.domain, "usage.v1");
    assert.deepEqual(
      error.fieldViolations.map((v) => v.field),
      ["requests[3].quantity"],
    );
    assert.equal(await used(customerId, "llm_tokens"), 0n, "no partial write");
    const retried = await client.batchRecordUsage(items.slice(0, 3));
    assert.ok(retried.every((r) => !r.duplicate), "the valid items were not stored by the failed batch");
  });

  test("an empty batch is INVALID_ARGUMENT", async () => {
    const error = await failure(client.batchRecordUsage([]));
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.ok(error.fieldViolations.some((v) => v.field === "requests"), JSON.stringify(error.fieldViolations));
  });
});

describe("CheckEntitlement", () => {
  test("within the limit: allowed, WITHIN_LIMIT, with the plan's numbers and period", async () => {
    const input = activeCustomer(uniqueId("cus"));
    const customerId = input.customerId;
    await client.upsertCustomer(input);
    const answer = await client.checkEntitlement({ customerId, feature: "llm_tokens", quantity: 50 });
    assert.equal(answer.allowed, true);
    assert.equal(answer.reason, "WITHIN_LIMIT");
    assert.equal(answer.used, 0n);
    assert.equal(answer.included, 100n);
    assert.equal(answer.limit, 1000n);
    assert.equal(answer.remaining, 1000n);
    assert.equal(answer.eventId, "", "a check without consume records nothing");
    assert.equal(answer.periodStartTime?.getTime(), input.currentPeriodStartTime.getTime());
    assert.equal(answer.periodEndTime?.getTime(), input.currentPeriodEndTime.getTime());
    assert.equal(answer.periodSource, "CONFIRMED");
    assert.equal(await used(customerId, "llm_tokens"), 0n);
  });

  test("past a hard limit: denied with LIMIT_EXCEEDED, as an answer and not an error", async () => {
    const customerId = await newCustomer();
    await client.recordUsage({
      customerId,
      meter: "llm_tokens",
      quantity: 990,
      idempotencyKey: idempotencyKey("test-limit", customerId),
    });
    const answer = await client.checkEntitlement({ customerId, feature: "llm_tokens", quantity: 11 });
    assert.equal(answer.allowed, false);
    assert.equal(answer.reason, "LIMIT_EXCEEDED");
    assert.equal(answer.used, 990n);
    assert.equal(answer.remaining, 10n);
    const fits = await client.checkEntitlement({ customerId, feature: "llm_tokens", quantity: 10 });
    assert.equal(fits.allowed, true);
  });

  test("consume records atomically; the same key consumes once", async () => {
    const customerId = await newCustomer();
    const key = idempotencyKey("test-consume", customerId, "job-1");
    const request = { customerId, feature: "llm_tokens", quantity: 600, consume: true, idempotencyKey: key };
    const first = await client.checkEntitlement(request);
    assert.equal(first.allowed, true);
    assert.equal(first.reason, "WITHIN_LIMIT");
    assert.equal(first.used, 600n);
    assert.equal(first.duplicate, false);
    assert.ok(first.eventId.length > 0);
    const again = await client.checkEntitlement(request);
    assert.equal(again.allowed, true);
    assert.equal(again.duplicate, true);
    assert.equal(again.eventId, first.eventId);
    assert.equal(await used(customerId, "llm_tokens"), 600n);
    const denied = await client.checkEntitlement({
      ...request,
      idempotencyKey: idempotencyKey("test-consume", customerId, "job-2"),
    });
    assert.equal(denied.allowed, false);
    assert.equal(denied.reason, "LIMIT_EXCEEDED");
    assert.equal(denied.eventId, "");
    assert.equal(await used(customerId, "llm_tokens"), 600n, "a denied consume records nothing");
  });

  test("a consume is kept: getDecision returns it exactly as answered, and a replay names it", async () => {
    const customerId = await newCustomer();
    const before = Date.now();
    const key = idempotencyKey("test-decision", customerId);
    const request = { customerId, feature: "llm_tokens", quantity: 400, consume: true, idempotencyKey: key };
    const first = await client.checkEntitlement(request);
    assert.equal(first.allowed, true);
    assert.ok(first.decisionId.length > 0);
    assert.ok(first.totalsVersion > 0n);
    assert.ok(first.asOfTime !== undefined && first.asOfTime.getTime() >= before - 1000);
    assert.deepEqual(first.rule, {
      planId: "starter",
      feature: "llm_tokens",
      included: 100n,
      limit: 1000n,
      enforcement: "hard",
      enabled: false,
      billing: "arrears",
      overage: false,
      ceiling: undefined,
    });
    const kept = await client.getDecision(first.decisionId);
    assert.deepEqual(kept, {
      decisionId: first.decisionId,
      customerId,
      feature: "llm_tokens",
      quantity: 400n,
      consume: true,
      response: first,
    });
    const replay = await client.checkEntitlement(request);
    assert.equal(replay.duplicate, true);
    assert.equal(replay.decisionId, first.decisionId);
    const check = await client.checkEntitlement({ customerId, feature: "llm_tokens" });
    assert.equal(check.totalsVersion, first.totalsVersion, "a check reads the version the consume committed");
    assert.equal(check.decisionId, "", "an allowed check is not kept");
  });

  test("getDecision of an unknown id is NOT_FOUND, of a non-UUID INVALID_ARGUMENT", async () => {
    const missing = await failure(client.getDecision("00000000-0000-4000-8000-000000000000"));
    assert.equal(missing.codeName, "NOT_FOUND");
    assert.equal(missing.reason, "DECISION_NOT_FOUND");
    const invalid = await failure(client.getDecision("yesterday at 14:03"));
    assert.equal(invalid.codeName, "INVALID_ARGUMENT");
    assert.ok(invalid.violation("decision_id"), JSON.stringify(invalid.fieldViolations));
  });

  test("consume without an idempotency key is INVALID_ARGUMENT", async () => {
    const customerId = await newCustomer();
    const error = await failure(
      client.checkEntitlement({ customerId, feature: "llm_tokens", quantity: 1, consume: true }),
    );
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.ok(error.violation("idempotency_key"), JSON.stringify(error.fieldViolations));
  });

  test("an unknown customer is denied with CUSTOMER_NOT_FOUND", async () => {
    const answer = await client.checkEntitlement({ customerId: uniqueId("missing"), feature: "llm_tokens", quantity: 1 });
    assert.equal(answer.allowed, false);
    assert.equal(answer.reason, "CUSTOMER_NOT_FOUND");
  });

  test("boolean features, features outside the plan, inactive subscriptions, soft limits", async () => {
    const customerId = await newCustomer();
    const sso = await client.checkEntitlement({ customerId, feature: "sso" });
    assert.deepEqual([sso.allowed, sso.reason], [true, "FEATURE_ENABLED"]);
    const missing = await client.checkEntitlement({ customerId, feature: "no_such_feature" });
    assert.deepEqual([missing.allowed, missing.reason], [false, "FEATURE_NOT_IN_PLAN"]);
    const calls = [...Array(10).keys()].map((n) => ({
      customerId,
      meter: "api_calls",
      quantity: 1,
      idempotencyKey: idempotencyKey("test-soft", customerId, n),
    }));
    await client.batchRecordUsage(calls);
    const soft = await client.checkEntitlement({ customerId, feature: "api_calls", quantity: 1 });
    assert.deepEqual([soft.allowed, soft.reason], [true, "SOFT_LIMIT_EXCEEDED"]);
    await client.upsertCustomer({ ...activeCustomer(customerId), subscriptionStatus: "CANCELED" });
    const inactive = await client.checkEntitlement({ customerId, feature: "llm_tokens", quantity: 1 });
    assert.deepEqual([inactive.allowed, inactive.reason], [false, "SUBSCRIPTION_INACTIVE"]);
  });
});

describe("GetUsageSummary", () => {
  test("per meter: used, included, limit, remaining, overage, pending, unbilled, aggregation, unit", async () => {
    const customerId = await newCustomer();
    await client.batchRecordUsage([
      { customerId, meter: "llm_tokens", quantity: 70, idempotencyKey: idempotencyKey("sum", customerId, 1) },
      { customerId, meter: "llm_tokens", quantity: 80, idempotencyKey: idempotencyKey("sum", customerId, 2) },
      { customerId, meter: "seats", quantity: 2, idempotencyKey: idempotencyKey("sum", customerId, 3) },
    ]);
    const summary = await client.getUsageSummary(customerId);
    assert.equal(summary.customerId, customerId);
    assert.equal(summary.planId, "starter");
    assert.equal(summary.subscriptionStatus, "ACTIVE");
    assert.ok(summary.periodStartTime && summary.periodEndTime);
    assert.equal(summary.periodSource, "CONFIRMED");
    const byMeter = new Map(summary.meters.map((m) => [m.meter, m]));
    assert.deepEqual([...byMeter.keys()].sort(), ["api_calls", "llm_tokens", "seats"]);
    // No provider: the usage is unbilled (never reported), none of it pending.
    const tokens: MeterUsage = {
      meter: "llm_tokens",
      used: 150n,
      included: 100n,
      limit: 1000n,
      remaining: 850n,
      overage: 50n,
      reported: 0n,
      pending: 0n,
      failed: 0n,
      aggregation: "sum",
      unit: "tokens",
      unbilled: 150n,
      billing: "arrears",
      granted: 0n,
      burned: 0n,
      balance: 0n,
      nextExpireTime: undefined,
      covered: 0n,
      billableOverage: 0n,
      ceiling: undefined,
    };
    assert.deepEqual(byMeter.get("llm_tokens"), tokens);
    const seats = byMeter.get("seats")!;
    assert.equal(seats.used, 2n);
    assert.equal(seats.overage, 1n);
    assert.equal(seats.aggregation, "last");
  });

  test("the meter filter returns only that meter", async () => {
    const customerId = await newCustomer();
    const summary = await client.getUsageSummary(customerId, { meter: "api_calls" });
    assert.deepEqual(summary.meters.map((m) => m.meter), ["api_calls"]);
  });

  test("an unknown customer is NOT_FOUND", async () => {
    const error = await failure(client.getUsageSummary(uniqueId("missing")));
    assert.equal(error.codeName, "NOT_FOUND");
    assert.equal(error.reason, "CUSTOMER_NOT_FOUND");
  });
});

/**
 * The `prepaid` plan of test/fixtures/plans.toml: llm_tokens burns grants and allows no usage beyond
 * them, with a plan grant of 100 a period at priority 5 (top-ups at priority 0 burn first);
 * api_calls burns grants and bills the rest as overage, with a soft limit of 10 and a ceiling of 15.
 */
describe("CreditService", () => {
  test("a top-up pays for a consume, is listed in burn order with the plan's grant, and is voided", async () => {
    const input = activeCustomer(uniqueId("cus"), "prepaid");
    const customerId = input.customerId;
    await client.upsertCustomer(input);
    const expireTime = new Date(Math.floor(Date.now() / 1000) * 1000 + 10 * DAY_MS);
    const key = idempotencyKey("test-grant", customerId);
    const request = { customerId, feature: "llm_tokens", amount: 500, idempotencyKey: key, expireTime };
    const created = await client.createGrant(request);
    const topUp = created.grant;
    assert.equal(created.duplicate, false);
    assert.ok(topUp.grantId.length > 0);
    assert.deepEqual(
      [topUp.customerId, topUp.feature, topUp.amount, topUp.priority, topUp.source, topUp.state],
      [customerId, "llm_tokens", 500n, 0, "TOP_UP", "ACTIVE"],
    );
    assert.deepEqual([topUp.burned, topUp.remaining, topUp.forfeited], [0n, 500n, 0n]);
    assert.equal(topUp.expireTime?.getTime(), expireTime.getTime());
    assert.equal(topUp.voidTime, undefined);
    assert.equal(topUp.idempotencyKey, key);
    assert.ok(topUp.effectiveTime !== undefined && topUp.createTime !== undefined);
    assert.deepEqual(await client.createGrant(request), { grant: topUp, duplicate: true });

    const spent = await client.checkEntitlement({
      customerId, feature: "llm_tokens", quantity: 300, consume: true,
      idempotencyKey: idempotencyKey("test-grant-consume", customerId, 1),
    });
    assert.deepEqual([spent.allowed, spent.reason], [true, "WITHIN_LIMIT"]);
    assert.deepEqual([spent.used, spent.covered, spent.balance], [300n, 300n, 300n]);
    assert.deepEqual(spent.rule, {
      planId: "prepaid",
      feature: "llm_tokens",
      included: 0n,
      limit: undefined,
      enforcement: "hard",
      enabled: false,
      billing: "prepaid",
      overage: false,
      ceiling: undefined,
    });
    const denied = await client.checkEntitlement({
      customerId, feature: "llm_tokens", quantity: 301, consume: true,
      idempotencyKey: idempotencyKey("test-grant-consume", customerId, 2),
    });
    assert.deepEqual([denied.allowed, denied.reason, denied.balance, denied.eventId], [
      false, "BALANCE_EXHAUSTED", 300n, "",
    ]);

    const listed = await client.listGrants(customerId);
    assert.deepEqual(
      listed.map((g) => [g.source, g.priority, g.burned, g.remaining]),
      [["TOP_UP", 0, 300n, 200n], ["PLAN", 5, 0n, 100n]],
    );
    assert.equal(listed[0]!.grantId, topUp.grantId);
    const planGrant = listed[1]!;
    assert.ok(planGrant.idempotencyKey.startsWith("plan:llm_tokens:"), planGrant.idempotencyKey);
    assert.equal(planGrant.effectiveTime?.getTime(), input.currentPeriodStartTime.getTime());
    assert.equal(planGrant.expireTime?.getTime(), input.currentPeriodEndTime.getTime());
    assert.deepEqual(await client.listGrants(customerId, { feature: "api_calls" }), []);

    const tokens = (await client.getUsageSummary(customerId, { meter: "llm_tokens" })).meters[0]!;
    assert.deepEqual(
      [tokens.billing, tokens.granted, tokens.burned, tokens.balance, tokens.covered, tokens.billableOverage],
      ["prepaid", 600n, 300n, 300n, 300n, 0n],
    );
    assert.equal(tokens.nextExpireTime?.getTime(), expireTime.getTime());

    const voided = await client.voidGrant(customerId, topUp.grantId);
    assert.equal(voided.voided, 200n);
    assert.deepEqual([voided.grant.state, voided.grant.remaining, voided.grant.forfeited], ["VOIDED", 0n, 200n]);
    assert.ok(voided.grant.voidTime !== undefined);
    const twice = await client.voidGrant(customerId, topUp.grantId);
    assert.equal(twice.voided, 0n, "voiding twice removes nothing");
    assert.deepEqual((await client.listGrants(customerId)).map((g) => g.grantId), [planGrant.grantId]);
    assert.deepEqual(
      (await client.listGrants(customerId, { includeInactive: true })).map((g) => [g.grantId, g.state]),
      [[topUp.grantId, "VOIDED"], [planGrant.grantId, "ACTIVE"]],
    );
    const after = (await client.getUsageSummary(customerId, { meter: "llm_tokens" })).meters[0]!;
    assert.deepEqual([after.balance, after.covered], [100n, 300n]);
  });

  test("grants cover usage; the rest is overage, allowed past the soft limit up to the ceiling", async () => {
    const customerId = uniqueId("cus");
    // A customer with a provider: the usage the grants do not cover is billed as overage.
    const withProvider = { provider: "STRIPE", providerCustomerId: "cus_stripe_credits" } as const;
    await client.upsertCustomer({ ...activeCustomer(customerId, "prepaid"), ...withProvider });
    const created = await client.createGrant({
      customerId,
      feature: "api_calls",
      amount: 2n,
      priority: 1,
      idempotencyKey: idempotencyKey("calls-pack", customerId),
    });
    assert.equal(created.grant.expireTime, undefined);
    const calls = (n: number, from = 0) =>
      [...Array(n).keys()].map((i) => ({
        customerId, meter: "api_calls", quantity: 1, idempotencyKey: idempotencyKey("calls", customerId, from + i),
      }));
    // A count meter: each event takes one unit, so the third one is overage.
    await client.batchRecordUsage(calls(3));
    const meter = (await client.getUsageSummary(customerId, { meter: "api_calls" })).meters[0]!;
    assert.deepEqual(
      [meter.billing, meter.used, meter.covered, meter.billableOverage, meter.balance, meter.unbilled],
      ["prepaid", 3n, 2n, 1n, 0n, 0n],
    );
    assert.deepEqual([meter.limit, meter.ceiling, meter.nextExpireTime], [10n, 15n, undefined]);
    const check = await client.checkEntitlement({ customerId, feature: "api_calls", quantity: 1 });
    assert.deepEqual([check.allowed, check.balance, check.covered], [true, 0n, 0n]);
    assert.deepEqual(
      [check.rule?.billing, check.rule?.overage, check.rule?.ceiling, check.rule?.enforcement],
      ["prepaid", true, 15n, "soft"],
    );
    await client.batchRecordUsage(calls(9, 3));
    const soft = await client.checkEntitlement({ customerId, feature: "api_calls", quantity: 1 });
    assert.deepEqual([soft.allowed, soft.reason], [true, "SOFT_LIMIT_EXCEEDED"]);
    await client.batchRecordUsage(calls(3, 12));
    const over = await client.checkEntitlement({ customerId, feature: "api_calls", quantity: 1 });
    assert.deepEqual([over.allowed, over.reason], [false, "LIMIT_EXCEEDED"]);
    assert.deepEqual(await client.listGrants(customerId, { feature: "api_calls" }), []);
    const inactive = await client.listGrants(customerId, { feature: "api_calls", includeInactive: true });
    assert.deepEqual(
      inactive.map((g) => [g.grantId, g.state, g.burned, g.remaining]),
      [[created.grant.grantId, "SPENT", 2n, 0n]],
    );
  });

  test("an arrears feature has no balance", async () => {
    const customerId = await newCustomer();
    const check = await client.checkEntitlement({ customerId, feature: "llm_tokens", quantity: 1 });
    assert.deepEqual([check.balance, check.covered, check.rule?.billing], [undefined, 0n, "arrears"]);
  });

  test("errors: a reserved key and no amount, a key reused for another grant, an unknown grant", async () => {
    const customerId = await newCustomer("prepaid");
    const invalid = await failure(
      client.createGrant({ customerId, feature: "llm_tokens", amount: 0, idempotencyKey: "plan:mine" }),
    );
    assert.equal(invalid.codeName, "INVALID_ARGUMENT");
    assert.deepEqual(invalid.fieldViolations.map((v) => v.field).sort(), ["amount", "idempotency_key"]);
    const key = idempotencyKey("test-grant-conflict", customerId);
    await client.createGrant({ customerId, feature: "llm_tokens", amount: 10, idempotencyKey: key });
    const reused = await failure(
      client.createGrant({ customerId, feature: "llm_tokens", amount: 11, idempotencyKey: key }),
    );
    assert.equal(reused.codeName, "ALREADY_EXISTS");
    assert.equal(reused.attempts, 1);
    const missing = await failure(client.voidGrant(customerId, "00000000-0000-4000-8000-000000000000"));
    assert.equal(missing.codeName, "NOT_FOUND");
    assert.equal(missing.reason, "GRANT_NOT_FOUND");
    const nobody = await failure(client.listGrants(uniqueId("missing")));
    assert.equal(nobody.reason, "CUSTOMER_NOT_FOUND");
  });
});
