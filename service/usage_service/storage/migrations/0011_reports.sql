-- Reports belong to one customer, so they shard with the customer's events (Citus: distributed
-- by customer_id, co-located). Every statement on reports names the customer.

ALTER TABLE reports ADD COLUMN customer_id text;

-- Each report's customer: the lane's (lane reports hold one customer's events), else the least
-- customer among its events (each event in `events` carries its customer), else '' (a report
-- without events).
UPDATE reports r SET customer_id = coalesce(
    nullif(split_part(r.lane, chr(31), 2), ''),
    (SELECT min(x.value ->> 'customer_id') FROM jsonb_array_elements(r.events) AS x(value)),
    '');

ALTER TABLE reports ALTER COLUMN customer_id SET NOT NULL;

ALTER TABLE reports DROP CONSTRAINT reports_pkey;

ALTER TABLE reports ADD PRIMARY KEY (customer_id, report_id);

-- Reports of batch providers (Polar, Dodo Payments, Creem) could hold several customers'
-- events. Each is split in place: every other customer gets a row of its own under the same
-- report id (the key is the pair), with its events and the report's state, lease, attempts and
-- first send copied; the events keep their report_id, so nothing moves in usage_events. An open
-- one's pieces are sent again like any open report: these providers dedupe by event id, so
-- nothing is billed twice; settled ones stay history.
INSERT INTO reports (customer_id, report_id, provider, lane, state, events, value, checkpoint,
    attempts, next_attempt_at, lease_until, leased_by, first_sent_at, last_error, created_at,
    settled_at, stated_at, kind)
SELECT x.customer_id, r.report_id, r.provider, r.lane, r.state, x.events, r.value, r.checkpoint,
    r.attempts, r.next_attempt_at, r.lease_until, r.leased_by, r.first_sent_at, r.last_error,
    r.created_at, r.settled_at, r.stated_at, r.kind
FROM reports r
CROSS JOIN LATERAL (
    SELECT a.value ->> 'customer_id' AS customer_id, jsonb_agg(a.value ORDER BY a.k) AS events
    FROM jsonb_array_elements(r.events) WITH ORDINALITY AS a(value, k)
    WHERE a.value ->> 'customer_id' <> r.customer_id
    GROUP BY 1
) x
WHERE r.lane IS NULL;

-- The rows split from keep their own customer's events only.
UPDATE reports r SET events = (
    SELECT jsonb_agg(a.value ORDER BY a.k)
    FROM jsonb_array_elements(r.events) WITH ORDINALITY AS a(value, k)
    WHERE a.value ->> 'customer_id' = r.customer_id)
WHERE r.lane IS NULL AND EXISTS (
    SELECT 1 FROM jsonb_array_elements(r.events) AS x(value)
    WHERE x.value ->> 'customer_id' <> r.customer_id);

-- At most one open report per lane, within its customer.
DROP INDEX reports_open_lane;

CREATE UNIQUE INDEX reports_open_lane ON reports (customer_id, lane)
    WHERE state = 'open' AND lane IS NOT NULL;

-- A reconciliation reads a customer's lanes' reports of every state.
DROP INDEX reports_lane;

CREATE INDEX reports_lane ON reports (customer_id, lane) WHERE lane IS NOT NULL;

-- reports_due (provider, next_attempt_at) stays: the lock-free scan for due reports of every
-- customer.

-- A customer's unclaimed events for one provider, oldest first: the per-customer claim.
CREATE INDEX usage_events_unclaimed_by_customer
    ON usage_events (customer_id, provider, event_time, event_id)
    WHERE report_state = 'pending' AND report_id IS NULL;
