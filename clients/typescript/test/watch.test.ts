/**
 * watchUsage against a live usage-service: a snapshot then every change; a cut connection and a
 * restart are resumed with nothing missed or repeated; an unknown customer throws at once.
 */
import assert from "node:assert/strict";
import { createServer, connect, type Server, type Socket } from "node:net";
import { after, before, test } from "node:test";

import { idempotencyKey, UsageClient, UsageServiceError, type UsageChange } from "../src/index.js";
import { activeCustomer, createDatabase, ServiceProcess, uniqueId, type Database } from "./harness.js";

/** A deadline for waits in this file (ms): a test fails instead of hanging. */
const WAIT_MS = 60_000;
/** Patient enough for a restart, and quick to notice the service is back. */
const PATIENT = { maxAttempts: 400, initialBackoffMs: 50, maxBackoffMs: 250 };

let database: Database;
let service: ServiceProcess;
let client: UsageClient;
const others: ServiceProcess[] = [];

before(async () => {
  database = await createDatabase();
  service = await ServiceProcess.start({ database });
  client = new UsageClient({ address: service.address });
});

after(async () => {
  client.close();
  for (const other of others) await other.stop();
  await service.stop();
  await database.drop();
});

function within<T>(promise: Promise<T>, what: string, ms = WAIT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

async function newCustomer(): Promise<string> {
  const customerId = uniqueId("cus");
  await client.upsertCustomer(activeCustomer(customerId));
  return customerId;
}

async function record(customerId: string, quantity: number, via = client): Promise<void> {
  const key = idempotencyKey("watch-test", customerId, uniqueId("k"));
  await via.recordUsage({ customerId, meter: "llm_tokens", quantity, idempotencyKey: key });
}

function tokens(change: UsageChange): bigint | undefined {
  return change.meters.find((m) => m.meter === "llm_tokens")?.used;
}

/** Reads a watch in the background; `reach(n)` waits until it has yielded n changes. */
class Collected {
  readonly changes: UsageChange[] = [];
  private readonly waiters = new Set<() => void>();
  private failure: unknown;
  readonly done: Promise<void>;

  constructor(watch: AsyncIterable<UsageChange>, count: number) {
    this.done = (async () => {
      try {
        for await (const change of watch) {
          this.changes.push(change);
          this.wake();
          if (this.changes.length >= count) return;
        }
      } catch (error) {
        this.failure = error;
        this.wake();
      }
    })();
  }

  private wake(): void {
    for (const waiter of this.waiters) waiter();
  }

  async reach(count: number): Promise<UsageChange[]> {
    await within(
      new Promise<void>((resolve) => {
        const check = () => {
          if (this.changes.length >= count || this.failure !== undefined) {
            this.waiters.delete(check);
            resolve();
          }
        };
        this.waiters.add(check);
        check();
      }),
      `${count} changes (got ${this.changes.length})`,
    );
    if (this.failure !== undefined) throw this.failure;
    return this.changes;
  }
}

/** A snapshot at 0 tokens, then one USAGE change per record, in order, each with its total. */
function assertEachChangeOnce(changes: readonly UsageChange[], quantities: readonly number[]): void {
  const [snapshot, ...rest] = changes;
  assert.ok(snapshot !== undefined);
  assert.equal(snapshot.kind, "SNAPSHOT");
  assert.equal(tokens(snapshot), 0n);
  assert.deepEqual(
    rest.map((c) => c.version),
    quantities.map((_, i) => snapshot.version + BigInt(i + 1)),
  );
  assert.deepEqual(new Set(rest.map((c) => c.kind)), new Set(["USAGE"]));
  let total = 0n;
  assert.deepEqual(
    rest.map(tokens),
    quantities.map((q) => (total += BigInt(q))),
  );
}

/** A TCP proxy to the service: cut() drops every connection and refuses new ones until restore(). */
class Proxy {
  private server: Server | undefined;
  private readonly sockets = new Set<Socket>();
  port = 0;
  connections = 0;

  constructor(private readonly upstreamPort: number) {}

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  async start(): Promise<void> {
    const server = createServer((downstream) => {
      this.connections++;
      const upstream = connect(this.upstreamPort, "127.0.0.1");
      for (const socket of [downstream, upstream]) {
        this.sockets.add(socket);
        socket.on("error", () => undefined);
        socket.on("close", () => {
          this.sockets.delete(socket);
          downstream.destroy();
          upstream.destroy();
        });
      }
      downstream.pipe(upstream);
      upstream.pipe(downstream);
    });
    await new Promise<void>((resolve) => server.listen(this.port, "127.0.0.1", resolve));
    const address = server.address();
    assert.ok(address !== null && typeof address === "object");
    this.port = address.port;
    this.server = server;
  }

  /** "reset": as when a network path dies; "close": as when the server's host closes its sockets. */
  async cut(how: "reset" | "close" = "reset"): Promise<void> {
    const server = this.server;
    this.server = undefined;
    const closed = new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
    for (const socket of this.sockets) {
      if (how === "reset") socket.resetAndDestroy();
      else socket.destroy();
    }
    await closed;
  }

  restore(): Promise<void> {
    return this.start();
  }
}

test("a snapshot, then each change; only the meters asked for; a resume; a signal stops it", async () => {
  const customerId = await newCustomer();
  const controller = new AbortController();
  const watch = client.watchUsage({ customerId, signal: controller.signal })[Symbol.asyncIterator]();
  const snapshot = (await within(watch.next(), "the snapshot")).value;
  assert.ok(snapshot !== undefined);
  assert.equal(snapshot.kind, "SNAPSHOT");
  assert.equal(snapshot.snapshotReason, "INITIAL");
  assert.equal(snapshot.planId, "starter");
  assert.equal(snapshot.subscriptionStatus, "ACTIVE");
  assert.ok(snapshot.commitTime instanceof Date && snapshot.periodEndTime instanceof Date);
  assert.equal(snapshot.threshold, undefined);
  assert.deepEqual(
    snapshot.meters.map((m) => [m.meter, m.used]),
    [
      ["llm_tokens", 0n],
      ["api_calls", 0n],
      ["seats", 0n],
    ],
  );

  await record(customerId, 7);
  await client.recordUsage({ customerId, meter: "api_calls", quantity: 1, idempotencyKey: uniqueId("k") });
  const first = (await within(watch.next(), "the first change")).value;
  const second = (await within(watch.next(), "the second change")).value;
  assert.ok(first !== undefined && second !== undefined);
  assert.equal(first.version, snapshot.version + 1n);
  assert.equal(first.kind, "USAGE");
  assert.equal(first.snapshotReason, "UNSPECIFIED");
  assert.deepEqual(
    first.meters.map((m) => [m.meter, m.used, m.limit]),
    [["llm_tokens", 7n, 1000n]],
  );
  assert.deepEqual(
    second.meters.map((m) => [m.meter, m.used]),
    [["api_calls", 1n]],
  );

  // Aborting ends the iteration without an error.
  const pending = watch.next();
  controller.abort();
  assert.deepEqual(await within(pending, "the end after abort"), { value: undefined, done: true });

  // Only api_calls, after the first change: the second one, and nothing before it.
  const calls = client.watchUsage({ customerId, meters: ["api_calls"], resumeAfterVersion: first.version });
  for await (const again of calls) {
    assert.deepEqual(again, second);
    break;
  }
});

test("a grant created or voided is a CREDIT change of its meter's balance", async () => {
  const customerId = uniqueId("cus");
  await client.upsertCustomer(activeCustomer(customerId, "prepaid"));
  const controller = new AbortController();
  const watch = client.watchUsage({ customerId, meters: ["llm_tokens"], signal: controller.signal })[
    Symbol.asyncIterator
  ]();
  try {
    const snapshot = (await within(watch.next(), "the snapshot")).value;
    assert.ok(snapshot !== undefined);
    // The plan's grant of the period counts before it is made.
    assert.deepEqual(
      snapshot.meters.map((m) => [m.meter, m.billing, m.balance]),
      [["llm_tokens", "prepaid", 100n]],
    );
    const created = await client.createGrant({
      customerId, feature: "llm_tokens", amount: 40, idempotencyKey: idempotencyKey("watch-grant", customerId),
    });
    const granted = (await within(watch.next(), "the grant's change")).value;
    await client.voidGrant(customerId, created.grant.grantId);
    const voided = (await within(watch.next(), "the void's change")).value;
    assert.ok(granted !== undefined && voided !== undefined);
    assert.deepEqual([granted.kind, voided.kind], ["CREDIT", "CREDIT"]);
    assert.ok(snapshot.version < granted.version && granted.version < voided.version);
    assert.deepEqual(
      granted.meters.map((m) => [m.meter, m.balance, m.granted]),
      [["llm_tokens", 140n, 140n]],
    );
    assert.deepEqual(
      voided.meters.map((m) => [m.meter, m.balance]),
      [["llm_tokens", 100n]],
    );
  } finally {
    controller.abort();
  }
});

for (const how of ["reset", "close"] as const) {
  test(`a connection cut (${how}) is resumed with nothing missed or repeated`, async () => {
    const customerId = await newCustomer();
    const [, port] = service.address.split(":");
    const proxy = new Proxy(Number(port));
    await proxy.start();
    const retries: string[] = [];
    let sawRetry!: () => void;
    const retried = new Promise<void>((resolve) => (sawRetry = resolve));
    const watcher = new UsageClient({
      address: proxy.address,
      retry: PATIENT,
      onRetry: (error) => {
        retries.push(error.codeName);
        sawRetry();
      },
    });
    const controller = new AbortController();
    const quantities = Array.from({ length: 15 }, (_, i) => i + 1);
    try {
      const seen = new Collected(watcher.watchUsage({ customerId, signal: controller.signal }), 16);
      await seen.reach(1);
      for (const q of quantities.slice(0, 5)) await record(customerId, q);
      await seen.reach(6);
      await proxy.cut(how);
      for (const q of quantities.slice(5, 10)) await record(customerId, q); // while it cannot reach the service
      await within(retried, "the watch noticing the cut");
      assert.equal(seen.changes.length, 6);
      await proxy.restore();
      for (const q of quantities.slice(10)) await record(customerId, q);
      const changes = await seen.reach(16);
      assertEachChangeOnce(changes, quantities);
      const summary = await client.getUsageSummary(customerId, { meter: "llm_tokens" });
      assert.equal(tokens(changes[15]!), summary.meters[0]?.used);
      // The stream's end is reported as ABORTED (reset) or CANCELLED (closed), the attempts to
      // connect meanwhile as UNAVAILABLE.
      assert.ok(retries.length >= 1, "resumed");
      const expected = ["ABORTED", "CANCELLED", "UNAVAILABLE"];
      assert.ok(retries.every((code) => expected.includes(code)), retries.join(","));
      assert.ok(proxy.connections >= 2, "it connected again");
    } finally {
      controller.abort();
      watcher.close();
      await proxy.cut();
    }
  });
}

test("a restart is resumed on the next service with nothing missed or repeated", async () => {
  const customerId = await newCustomer();
  const retries: string[] = [];
  let sawRetry!: () => void;
  const retried = new Promise<void>((resolve) => (sawRetry = resolve));
  const watcher = new UsageClient({
    address: service.address,
    retry: PATIENT,
    onRetry: (error) => {
      retries.push(`${error.codeName} ${error.reason ?? ""}`.trim());
      sawRetry();
    },
  });
  const replica = await ServiceProcess.start({ database });
  others.push(replica);
  const other = new UsageClient({ address: replica.address });
  const controller = new AbortController();
  const quantities = Array.from({ length: 9 }, (_, i) => i + 1);
  try {
    const seen = new Collected(watcher.watchUsage({ customerId, signal: controller.signal }), 10);
    await seen.reach(1);
    for (const q of quantities.slice(0, 3)) await record(customerId, q);
    await seen.reach(4);
    const address = service.address;
    assert.equal(await service.stop(), 0); // SIGTERM: the stream ends with SERVER_SHUTTING_DOWN
    for (const q of quantities.slice(3, 6)) await record(customerId, q, other);
    await within(retried, "the watch noticing the restart");
    service = await ServiceProcess.start({ database, address });
    client.close();
    client = new UsageClient({ address });
    for (const q of quantities.slice(6)) await record(customerId, q, other);
    assertEachChangeOnce(await seen.reach(10), quantities);
    assert.equal(retries[0], "UNAVAILABLE SERVER_SHUTTING_DOWN");
  } finally {
    controller.abort();
    watcher.close();
    other.close();
  }
});

test("an unknown customer throws NOT_FOUND at once", async () => {
  const retries: string[] = [];
  const watcher = new UsageClient({ address: service.address, onRetry: (e) => retries.push(e.codeName) });
  try {
    const watch = watcher.watchUsage({ customerId: uniqueId("nobody") })[Symbol.asyncIterator]();
    await assert.rejects(within(watch.next(), "the refusal"), (error: unknown) => {
      assert.ok(error instanceof UsageServiceError);
      assert.equal(error.codeName, "NOT_FOUND");
      assert.equal(error.reason, "CUSTOMER_NOT_FOUND");
      assert.equal(error.attempts, 1);
      return true;
    });
    assert.deepEqual(retries, []);
  } finally {
    watcher.close();
  }
});
