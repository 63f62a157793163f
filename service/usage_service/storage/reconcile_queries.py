"""Every SQL statement of the reconciliation, by name."""

from __future__ import annotations

# Customers with events billed to a provider, in order. $1 customer_id[] (empty: all),
# $2 provider ('' any)
CUSTOMERS = """
SELECT DISTINCT e.customer_id FROM usage_events e JOIN customers c USING (customer_id)
WHERE c.plan_id <> '' AND e.provider <> ''
    AND (cardinality($1::text[]) = 0 OR e.customer_id = ANY($1::text[]))
    AND ($2::text = '' OR e.provider = $2)
ORDER BY 1"""

# One customer's events of one period, per provider and meter: all of them that are billed (the
# part grants did not pay for), and those the provider accepted.
# $1 customer_id, $2 start, $3 end, $4 provider ('' any)
FIGURES = """
SELECT e.provider, e.meter,
    count(*) FILTER (WHERE e.report_state NOT IN ('covered', 'unbilled')) AS n,
    coalesce(sum(e.quantity - e.covered)
        FILTER (WHERE e.report_state NOT IN ('covered', 'unbilled')), 0)::bigint AS s,
    max(e.quantity) AS mx,
    (array_agg(e.quantity ORDER BY e.event_time DESC, e.seq DESC))[1] AS lq,
    count(*) FILTER (WHERE e.report_state = 'reported') AS rn,
    coalesce(sum(e.quantity - e.covered) FILTER (WHERE e.report_state = 'reported'), 0)::bigint
        AS rs,
    max(e.quantity) FILTER (WHERE e.report_state = 'reported') AS rmx,
    (array_agg(e.quantity ORDER BY e.event_time DESC, e.seq DESC)
        FILTER (WHERE e.report_state = 'reported'))[1] AS rlq,
    count(*) FILTER (WHERE e.report_state = 'pending') AS pending,
    count(*) FILTER (WHERE e.report_state = 'pending' AND e.report_id IS NOT NULL) AS in_reports,
    max(e.reported_at) AS last_reported_at, now() AS read_at
FROM usage_events e
WHERE e.customer_id = $1 AND e.event_time >= $2 AND e.event_time < $3 AND e.provider <> ''
    AND ($4::text = '' OR e.provider = $4)
GROUP BY 1, 2 ORDER BY 1, 2"""

# The events a provider accepted in a period, for per-event providers. $1 customer_id,
# $2 provider, $3 meter, $4 start, $5 end
SENT = """
SELECT event_id::text, quantity - covered AS quantity, event_time FROM usage_events
WHERE customer_id = $1 AND provider = $2 AND meter = $3 AND event_time >= $4
    AND event_time < $5 AND report_state = 'reported'
ORDER BY event_time, event_id"""

# $1 customer_id
CUSTOMER_PROVIDERS = """
SELECT provider, provider_customer_id, subscription_items FROM customer_providers
WHERE customer_id = $1"""

# Fix reports of a customer's lanes: when delivered ones were accepted (the provider may still be
# showing them), and open ones (in flight). $1 customer_id, $2 lane[]
FIXES = """
SELECT lane, state, value, events::text AS events, settled_at FROM reports
WHERE customer_id = $1 AND kind = 'fix' AND lane = ANY($2::text[])
    AND state IN ('open', 'delivered')"""

# A customer's events in its open fix reports (per-event providers): a re-send already queued.
# $1 customer_id, $2 event_id[]
QUEUED = """
SELECT DISTINCT e.value ->> 'event_id' AS event_id
FROM reports r, jsonb_array_elements(r.events) AS e(value)
WHERE r.customer_id = $1 AND r.kind = 'fix' AND r.state = 'open'
    AND e.value ->> 'event_id' = ANY($2::text[])"""

# The customer ids a lane's delivered reports carried for events of a period.
# $1 customer_id, $2 lane, $3 start, $4 end
SENT_TO = """
SELECT DISTINCT e.value ->> 'provider_customer_id' AS id
FROM reports r, jsonb_array_elements(r.events) AS e(value)
WHERE r.customer_id = $1 AND r.lane = $2 AND r.state = 'delivered'
    AND (e.value ->> 'event_time')::timestamptz >= $3
    AND (e.value ->> 'event_time')::timestamptz < $4"""

# Fixes of one lane serialise on this lock, taken in the fix's transaction. $1 lane
LOCK_LANE = "SELECT pg_advisory_xact_lock(hashtext($1))"

# A fix queued on the lane since a reconciliation read the provider.
# $1 customer_id, $2 lane, $3 read at
FIXED_SINCE = """
SELECT count(*) FROM reports
WHERE customer_id = $1 AND kind = 'fix' AND lane = $2 AND created_at >= $3"""

# $1 customer_id, $2 report_id, $3 provider, $4 lane (NULL: none), $5 events (JSON text),
# $6 value, $7 stated_at (NULL: the newest event's time)
INSERT_FIX = """
INSERT INTO reports (customer_id, report_id, provider, lane, events, value, kind, first_sent_at,
                     stated_at)
VALUES ($1, $2::uuid, $3, $4, $5::text::jsonb, $6, 'fix', now(), $7)
ON CONFLICT (customer_id, lane) WHERE state = 'open' AND lane IS NOT NULL DO NOTHING
RETURNING report_id"""

# The latest event a provider accepted in a period: what a Stripe fix is timed and addressed by.
# $1 customer_id, $2 provider, $3 meter, $4 start, $5 end
LATEST_SENT = """
SELECT e.event_id::text, e.customer_id, e.meter, e.quantity - e.covered AS quantity,
    e.event_time, e.properties
FROM usage_events e
WHERE e.customer_id = $1 AND e.provider = $2 AND e.meter = $3 AND e.event_time >= $4
    AND e.event_time < $5 AND e.report_state = 'reported'
ORDER BY e.event_time DESC, e.seq DESC LIMIT 1"""

# Events by id, for a per-event re-send. $1 customer_id, $2 event_id[]
EVENTS = """
SELECT e.event_id::text, e.customer_id, e.meter, e.quantity - e.covered AS quantity,
    e.event_time, e.properties
FROM usage_events e WHERE e.customer_id = $1 AND e.event_id = ANY($2::uuid[])
ORDER BY e.event_time, e.event_id"""


# Stripe identifiers (a report's id, one of its pieces `<id>-<k>`, or a count meter's event
# id) to the customer, meter and events they carried: a lock-free read across customers.
# $1 report_id[], $2 event_id[]
IDENTIFIED = """
SELECT r.report_id::text AS report_id, e.value ->> 'event_id' AS event_id,
    e.value ->> 'customer_id' AS customer_id, e.value ->> 'meter' AS meter
FROM reports r, jsonb_array_elements(r.events) AS e(value)
WHERE r.provider = 'stripe'
    AND (r.report_id = ANY($1::uuid[]) OR e.value ->> 'event_id' = ANY($2::text[]))
ORDER BY 1, 2"""
