"""SQL for operations: the drain backlog read at metrics scrape time, and pruning old events."""

from __future__ import annotations

# Events waiting for a provider, per provider: how many and how long the oldest has waited.
# Customers without a provider are left out (their events are never reported).
DRAIN_BACKLOG = """
SELECT c.provider, count(*) AS events,
    extract(epoch FROM now() - min(e.recorded_at))::float8 AS oldest_age_seconds
FROM usage_events e JOIN customers c ON c.customer_id = e.customer_id
WHERE e.report_state = 'pending' AND c.provider <> ''
GROUP BY c.provider"""

# Deletes up to $2 reported events recorded before $1 whose event_time is before their
# customer's current period: the current period's totals may be rebuilt from its events (by
# UpsertCustomer), older periods' totals are kept in usage_totals and never rebuilt.
# SKIP LOCKED: a batch never waits for, or blocks, the drain or writers.
# $1 recorded before (timestamptz), $2 batch size
PRUNE_REPORTED = """
WITH doomed AS (
    SELECT e.event_id FROM usage_events e
    JOIN customers c ON c.customer_id = e.customer_id
    WHERE e.report_state = 'reported' AND e.recorded_at < $1 AND e.event_time < c.period_start
    LIMIT $2
    FOR UPDATE OF e SKIP LOCKED
)
DELETE FROM usage_events u USING doomed WHERE u.event_id = doomed.event_id"""
