/** Deadlines and retries against real sockets: a service that starts late, a lost answer, a black hole. */
import assert from "node:assert/strict";
import { createServer, type Server, type Socket } from "node:net";
import { after, before, test } from "node:test";

import { ConnectError, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import { Code, idempotencyKey, UsageClient, UsageServiceError } from "../src/index.js";
import { activeCustomer, createDatabase, freePort, ServiceProcess, uniqueId, type Database } from "./harness.js";

/** A deadline for waits in this file (ms): a test fails instead of hanging. */
const WAIT_MS = 60_000;

function within<T>(promise: Promise<T>, what: string, ms = WAIT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

async function failure(promise: Promise<unknown>): Promise<UsageServiceError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof UsageServiceError, String(error));
    return error;
  }
  assert.fail("the call succeeded");
}

let database: Database;
const services: ServiceProcess[] = [];

before(async () => {
  database = await createDatabase();
});

after(async () => {
  for (const service of services) {
    await service.stop();
  }
  await database.drop();
});

async function startService(address?: string): Promise<ServiceProcess> {
  const service = await ServiceProcess.start({ database, ...(address ? { address } : {}) });
  services.push(service);
  return service;
}

test("a call made before the service listens is retried until it succeeds, and stored once", async () => {
  // The customer exists from an earlier run of the service on the same database.
  const customerId = uniqueId("cus");
  const first = await startService();
  const setup = new UsageClient({ address: first.address });
  await setup.upsertCustomer(activeCustomer(customerId));
  setup.close();
  assert.equal(await first.stop(), 0);

  const address = `127.0.0.1:${await freePort()}`;
  const failures: string[] = [];
  let sawFailure!: () => void;
  const firstFailure = new Promise<void>((resolve) => (sawFailure = resolve));
  const client = new UsageClient({
    address,
    timeoutMs: 2_000,
    retry: { maxAttempts: 400, initialBackoffMs: 50, maxBackoffMs: 250 },
    onRetry: (error) => {
      failures.push(error.codeName);
      sawFailure();
    },
  });
  try {
    const key = idempotencyKey("retry-test", customerId, "request-1");
    const input = { customerId, meter: "llm_tokens", quantity: 7, idempotencyKey: key };
    const call = client.recordUsage(input);
    await within(firstFailure, "the first attempt failing");
    const second = await startService(address);
    assert.equal(second.address, address);

    const result = await within(call, "the retried call");
    assert.equal(result.duplicate, false);
    assert.ok(failures.length >= 1);
    assert.ok(failures.every((code) => code === "UNAVAILABLE"), failures.join(","));

    const summary = await client.getUsageSummary(customerId, { meter: "llm_tokens" });
    assert.equal(summary.meters[0]?.used, 7n, "stored once");
    const again = await client.recordUsage(input);
    assert.deepEqual(again, { eventId: result.eventId, duplicate: true });
    const after = await client.getUsageSummary(customerId, { meter: "llm_tokens" });
    assert.equal(after.meters[0]?.used, 7n);
  } finally {
    client.close();
  }
});

test("an answer lost after the commit is retried with the same key and counted once", async () => {
  const service = await startService();
  const customerId = uniqueId("cus");
  const baseUrl = `http://${service.address}`;
  let lost = 0;
  // Lets the first attempt of each call reach the service, then drops its answer.
  const dropFirstAnswer: Interceptor = (next) => async (request) => {
    const response = await next(request);
    if (lost === 0 && request.method.name === "RecordUsage") {
      lost++;
      throw new ConnectError("connection reset after the request was sent", Code.Unavailable);
    }
    return response;
  };
  const sessionManager = new Http2SessionManager(baseUrl);
  const transport = createGrpcTransport({ baseUrl, sessionManager, interceptors: [dropFirstAnswer] });
  const retries: number[] = [];
  const client = new UsageClient({
    address: service.address,
    transport,
    retry: { initialBackoffMs: 10 },
    onRetry: (_error, attempt) => retries.push(attempt),
  });
  try {
    await client.upsertCustomer(activeCustomer(customerId));
    const key = idempotencyKey("lost-answer", customerId);
    const result = await client.recordUsage({ customerId, meter: "llm_tokens", quantity: 11, idempotencyKey: key });
    assert.equal(lost, 1);
    assert.deepEqual(retries, [1]);
    assert.equal(result.duplicate, true, "the retry found the event the first attempt committed");
    const summary = await client.getUsageSummary(customerId, { meter: "llm_tokens" });
    assert.equal(summary.meters[0]?.used, 11n, "counted once");
  } finally {
    client.close();
    sessionManager.abort();
  }
});

