/**
 * Record usage after a billable action.
 *
 * Run the action first, then record what it used, with an idempotency key derived from your own
 * id for the action (here: the completion's request id). If this code runs twice for the same
 * request (a retry, a re-delivered job, a crash and restart), the service keeps one event.
 *
 *   USAGE_SERVICE_ADDRESS=127.0.0.1:50051 node dist/examples/record-usage.js cus_123 req_42 1234
 */
import { pathToFileURL } from "node:url";

// In your code: import { ... } from "@usage-service/client";
import { idempotencyKey, UsageClient, UsageServiceError } from "../src/index.js";

export interface Completion {
  readonly requestId: string;
  readonly tokens: number;
}

/** Records the tokens of one completion. Returns the stored event id (the original on a repeat). */
export async function recordCompletionUsage(
  client: UsageClient,
  customerId: string,
  completion: Completion,
): Promise<{ eventId: string; duplicate: boolean }> {
  try {
    return await client.recordUsage({
      customerId,
      meter: "llm_tokens",
      quantity: completion.tokens,
      // Same request id -> same key -> recorded once, however often this runs.
      idempotencyKey: idempotencyKey("llm-completion", completion.requestId),
      properties: { request_id: completion.requestId },
    });
  } catch (error) {
    if (error instanceof UsageServiceError && error.reason === "IDEMPOTENCY_KEY_REUSED") {
      // The key was used for a different quantity: a bug in how keys are derived, not a retry.
      throw new Error(`request ${completion.requestId} was already recorded with other values`, {
        cause: error,
      });
    }
    throw error; // UNAVAILABLE etc. already retried by the client: queue it and try later.
  }
}

async function main(): Promise<void> {
  const [customerId = "cus_123", requestId = "req_42", tokens = "1234"] = process.argv.slice(2);
  const client = new UsageClient({ address: process.env.USAGE_SERVICE_ADDRESS ?? "127.0.0.1:50051" });
  try {
    const result = await recordCompletionUsage(client, customerId, { requestId, tokens: Number(tokens) });
    console.log(result.duplicate ? `already recorded as ${result.eventId}` : `recorded ${result.eventId}`);
  } finally {
    client.close();
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  await main();
}
