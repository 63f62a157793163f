"""SQL for operations: the drain backlog read at metrics scrape time, and pruning old events."""

from __future__ import annotations

# Events waiting for a provider, per provider they are attributed to: how many and how long the
# oldest has waited. Events not attributed yet (of customers known only by their usage) are left
# out; unbilled ones are never pending.
DRAIN_BACKLOG = """
SELECT e.provider, count(*) AS events,
    extract(epoch FROM now() - min(e.recorded_at))::float8 AS oldest_age_seconds
FROM usage_events e
WHERE e.report_state = 'pending' AND e.provider IS NOT NULL
GROUP BY e.provider"""

# Customers with settled events (reported, unbilled, or paid for by grants) recorded before $1
# in a period before their last confirmed one, in order. A read.
PRUNABLE_CUSTOMERS = """
SELECT DISTINCT e.customer_id FROM usage_events e
JOIN customers c ON c.customer_id = e.customer_id
WHERE e.report_state IN ('reported', 'unbilled', 'covered') AND e.recorded_at < $1
    AND e.event_time < c.period_start
ORDER BY 1"""

# $1 customer_id. Prune waits for recorders and webhooks of the customer, and they for it.
LOCK_CUSTOMER = "SELECT period_start FROM customers WHERE customer_id = $1 FOR UPDATE"

# Deletes up to $4 of a customer's settled events (reported, unbilled or covered) recorded
# before $2 whose event_time is before $3 (the customer's last confirmed period start),
# returning what they counted.
# $1 customer_id, $2 recorded before, $3 horizon, $4 batch size
PRUNE_REPORTED = """
DELETE FROM usage_events WHERE customer_id = $1 AND event_id IN (
    SELECT event_id FROM usage_events
    WHERE customer_id = $1 AND report_state IN ('reported', 'unbilled', 'covered')
        AND recorded_at < $2
        AND event_time < $3
    LIMIT $4)
RETURNING meter, quantity"""

# $1 customer_id, $2 meter[], $3 pruned events[], $4 pruned quantity[]
COUNT_PRUNED = """
UPDATE usage_lifetime l SET pruned_count = l.pruned_count + u.n, pruned_sum = l.pruned_sum + u.s
FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS u(m, n, s)
WHERE l.customer_id = $1 AND l.meter = u.m"""

# $1 customer_id, $2 horizon
MARK_PRUNED = """
UPDATE customers SET pruned_before = greatest(pruned_before, $2) WHERE customer_id = $1"""
