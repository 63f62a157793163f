import { isRetryableCode, toUsageServiceError, UsageServiceError } from "./errors.js";

/** How calls are retried on UNAVAILABLE, DEADLINE_EXCEEDED and ABORTED. Immutable; see DEFAULT_RETRY. */
export interface RetryPolicy {
  /** Attempts in all, the first included; 1 disables retries. */
  readonly maxAttempts: number;
  /** Wait before the first retry, in milliseconds. */
  readonly initialBackoffMs: number;
  /** Upper bound of any wait, in milliseconds. */
  readonly maxBackoffMs: number;
  /** Each wait is the previous one times this. */
  readonly multiplier: number;
  /** Each wait is drawn from [wait * (1 - jitter), wait]; 0..1. */
  readonly jitter: number;
}

export const DEFAULT_RETRY: RetryPolicy = Object.freeze({
  maxAttempts: 5,
  initialBackoffMs: 100,
  maxBackoffMs: 2_000,
  multiplier: 2,
  jitter: 0.2,
});

export function retryPolicy(overrides: Partial<RetryPolicy> = {}, base = DEFAULT_RETRY): RetryPolicy {
  const policy = { ...base, ...overrides };
  if (!Number.isInteger(policy.maxAttempts) || policy.maxAttempts < 1) {
    throw new RangeError(`retry.maxAttempts must be an integer >= 1, got ${policy.maxAttempts}`);
  }
  if (policy.jitter < 0 || policy.jitter > 1) {
    throw new RangeError(`retry.jitter must be within 0..1, got ${policy.jitter}`);
  }
  return Object.freeze(policy);
}

/** The wait before retry number `retry` (1 = the first retry), in milliseconds. */
export function backoffMs(policy: RetryPolicy, retry: number, random: () => number = Math.random): number {
  const ceiling = Math.min(
    policy.maxBackoffMs,
    policy.initialBackoffMs * policy.multiplier ** Math.max(0, retry - 1),
  );
  return ceiling * (1 - policy.jitter * random());
}

/** Resolves after `ms`; rejects with the signal's reason when it is aborted first. */
export function delay(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** What a retried call sees: which attempt this is (1-based). */
export interface AttemptInfo {
  readonly attempt: number;
}

/**
 * Runs `call` until it succeeds, fails with a code that is not retried, or runs out of attempts.
 * The caller builds the request once, outside `call`, so every attempt sends the same request
 * (the same idempotency key): a retry after an unknown outcome can never record twice.
 */
export async function withRetry<T>(
  policy: RetryPolicy,
  call: (info: AttemptInfo) => Promise<T>,
  signal?: AbortSignal,
  onRetry?: (error: UsageServiceError, attempt: number, waitMs: number) => void,
): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await call({ attempt });
    } catch (thrown) {
      const error = toUsageServiceError(thrown, attempt);
      if (!isRetryableCode(error.code) || attempt >= policy.maxAttempts || signal?.aborted) {
        throw error;
      }
      const waitMs = backoffMs(policy, attempt);
      onRetry?.(error, attempt, waitMs);
      try {
        await delay(waitMs, signal);
      } catch {
        throw error;
      }
    }
  }
}
