/** watchUsage's resume loop against an in-memory fake service that ends its streams as told. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";

import { usageChange } from "../src/client.js";
import { ErrorInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";
import { SubscriptionStatus } from "../src/gen/usage/v1/customer_pb.js";
import {
  SnapshotReason,
  UsageChangeKind,
  UsageService,
  WatchUsageResponseSchema,
  type WatchUsageRequest,
} from "../src/gen/usage/v1/usage_pb.js";
import { UsageClient, UsageServiceError, type UsageChange, type WatchUsageInput } from "../src/index.js";

/** What the fake does with one call: send these versions, then end with `code` (none: OK). */
interface Attempt {
  readonly versions: readonly number[];
  readonly code?: Code;
  readonly reason?: string;
}

interface Fake {
  readonly client: UsageClient;
  /** What is left to play. */
  readonly script: Attempt[];
  readonly requests: WatchUsageRequest[];
  readonly timeouts: (number | undefined)[];
  readonly headers: (string | null)[];
  readonly retries: string[];
  /** Resolves when a stream the fake serves is cancelled by the client. */
  readonly cancelled: Promise<void>;
}

const QUICK = { maxAttempts: 4, initialBackoffMs: 1, maxBackoffMs: 5 };

/** Plays one Attempt per WatchUsage call; past the script, every call fails UNAVAILABLE. */
function fake(script: Attempt[], hold = false): Fake {
  const requests: WatchUsageRequest[] = [];
  const timeouts: (number | undefined)[] = [];
  const headers: (string | null)[] = [];
  const retries: string[] = [];
  let onCancel!: () => void;
  const cancelled = new Promise<void>((resolve) => (onCancel = resolve));
  const transport = createRouterTransport(({ service }) => {
    service(UsageService, {
      async *watchUsage(request, context) {
        requests.push(request);
        timeouts.push(context.timeoutMs());
        headers.push(context.requestHeader.get("authorization"));
        context.signal.addEventListener("abort", onCancel, { once: true });
        const attempt = script.shift() ?? { versions: [], code: Code.Unavailable };
        for (const version of attempt.versions) {
          yield create(WatchUsageResponseSchema, {
            version: BigInt(version),
            kind: UsageChangeKind.USAGE,
            meters: [{ meter: "tokens", used: BigInt(version * 10) }],
          });
        }
        if (hold) {
          await new Promise((resolve) => context.signal.addEventListener("abort", resolve, { once: true }));
        }
        if (attempt.code !== undefined) {
          const info = { desc: ErrorInfoSchema, value: { reason: attempt.reason ?? "", domain: "usage.v1" } };
          throw new ConnectError("ended", attempt.code, undefined, [info]);
        }
      },
    });
  });
  const client = new UsageClient({
    address: "unused:1",
    transport,
    retry: QUICK,
    headers: { authorization: "Bearer t0ken" },
    onRetry: (error) => retries.push(`${error.codeName}${error.reason ? ` ${error.reason}` : ""}`),
  });
  return { client, script, requests, timeouts, headers, retries, cancelled };
}

function within<T>(promise: Promise<T>, what: string, ms = 10_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

async function collect(watch: AsyncIterable<UsageChange>): Promise<UsageChange[]> {
  const changes: UsageChange[] = [];
  for await (const change of watch) changes.push(change);
  return changes;
}

function resumedFrom(requests: WatchUsageRequest[]): (bigint | undefined)[] {
  return requests.map((r) => r.resumeAfterVersion);
}

async function failure(promise: Promise<unknown>): Promise<UsageServiceError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof UsageServiceError, String(error));
    return error;
  }
  assert.fail("the watch ended without an error");
}

