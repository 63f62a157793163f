/** The examples in examples/, against a live usage-service: as functions and as scripts. */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { runIfAllowed } from "../examples/check-and-consume.js";
import { recordCompletionUsage } from "../examples/record-usage.js";
import { formatSummary, showSummary } from "../examples/show-summary.js";
import { thisMonth, upsertForThisMonth } from "../examples/upsert-customer.js";
import type { UsageClient } from "../src/index.js";
import { activeCustomer, Fixture, PACKAGE_ROOT, uniqueId } from "./harness.js";

const fixture = new Fixture();
let client: UsageClient;

before(async () => {
  client = await fixture.start();
});

after(async () => {
  await fixture.stop();
});

function runExample(name: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      [join(PACKAGE_ROOT, "dist", "examples", `${name}.js`), ...args],
      { env: { ...process.env, USAGE_SERVICE_ADDRESS: fixture.service!.address }, timeout: 30_000 },
      (error, stdout, stderr) => (error ? reject(new Error(`${name}: ${stderr || error.message}`)) : resolve(stdout)),
    );
  });
}

test("upsert-customer: the customer's plan, active, for this calendar month", async () => {
  const customerId = uniqueId("cus");
  const saved = await upsertForThisMonth(client, customerId, "starter");
  const { start, end } = thisMonth(new Date());
  assert.equal(saved.planId, "starter");
  assert.equal(saved.subscriptionStatus, "ACTIVE");
  assert.deepEqual([saved.currentPeriodStartTime, saved.currentPeriodEndTime], [start, end]);
  assert.equal(saved.currentPeriodSource, "CONFIRMED");
  assert.deepEqual(thisMonth(new Date(Date.UTC(2026, 11, 31, 23, 59))), {
    start: new Date(Date.UTC(2026, 11, 1)),
    end: new Date(Date.UTC(2027, 0, 1)),
  });
  await assert.rejects(upsertForThisMonth(client, customerId, "no-such-plan"), /plan/);
});

test("record-usage: a completion is recorded once, however often the code runs", async () => {
  const customerId = uniqueId("cus");
  await client.upsertCustomer(activeCustomer(customerId));
  const completion = { requestId: uniqueId("req"), tokens: 120 };
  const first = await recordCompletionUsage(client, customerId, completion);
  const again = await recordCompletionUsage(client, customerId, completion);
  assert.equal(first.duplicate, false);
  assert.deepEqual(again, { eventId: first.eventId, duplicate: true });
  await assert.rejects(
    recordCompletionUsage(client, customerId, { ...completion, tokens: 121 }),
    /already recorded with other values/,
  );
  const summary = await client.getUsageSummary(customerId, { meter: "llm_tokens" });
  assert.equal(summary.meters[0]?.used, 120n);
});

test("check-and-consume: runs the work when allowed, not when the limit is reached", async () => {
  const customerId = uniqueId("cus");
  await client.upsertCustomer(activeCustomer(customerId));
  let runs = 0;
  const work = async () => ++runs;
  const allowed = await runIfAllowed(client, customerId, "job-1", 900, work);
  assert.ok(allowed.ran);
  assert.equal(allowed.result, 1);
  assert.equal(allowed.remaining, 100n);
  const denied = await runIfAllowed(client, customerId, "job-2", 200, work);
  assert.ok(!denied.ran);
  assert.equal(denied.reason, "LIMIT_EXCEEDED");
  assert.match(denied.message, /limit/);
  assert.equal(runs, 1, "the denied job did not run");
  const unknown = await runIfAllowed(client, uniqueId("missing"), "job-3", 1, work);
  assert.ok(!unknown.ran);
  assert.equal(unknown.reason, "CUSTOMER_NOT_FOUND");
  const summary = await client.getUsageSummary(customerId, { meter: "llm_tokens" });
  assert.equal(summary.meters[0]?.used, 900n, "only the allowed job consumed");
});

test("show-summary: one line per meter with used, included, overage and limit", async () => {
  const customerId = uniqueId("cus");
  await client.upsertCustomer(activeCustomer(customerId));
  await recordCompletionUsage(client, customerId, { requestId: uniqueId("req"), tokens: 150 });
  const lines = await showSummary(client, customerId);
  assert.match(lines[0]!, /^Plan starter \(active\), \d{4}-\d{2}-\d{2} to \d{4}-\d{2}-\d{2}$/);
  assert.ok(lines.includes("llm_tokens: 150 of 100 tokens included (50 over), limit 1000"), lines.join("\n"));
  assert.ok(lines.includes("api_calls: 0 of 5 calls included, limit 10"), lines.join("\n"));
  assert.equal(lines.length, 4);
  assert.deepEqual(
    formatSummary({
      customerId,
      planId: "p",
      subscriptionStatus: "ACTIVE",
      periodStartTime: undefined,
      periodEndTime: undefined,
      meters: [],
      periodSource: "UNSPECIFIED",
    }),
    ["Plan p (active), no current period"],
  );
});

test("the examples run as scripts", async () => {
  const customerId = uniqueId("cus");
  const { start, end } = thisMonth(new Date());
  const month = `${start.toISOString().slice(0, 10)} to ${end.toISOString().slice(0, 10)}`;
  assert.equal(
    await runExample("upsert-customer", [customerId, "starter"]),
    `${customerId}: plan starter (active), ${month}\n`,
  );
  assert.match(await runExample("record-usage", [customerId, "req-1", "30"]), /^recorded \S+\n$/);
  assert.match(await runExample("record-usage", [customerId, "req-1", "30"]), /^already recorded as \S+\n$/);
  assert.equal(await runExample("check-and-consume", [customerId, "job-1", "70"]), "ran; 900 tokens left\n");
  assert.equal(
    await runExample("check-and-consume", [customerId, "job-2", "901"]),
    "You have reached your plan's limit for this period.\n",
  );
  const shown = await runExample("show-summary", [customerId]);
  assert.match(shown, /llm_tokens: 100 of 100 tokens included, limit 1000/);
});
