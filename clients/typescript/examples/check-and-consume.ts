/**
 * Check and consume before a billable action.
 *
 * Ask the service to reserve the usage atomically (consume: true) before doing the work: under a
 * hard limit, concurrent callers can never go past it. A denial is an answer with a reason, not
 * an error: tell the user why. The idempotency key comes from your job id, so a retried job
 * consumes once.
 *
 *   USAGE_SERVICE_ADDRESS=127.0.0.1:50051 node dist/examples/check-and-consume.js cus_123 job_7 500
 */
import { pathToFileURL } from "node:url";

// In your code: import { ... } from "@usage-service/client";
import { idempotencyKey, UsageClient, type EntitlementReasonName } from "../src/index.js";

export type JobOutcome<T> =
  | { readonly ran: true; readonly result: T; readonly eventId: string; readonly remaining: bigint | undefined }
  | { readonly ran: false; readonly reason: EntitlementReasonName; readonly message: string };

const DENIAL_MESSAGES: Partial<Record<EntitlementReasonName, string>> = {
  LIMIT_EXCEEDED: "You have reached your plan's limit for this period.",
  FEATURE_NOT_IN_PLAN: "Your plan does not include this feature.",
  SUBSCRIPTION_INACTIVE: "Your subscription is not active.",
  CUSTOMER_NOT_FOUND: "No subscription found for this account.",
};

/** Consumes `tokens` of llm_tokens for the job, then runs `work`; or says why it may not. */
export async function runIfAllowed<T>(
  client: UsageClient,
  customerId: string,
  jobId: string,
  tokens: number,
  work: () => Promise<T>,
): Promise<JobOutcome<T>> {
  const answer = await client.checkEntitlement({
    customerId,
    feature: "llm_tokens",
    quantity: tokens,
    consume: true,
    idempotencyKey: idempotencyKey("llm-job", jobId),
  });
  if (!answer.allowed) {
    return {
      ran: false,
      reason: answer.reason,
      message: DENIAL_MESSAGES[answer.reason] ?? `Not allowed (${answer.reason}).`,
    };
  }
  // SOFT_LIMIT_EXCEEDED is allowed too: the overage is billed; you may want to warn the user.
  const result = await work();
  return { ran: true, result, eventId: answer.eventId, remaining: answer.remaining };
}

async function main(): Promise<void> {
  const [customerId = "cus_123", jobId = "job_7", tokens = "500"] = process.argv.slice(2);
  const client = new UsageClient({ address: process.env.USAGE_SERVICE_ADDRESS ?? "127.0.0.1:50051" });
  try {
    const outcome = await runIfAllowed(client, customerId, jobId, Number(tokens), async () => "done");
    console.log(outcome.ran ? `ran; ${outcome.remaining ?? "unlimited"} tokens left` : outcome.message);
  } finally {
    client.close();
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  await main();
}
