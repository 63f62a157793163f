/**
 * Runs a real `usage-service serve` for the tests.
 *
 * The executable comes from USAGE_SERVICE_BIN (default: the repo's .venv/bin/usage-service). Each
 * service gets a fresh database: on DATABASE_URL's server when that is set, else on the local
 * PostgreSQL (USAGE_TEST_LOCAL_PG, default postgresql://postgres@127.0.0.1:5432/test) when psql
 * reaches it, else an embedded PostgreSQL in a temporary USAGE_DATA_DIR. The service is ready when
 * it prints "usage-service listening on HOST:PORT" and answers the health check; every wait has a
 * deadline.
 */
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

import { UsageClient, type CustomerInput } from "../src/index.js";

/** The package root (this file runs from dist/test/). */
export const PACKAGE_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const PLANS_FILE = join(PACKAGE_ROOT, "test", "fixtures", "plans.toml");
const DEFAULT_BIN = resolve(PACKAGE_ROOT, "..", "..", ".venv", "bin", "usage-service");
const LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/test";

/** Seconds: the first start of an embedded PostgreSQL runs initdb. */
const START_TIMEOUT_MS = 120_000;
const STOP_TIMEOUT_MS = 30_000;
const PSQL_TIMEOUT_MS = 15_000;
const LISTENING = "usage-service listening on ";

export function serviceExecutable(): string {
  return process.env.USAGE_SERVICE_BIN || DEFAULT_BIN;
}

function psql(dsn: string, sql: string): Promise<void> {
  return new Promise((resolvePromise, reject) => {
    execFile(
      "psql",
      [dsn, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql],
      { timeout: PSQL_TIMEOUT_MS, env: { ...process.env, PGCONNECT_TIMEOUT: "5" } },
      (error, _stdout, stderr) => (error ? reject(new Error(`psql: ${stderr || error.message}`)) : resolvePromise()),
    );
  });
}

function withDatabase(dsn: string, name: string): string {
  const url = new URL(dsn);
  url.pathname = `/${name}`;
  return url.toString();
}

/** Where a service keeps its data: the environment to start it with, and how to remove it. */
export interface Database {
  readonly env: Readonly<Record<string, string>>;
  readonly description: string;
  drop(): Promise<void>;
}

let adminDsn: Promise<string | undefined> | undefined;

async function findAdminDsn(): Promise<string | undefined> {
  const configured = process.env.DATABASE_URL;
  if (configured) {
    return configured;
  }
  const local = process.env.USAGE_TEST_LOCAL_PG || LOCAL_PG;
  try {
    await psql(local, "SELECT 1");
    return local;
  } catch {
    return undefined;
  }
}

/** A fresh, empty database for one service (or a temporary embedded one). */
export async function createDatabase(): Promise<Database> {
  adminDsn ??= findAdminDsn();
  const admin = await adminDsn;
  if (admin === undefined) {
    const folder = await mkdtemp(join(tmpdir(), "usage-ts-test-"));
    return {
      env: { USAGE_DATA_DIR: folder },
      description: `embedded PostgreSQL in ${folder}`,
      drop: () => rm(folder, { recursive: true, force: true }),
    };
  }
  const name = `usage_ts_${randomBytes(6).toString("hex")}`;
  await psql(admin, `CREATE DATABASE "${name}"`);
  return {
    env: { DATABASE_URL: withDatabase(admin, name) },
    description: `database ${name}`,
    drop: () => psql(admin, `DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`),
  };
}

/** A TCP port that nothing listens on right now. */
export function freePort(): Promise<number> {
  return new Promise((resolvePromise, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      server.close(() => resolvePromise(port));
    });
  });
}

export interface StartOptions {
  readonly database: Database;
  /** "127.0.0.1:PORT"; default an ephemeral port. */
  readonly address?: string;
  readonly env?: Readonly<Record<string, string>>;
}

/** A running `usage-service serve`. */
export class ServiceProcess {
  private readonly lines: string[] = [];

