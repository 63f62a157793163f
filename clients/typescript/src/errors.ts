/**
 * The errors this client throws.
 *
 *   Error
 *   └── UsageServiceError    the call failed: either the service answered with a gRPC error
 *                            (code, ErrorInfo reason/domain/metadata, BadRequest field
 *                            violations), or it could not be reached within the retries
 *                            (UNAVAILABLE / DEADLINE_EXCEEDED / ABORTED; `attempts` says
 *                            how many were made).
 *
 * A denied entitlement check is not an error: it is an answer with `allowed: false` and a reason.
 * Errors from the transport are mapped to UsageServiceError in one place, `toUsageServiceError`.
 */
import { Code, ConnectError } from "@connectrpc/connect";

import { BadRequestSchema, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";

/** The gRPC status code names, as in the gRPC spec. */
export type GrpcCodeName =
  | "OK"
  | "CANCELLED"
  | "UNKNOWN"
  | "INVALID_ARGUMENT"
  | "DEADLINE_EXCEEDED"
  | "NOT_FOUND"
  | "ALREADY_EXISTS"
  | "PERMISSION_DENIED"
  | "RESOURCE_EXHAUSTED"
  | "FAILED_PRECONDITION"
  | "ABORTED"
  | "OUT_OF_RANGE"
  | "UNIMPLEMENTED"
  | "INTERNAL"
  | "UNAVAILABLE"
  | "DATA_LOSS"
  | "UNAUTHENTICATED";

const CODE_NAMES: readonly GrpcCodeName[] = [
  "OK",
  "CANCELLED",
  "UNKNOWN",
  "INVALID_ARGUMENT",
  "DEADLINE_EXCEEDED",
  "NOT_FOUND",
  "ALREADY_EXISTS",
  "PERMISSION_DENIED",
  "RESOURCE_EXHAUSTED",
  "FAILED_PRECONDITION",
  "ABORTED",
  "OUT_OF_RANGE",
  "UNIMPLEMENTED",
  "INTERNAL",
  "UNAVAILABLE",
  "DATA_LOSS",
  "UNAUTHENTICATED",
];

/** One invalid field of a request, from google.rpc.BadRequest. */
export interface FieldViolation {
  /** A path to the field, e.g. "requests[3].quantity". */
  readonly field: string;
  readonly description: string;
  /** UPPER_SNAKE, when the service gives one. */
  readonly reason: string;
}

export interface UsageServiceErrorInit {
  readonly code: Code;
  readonly message: string;
  readonly reason?: string | undefined;
  readonly domain?: string | undefined;
  readonly metadata?: Readonly<Record<string, string>>;
  readonly fieldViolations?: readonly FieldViolation[];
  readonly attempts?: number;
  readonly cause?: unknown;
}

/** A failed call, with the service's error details decoded. */
export class UsageServiceError extends Error {
  /** The gRPC status code (the same numbers as the gRPC spec). */
  readonly code: Code;
  /** The gRPC status code's name, e.g. "INVALID_ARGUMENT". */
  readonly codeName: GrpcCodeName;
  /** google.rpc.ErrorInfo reason (UPPER_SNAKE, e.g. "IDEMPOTENCY_KEY_REUSED"); undefined when absent. */
  readonly reason: string | undefined;
  /** google.rpc.ErrorInfo domain ("usage.v1" for the service's own errors). */
  readonly domain: string | undefined;
  /** google.rpc.ErrorInfo metadata. */
  readonly metadata: Readonly<Record<string, string>>;
  /** google.rpc.BadRequest field violations (empty unless the request was malformed). */
  readonly fieldViolations: readonly FieldViolation[];
  /** How many attempts were made before giving up (1 when the first answer was final). */
  readonly attempts: number;

  constructor(init: UsageServiceErrorInit) {
    super(init.message, init.cause === undefined ? undefined : { cause: init.cause });
    this.name = "UsageServiceError";
    this.code = init.code;
    this.codeName = CODE_NAMES[init.code] ?? "UNKNOWN";
    this.reason = init.reason;
    this.domain = init.domain;
    this.metadata = { ...(init.metadata ?? {}) };
    this.fieldViolations = [...(init.fieldViolations ?? [])];
    this.attempts = init.attempts ?? 1;
  }

  /** True for the codes the client retries: UNAVAILABLE, DEADLINE_EXCEEDED and ABORTED. */
  get retryable(): boolean {
    return isRetryableCode(this.code);
  }

  /** The violation for one field path, if the service named it. */
  violation(field: string): FieldViolation | undefined {
    return this.fieldViolations.find((v) => v.field === field);
  }
}

/**
 * The codes worth the same request again: the service was not reached or did not answer in time
 * (UNAVAILABLE, DEADLINE_EXCEEDED), or it asked for a retry after a concurrent write (ABORTED,
 * reason CONCURRENCY_CONFLICT). Safe because every retry resends the same idempotency key.
 */
export function isRetryableCode(code: Code): boolean {
  return code === Code.Unavailable || code === Code.DeadlineExceeded || code === Code.Aborted;
}

/**
 * Whether a WatchUsage stream that ended with `error` is resumed (after the last version seen):
 * the retryable codes; RESOURCE_EXHAUSTED with reason SLOW_CONSUMER (the caller fell behind; its
 * other reasons, such as TOO_MANY_WATCHES, are not resumed); and CANCELLED, which the service never
 * answers but the HTTP/2 transport reports when the connection under a stream closes (watchUsage
 * checks first that the caller did not cancel it).
 */
export function isResumableWatchEnd(error: UsageServiceError): boolean {
  return (
    isRetryableCode(error.code) ||
    error.code === Code.Canceled ||
    (error.code === Code.ResourceExhausted && error.reason === "SLOW_CONSUMER")
  );
}

/** Maps anything a call threw to a UsageServiceError; the one place that reads ConnectError. */
export function toUsageServiceError(error: unknown, attempts: number): UsageServiceError {
  if (error instanceof UsageServiceError) {
    return error;
  }
  const connect = ConnectError.from(error);
  const info = connect.findDetails(ErrorInfoSchema)[0];
  const violations = connect
    .findDetails(BadRequestSchema)
    .flatMap((badRequest) => badRequest.fieldViolations)
    .map((v) => ({ field: v.field, description: v.description, reason: v.reason }));
  return new UsageServiceError({
    code: connect.code,
    message: connect.rawMessage,
    reason: info?.reason,
    domain: info?.domain,
    metadata: info?.metadata ?? {},
    fieldViolations: violations,
    attempts,
    cause: error,
  });
}