test("a CreateGrant whose answer is lost is retried with the same key and grants once", async () => {
  const service = await startService();
  const customerId = uniqueId("cus");
  const baseUrl = `http://${service.address}`;
  const sent: unknown[] = [];
  const lost: unknown[] = [];
  // Lets the first CreateGrant reach the service and commit, then drops its answer.
  const dropFirstAnswer: Interceptor = (next) => async (request) => {
    const response = await next(request);
    if (request.method.name === "CreateGrant") {
      sent.push(request.message);
      if (lost.length === 0) {
        lost.push(response.message);
        throw new ConnectError("connection reset after the request was sent", Code.Unavailable);
      }
    }
    return response;
  };
  const sessionManager = new Http2SessionManager(baseUrl);
  const transport = createGrpcTransport({ baseUrl, sessionManager, interceptors: [dropFirstAnswer] });
  const retries: string[] = [];
  const client = new UsageClient({
    address: service.address,
    transport,
    retry: { initialBackoffMs: 10 },
    onRetry: (error) => retries.push(error.codeName),
  });
  try {
    await client.upsertCustomer(activeCustomer(customerId, "prepaid"));
    const key = idempotencyKey("lost-grant", customerId);
    const result = await client.createGrant({ customerId, feature: "llm_tokens", amount: 250, idempotencyKey: key });
    assert.deepEqual(retries, ["UNAVAILABLE"]);
    assert.equal(sent.length, 2);
    assert.equal(sent[0], sent[1], "the very same request, key included");
    assert.equal(result.duplicate, true, "the retry found the grant the first attempt made");
    const first = lost[0] as { grant?: { grantId: string } };
    assert.equal(result.grant.grantId, first.grant?.grantId);
    const topUps = (await client.listGrants(customerId)).filter((g) => g.source === "TOP_UP");
    assert.deepEqual(topUps.map((g) => g.grantId), [result.grant.grantId], "granted once");
    const summary = await client.getUsageSummary(customerId, { meter: "llm_tokens" });
    assert.equal(summary.meters[0]?.balance, 350n, "the plan's 100 and the 250 granted once");
  } finally {
    client.close();
    sessionManager.abort();
  }
});

/** A TCP server that accepts connections and never answers. */
async function blackHole(): Promise<{ address: string; close: () => Promise<void> }> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on("error", () => undefined);
    socket.on("close", () => sockets.delete(socket));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  assert.ok(address !== null && typeof address === "object");
  return {
    address: `127.0.0.1:${address.port}`,
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}

test("every attempt has a deadline; DEADLINE_EXCEEDED is retried up to maxAttempts", async () => {
  const hole = await blackHole();
  const retries: string[] = [];
  const client = new UsageClient({
    address: hole.address,
    timeoutMs: 300,
    retry: { maxAttempts: 3, initialBackoffMs: 10, maxBackoffMs: 10 },
    onRetry: (error) => retries.push(error.codeName),
  });
  try {
    const started = performance.now();
    const error = await within(
      failure(client.recordUsage({ customerId: "c", meter: "llm_tokens", quantity: 1, idempotencyKey: "k" })),
      "the call failing",
    );
    const elapsed = performance.now() - started;
    assert.equal(error.codeName, "DEADLINE_EXCEEDED");
    assert.equal(error.attempts, 3);
    assert.deepEqual(retries, ["DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"]);
    assert.ok(elapsed >= 3 * 300 - 50, `elapsed ${elapsed} ms`);
    assert.ok(elapsed < 10_000, `elapsed ${elapsed} ms`);
  } finally {
    client.close();
    await hole.close();
  }
});

test("without options a call still has the default deadline (5 s)", async () => {
  const hole = await blackHole();
  const client = new UsageClient({ address: hole.address, retry: { maxAttempts: 1 } });
  try {
    const started = performance.now();
    const error = await within(failure(client.checkHealth()), "the call failing", 20_000);
    const elapsed = performance.now() - started;
    assert.equal(error.code, Code.DeadlineExceeded);
    assert.ok(elapsed >= 4_900 && elapsed < 15_000, `elapsed ${elapsed} ms`);
  } finally {
    client.close();
    await hole.close();
  }
});
