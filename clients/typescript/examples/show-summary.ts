/**
 * Show a customer their usage for the current billing period.
 *
 *   USAGE_SERVICE_ADDRESS=127.0.0.1:50051 node dist/examples/show-summary.js cus_123
 */
import { pathToFileURL } from "node:url";

// In your code: import { ... } from "@usage-service/client";
import { UsageClient, type UsageSummary } from "../src/index.js";

/** One line per meter, e.g. "llm_tokens: 150 of 100 tokens included (50 over), limit 1000". */
export function formatSummary(summary: UsageSummary): string[] {
  const period =
    summary.periodStartTime && summary.periodEndTime
      ? `${summary.periodStartTime.toISOString().slice(0, 10)} to ${summary.periodEndTime.toISOString().slice(0, 10)}`
      : "no current period";
  const lines = [`Plan ${summary.planId} (${summary.subscriptionStatus.toLowerCase()}), ${period}`];
  for (const meter of summary.meters) {
    let line = `${meter.meter}: ${meter.used} of ${meter.included} ${meter.unit} included`;
    if (meter.overage > 0n) line += ` (${meter.overage} over)`;
    line += meter.limit === undefined ? ", no limit" : `, limit ${meter.limit}`;
    lines.push(line);
  }
  return lines;
}

export async function showSummary(client: UsageClient, customerId: string): Promise<string[]> {
  return formatSummary(await client.getUsageSummary(customerId));
}

async function main(): Promise<void> {
  const [customerId = "cus_123"] = process.argv.slice(2);
  const client = new UsageClient({ address: process.env.USAGE_SERVICE_ADDRESS ?? "127.0.0.1:50051" });
  try {
    for (const line of await showSummary(client, customerId)) console.log(line);
  } finally {
    client.close();
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  await main();
}