describe("watchUsage resumes", () => {
  test("each resumable end, after the last version, with the same request otherwise", async () => {
    const f = fake([
      { versions: [1, 2, 3], code: Code.Unavailable, reason: "SERVER_SHUTTING_DOWN" },
      { versions: [4, 6], code: Code.ResourceExhausted, reason: "SLOW_CONSUMER" },
      { versions: [], code: Code.Unavailable }, // a connection refused: nothing received
      { versions: [9], code: Code.DeadlineExceeded },
      { versions: [10], code: Code.Aborted },
      { versions: [11], code: Code.Canceled }, // the connection closed under the stream
      { versions: [12] }, // an OK end: the watch is over
    ]);
    const changes = await collect(f.client.watchUsage({ customerId: "cus_1", meters: ["tokens"] }));
    assert.deepEqual(
      changes.map((c) => c.version),
      [1n, 2n, 3n, 4n, 6n, 9n, 10n, 11n, 12n],
    );
    assert.deepEqual(
      changes.map((c) => c.meters[0]?.used),
      [10n, 20n, 30n, 40n, 60n, 90n, 100n, 110n, 120n],
    );
    assert.equal(changes[0]?.kind, "USAGE");
    assert.deepEqual(resumedFrom(f.requests), [undefined, 3n, 6n, 6n, 9n, 10n, 11n]);
    assert.ok(f.requests.every((r) => r.customerId === "cus_1" && r.meters.join() === "tokens"));
    assert.deepEqual(f.timeouts, Array(7).fill(undefined), "the stream has no deadline");
    assert.deepEqual(f.headers, Array(7).fill("Bearer t0ken"));
    assert.deepEqual(f.retries, [
      "UNAVAILABLE SERVER_SHUTTING_DOWN",
      "RESOURCE_EXHAUSTED SLOW_CONSUMER",
      "UNAVAILABLE",
      "DEADLINE_EXCEEDED",
      "ABORTED",
      "CANCELLED",
    ]);
  });

  test("from the caller's resumeAfterVersion first", async () => {
    const f = fake([{ versions: [8], code: Code.Unavailable }, { versions: [9] }]);
    const changes = await collect(f.client.watchUsage({ customerId: "cus_1", resumeAfterVersion: 7 }));
    assert.deepEqual(
      changes.map((c) => c.version),
      [8n, 9n],
    );
    assert.deepEqual(resumedFrom(f.requests), [7n, 8n]);
  });

  test("attempts in a row without a message are bounded by maxAttempts; a message starts anew", async () => {
    const bounded = fake([]);
    const error = await failure(collect(bounded.client.watchUsage({ customerId: "cus_1" })));
    assert.equal(error.codeName, "UNAVAILABLE");
    assert.equal(error.attempts, QUICK.maxAttempts);
    assert.equal(bounded.requests.length, QUICK.maxAttempts);

    const refused = { versions: [], code: Code.Unavailable };
    // Three failures in a row (one short of maxAttempts), a message, two more, then an end.
    const renewed = fake([refused, refused, refused, { versions: [1], code: Code.Unavailable }]);
    renewed.script.push(refused, refused, { versions: [2] });
    const changes = await collect(renewed.client.watchUsage({ customerId: "cus_1" }));
    assert.deepEqual(
      changes.map((c) => c.version),
      [1n, 2n],
    );
    assert.deepEqual(resumedFrom(renewed.requests), [undefined, undefined, undefined, undefined, 1n, 1n, 1n]);
  });

  test("maxAttempts 1 turns resuming off", async () => {
    const f = fake([{ versions: [1], code: Code.Unavailable, reason: "SERVER_SHUTTING_DOWN" }]);
    const seen: bigint[] = [];
    const error = await failure(
      (async () => {
        for await (const change of f.client.watchUsage({ customerId: "cus_1", retry: { maxAttempts: 1 } })) {
          seen.push(change.version);
        }
      })(),
    );
    assert.deepEqual(seen, [1n]);
    assert.equal(error.reason, "SERVER_SHUTTING_DOWN");
  });
});

describe("watchUsage does not resume", () => {
  const ends: [Code, string][] = [
    [Code.NotFound, "CUSTOMER_NOT_FOUND"],
    [Code.InvalidArgument, "INVALID_REQUEST"],
    [Code.PermissionDenied, "PERMISSION_DENIED"],
    [Code.Unauthenticated, "UNAUTHENTICATED"],
    [Code.ResourceExhausted, "TOO_MANY_WATCHES"],
    [Code.Internal, "INTERNAL_ERROR"],
  ];
  for (const [code, reason] of ends) {
    test(`${Code[code]} ${reason}: thrown at once, after what came before`, async () => {
      const f = fake([
        { versions: [5], code: Code.Unavailable },
        { versions: [6], code, reason },
      ]);
      const seen: bigint[] = [];
      const error = await failure(
        (async () => {
          for await (const change of f.client.watchUsage({ customerId: "cus_1" })) seen.push(change.version);
        })(),
      );
      assert.deepEqual(seen, [5n, 6n]);
      assert.equal(error.code, code);
      assert.equal(error.reason, reason);
      assert.equal(error.attempts, 1);
      assert.equal(f.requests.length, 2);
    });
  }
});