  private constructor(
    private readonly child: ChildProcess,
    readonly address: string,
    lines: string[],
  ) {
    this.lines = lines;
  }

  /** Starts the service and waits (bounded) until it listens and reports SERVING. */
  static async start(options: StartOptions): Promise<ServiceProcess> {
    const child = spawn(serviceExecutable(), ["serve"], {
      env: {
        ...process.env,
        USAGE_PLANS_FILE: PLANS_FILE,
        ...options.database.env,
        ...options.env,
        USAGE_GRPC_ADDRESS: options.address ?? "127.0.0.1:0",
      },
      stdio: ["ignore", "pipe", "pipe"],
    });
    const lines: string[] = [];
    const address = await new Promise<string>((resolvePromise, reject) => {
      const timer = setTimeout(() => {
        child.kill("SIGKILL");
        reject(new Error(`usage-service did not start in ${START_TIMEOUT_MS} ms:\n${lines.join("\n")}`));
      }, START_TIMEOUT_MS);
      const onLine = (line: string) => {
        lines.push(line);
        if (line.startsWith(LISTENING)) {
          clearTimeout(timer);
          resolvePromise(line.slice(LISTENING.length).trim());
        }
      };
      createInterface({ input: child.stdout! }).on("line", onLine);
      createInterface({ input: child.stderr! }).on("line", (line) => lines.push(line));
      child.once("error", (error) => {
        clearTimeout(timer);
        reject(new Error(`cannot run ${serviceExecutable()}: ${error.message}`));
      });
      child.once("exit", (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`usage-service exited (${code ?? signal}) before listening:\n${lines.join("\n")}`));
      });
    });
    const service = new ServiceProcess(child, address, lines);
    const client = new UsageClient({ address, timeoutMs: 5_000, retry: { maxAttempts: 10 } });
    try {
      const status = await client.checkHealth();
      if (status !== "SERVING") {
        throw new Error(`health check answered ${status}`);
      }
    } catch (error) {
      await service.stop();
      throw error;
    } finally {
      client.close();
    }
    return service;
  }

  /** Everything the service printed so far. */
  output(): string {
    return this.lines.join("\n");
  }

  /** SIGTERM, then SIGKILL if it has not exited within the grace period. Returns the exit code. */
  async stop(): Promise<number | null> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) {
      return this.child.exitCode;
    }
    const exited = new Promise<number | null>((resolvePromise) =>
      this.child.once("exit", (code) => resolvePromise(code)),
    );
    this.child.kill("SIGTERM");
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<"late">((resolvePromise) => {
      timer = setTimeout(() => resolvePromise("late"), STOP_TIMEOUT_MS);
    });
    const outcome = await Promise.race([exited, late]);
    clearTimeout(timer);
    if (outcome === "late") {
      this.child.kill("SIGKILL");
      return exited;
    }
    return outcome;
  }
}

/** A unique id for this test run, so tests never share customers or keys. */
export function uniqueId(prefix: string): string {
  return `${prefix}-${randomBytes(6).toString("hex")}`;
}

const DAY_MS = 24 * 60 * 60 * 1000;

/** An ACTIVE customer on the test plan whose current period contains now. */
export function activeCustomer(customerId: string, planId = "starter"): CustomerInput {
  const now = Date.now();
  return {
    customerId,
    planId,
    subscriptionStatus: "ACTIVE",
    currentPeriodStartTime: new Date(now - DAY_MS),
    currentPeriodEndTime: new Date(now + 29 * DAY_MS),
  };
}

/** One service with its own database for a test file: call start() in before(), stop() in after(). */
export class Fixture {
  database: Database | undefined;
  service: ServiceProcess | undefined;
  client: UsageClient | undefined;

  async start(): Promise<UsageClient> {
    this.database = await createDatabase();
    this.service = await ServiceProcess.start({ database: this.database });
    this.client = new UsageClient({ address: this.service.address });
    return this.client;
  }

  async stop(): Promise<void> {
    this.client?.close();
    await this.service?.stop();
    await this.database?.drop();
  }
}
