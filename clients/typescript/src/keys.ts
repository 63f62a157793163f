import { createHash } from "node:crypto";

/** One part of an idempotency key: your own ids (order id, request id, line number...). */
export type KeyPart = string | number | bigint;

/**
 * A deterministic idempotency key derived from the caller's own ids: the same parts always give
 * the same key, so a retry, a re-delivered job or a restarted process records the event once.
 *
 * The parts are length-prefixed before hashing, so ("ab", "c") and ("a", "bc") differ. The key is
 * the hex SHA-256 (64 characters; the service accepts up to 255).
 *
 *   idempotencyKey("chat-completion", requestId)         // one event per request
 *   idempotencyKey("invoice-line", invoiceId, lineNo)     // one event per line
 */
export function idempotencyKey(...parts: KeyPart[]): string {
  if (parts.length === 0) {
    throw new TypeError("idempotencyKey needs at least one part");
  }
  const hash = createHash("sha256");
  for (const part of parts) {
    const text = `${typeof part}:${String(part)}`;
    hash.update(`${Buffer.byteLength(text, "utf8")}:${text};`, "utf8");
  }
  return hash.digest("hex");
}