describe("watchUsage stops", () => {
  test("when the signal is aborted: the iteration ends and the stream is cancelled", async () => {
    const f = fake([{ versions: [1, 2], code: Code.Unavailable }], true);
    const controller = new AbortController();
    const input: WatchUsageInput = { customerId: "cus_1", signal: controller.signal };
    const seen: bigint[] = [];
    for await (const change of f.client.watchUsage(input)) {
      seen.push(change.version);
      if (change.version === 2n) controller.abort();
    }
    await within(f.cancelled, "the stream cancelled");
    assert.deepEqual(seen, [1n, 2n]);
    assert.equal(f.requests.length, 1);
  });

  test("when the signal is aborted during the wait before a resume", async () => {
    const f = fake([]);
    const controller = new AbortController();
    const watch = f.client.watchUsage({
      customerId: "cus_1",
      signal: controller.signal,
      retry: { maxAttempts: 10, initialBackoffMs: 60_000, maxBackoffMs: 60_000, jitter: 0 },
    });
    const next = watch.next();
    setTimeout(() => controller.abort(), 50);
    const started = performance.now();
    assert.deepEqual(await next, { value: undefined, done: true });
    assert.ok(performance.now() - started < 10_000);
    assert.equal(f.requests.length, 1);
  });

  test("when the loop is left: the stream is cancelled", async () => {
    const f = fake([{ versions: [1, 2, 3], code: Code.Unavailable }], true);
    for await (const change of f.client.watchUsage({ customerId: "cus_1" })) {
      if (change.version === 1n) break;
    }
    await within(f.cancelled, "the stream cancelled");
    assert.equal(f.requests.length, 1);
  });

  test("when the client is closed", async () => {
    const f = fake([{ versions: [1], code: Code.Unavailable }], true);
    const seen: bigint[] = [];
    for await (const change of f.client.watchUsage({ customerId: "cus_1" })) {
      seen.push(change.version);
      f.client.close();
    }
    await within(f.cancelled, "the stream cancelled");
    assert.deepEqual(seen, [1n]);
    assert.equal(f.requests.length, 1);
  });

  test("an already aborted signal makes no call", async () => {
    const f = fake([{ versions: [1] }]);
    const changes = await collect(f.client.watchUsage({ customerId: "cus_1", signal: AbortSignal.abort() }));
    assert.deepEqual(changes, []);
    assert.equal(f.requests.length, 0);
  });
});

describe("usageChange", () => {
  test("reads every field of a message", () => {
    const start = new Date("2026-01-31T09:00:00Z");
    const end = new Date("2026-02-28T09:00:00Z");
    const change = usageChange(
      create(WatchUsageResponseSchema, {
        version: 42n,
        kind: UsageChangeKind.THRESHOLD,
        commitTime: timestampFromDate(start),
        planId: "starter",
        subscriptionStatus: SubscriptionStatus.PAST_DUE,
        periodStartTime: timestampFromDate(start),
        periodEndTime: timestampFromDate(end),
        meters: [{ meter: "llm_tokens", used: 800n, included: 1000n, limit: 5000n }],
        threshold: {
          alertId: "al_1",
          feature: "llm_tokens",
          threshold: "80% of included",
          amount: 800n,
          used: 801n,
        },
      }),
    );
    assert.equal(change.version, 42n);
    assert.equal(change.kind, "THRESHOLD");
    assert.equal(change.snapshotReason, "UNSPECIFIED");
    assert.deepEqual([change.commitTime, change.periodStartTime, change.periodEndTime], [start, start, end]);
    assert.equal(change.planId, "starter");
    assert.equal(change.subscriptionStatus, "PAST_DUE");
    assert.deepEqual(
      change.meters.map((m) => [m.meter, m.used, m.limit, m.remaining]),
      [["llm_tokens", 800n, 5000n, undefined]],
    );
    assert.deepEqual(change.threshold, {
      alertId: "al_1",
      feature: "llm_tokens",
      threshold: "80% of included",
      amount: 800n,
      used: 801n,
    });
  });

  test("a bare snapshot, and values this client does not know, read as UNSPECIFIED", () => {
    const change = usageChange(
      create(WatchUsageResponseSchema, {
        version: 1n,
        kind: 99 as UsageChangeKind,
        snapshotReason: SnapshotReason.RESUME_TOO_OLD,
      }),
    );
    assert.equal(change.kind, "UNSPECIFIED");
    assert.equal(change.snapshotReason, "RESUME_TOO_OLD");
    assert.equal(change.commitTime, undefined);
    assert.equal(change.periodStartTime, undefined);
    assert.equal(change.threshold, undefined);
    assert.deepEqual(change.meters, []);
  });
});
