/**
 * Create or update a customer, as your payment-webhook handler does.
 *
 * Checks and summaries need a customer: its plan, subscription status and current billing period.
 * Call this whenever the subscription changes (created, renewed, upgraded, cancelled). Here the
 * period is the current calendar month (UTC), so running it again changes nothing. The plans are
 * those of the service's plans file (the example plans: "free" and "pro").
 *
 *   USAGE_SERVICE_ADDRESS=127.0.0.1:50051 node dist/examples/upsert-customer.js cus_123 free
 */
import { pathToFileURL } from "node:url";

// In your code: import { ... } from "@usage-service/client";
import { UsageClient, type Customer } from "../src/index.js";

/** The calendar month (UTC) that contains `now`: [first day, first day of the next month). */
export function thisMonth(now: Date): { start: Date; end: Date } {
  const start = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1));
  const end = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 1));
  return { start, end };
}

/** Puts the customer on `planId`, active, billed monthly from the first of this month. */
export async function upsertForThisMonth(
  client: UsageClient,
  customerId: string,
  planId: string,
): Promise<Customer> {
  const { start, end } = thisMonth(new Date());
  return client.upsertCustomer({
    customerId,
    planId,
    subscriptionStatus: "ACTIVE",
    currentPeriodStartTime: start,
    currentPeriodEndTime: end,
    billingInterval: "MONTH",
  });
}

async function main(): Promise<void> {
  const [customerId = "cus_123", planId = "free"] = process.argv.slice(2);
  const client = new UsageClient({ address: process.env.USAGE_SERVICE_ADDRESS ?? "127.0.0.1:50051" });
  try {
    const saved = await upsertForThisMonth(client, customerId, planId);
    const day = (d: Date | undefined) => d?.toISOString().slice(0, 10) ?? "?";
    console.log(
      `${saved.customerId}: plan ${saved.planId} (${saved.subscriptionStatus.toLowerCase()}), ` +
        `${day(saved.currentPeriodStartTime)} to ${day(saved.currentPeriodEndTime)}`,
    );
  } finally {
    client.close();
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  await main();
}
