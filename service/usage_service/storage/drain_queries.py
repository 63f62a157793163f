"""Every SQL statement of the drain, and of the operator commands around it, by name."""

from __future__ import annotations

from usage_service.storage.queries import CHANGED_TOTALS

LANE_SEPARATOR = "\x1f"  # chr(31) in SQL

# An event's quantity to report: the part grants did not pay for; properties NULL when empty
# (nothing to decode).
_EVENT_FIELDS = """e.event_id, e.customer_id, e.meter, e.quantity - e.covered AS quantity,
    e.event_time, nullif(e.properties, '{}'::jsonb) AS properties, p.provider_customer_id,
    coalesce(p.subscription_items ->> e.meter, '') AS subscription_item"""

# Pending events attributed to one provider, not yet in a report, oldest first, skipping rows
# other workers hold and lanes that have a report in flight; each with the customer's ids at that
# provider (kept after a switch) and the bounds of its period's totals row (NULL when the event is
# outside every known period).
# $1 provider, $2 limit
CLAIM_EVENTS = f"""
SELECT {_EVENT_FIELDS}, t.period_start, t.period_end
FROM usage_events e
JOIN customer_providers p ON p.customer_id = e.customer_id AND p.provider = e.provider
LEFT JOIN usage_totals t ON t.customer_id = e.customer_id AND t.meter = e.meter
    AND t.period_start <= e.event_time AND e.event_time < t.period_end
WHERE e.report_state = 'pending' AND e.report_id IS NULL AND e.provider = $1
    AND NOT EXISTS (
        SELECT 1 FROM reports r
        WHERE r.state = 'open' AND r.lane = concat_ws(chr(31), $1::text, e.customer_id, e.meter))
ORDER BY e.event_time, e.event_id
LIMIT $2
FOR UPDATE OF e SKIP LOCKED"""

# Batch providers (no lanes), in one statement: claims pending events like CLAIM_EVENTS (no
# period bounds, no lanes), puts them in reports of $4 events in claim order (the k-th report
# takes the id $3[k]), inserts the reports (events as event_to_json writes them, oldest first)
# leased to $5 for $6 seconds, and returns the claimed events with their report ids.
# $1 provider, $2 limit, $3 report_id[] (at least ceil($2 / $4)), $4 events per report,
# $5 owner, $6 lease (seconds)
CLAIM_BATCHES = f"""
WITH locked AS (
    SELECT {_EVENT_FIELDS}
    FROM usage_events e
    JOIN customer_providers p ON p.customer_id = e.customer_id AND p.provider = e.provider
    WHERE e.report_state = 'pending' AND e.report_id IS NULL AND e.provider = $1
    ORDER BY e.event_time, e.event_id
    LIMIT $2
    FOR UPDATE OF e SKIP LOCKED
), picked AS (  -- numbered once locked: rows skipped for other workers leave no gaps
    SELECT k.*,
        ($3::uuid[])[(row_number() OVER (ORDER BY k.event_time, k.event_id) - 1) / $4 + 1]
            AS report_id
    FROM locked k
), assigned AS (
    UPDATE usage_events e SET report_id = k.report_id
    FROM picked k
    WHERE e.event_id = k.event_id
), made AS (
    INSERT INTO reports (report_id, provider, events, lease_until, leased_by, first_sent_at)
    SELECT k.report_id, $1,
        jsonb_agg(jsonb_build_object(
            'event_id', k.event_id, 'customer_id', k.customer_id, 'meter', k.meter,
            'quantity', k.quantity, 'event_time', k.event_time,
            'properties', coalesce(k.properties, '{{}}'::jsonb),
            'provider_customer_id', k.provider_customer_id,
            'subscription_item', k.subscription_item) ORDER BY k.event_time, k.event_id),
        now() + make_interval(secs => $6), $5, now()
    FROM picked k
    GROUP BY k.report_id
)
SELECT k.* FROM picked k
ORDER BY k.event_time, k.event_id"""

# The max and the last value of the events billed to one provider in periods of customers'
# meters, parked ones left out: a period's totals also count events billed elsewhere or unbilled.
# $1 provider, $2 customer_id[], $3 meter[], $4 period_start[], $5 period_end[]
PERIOD_FIGURES = """
SELECT g.c AS customer_id, g.m AS meter, g.s AS period_start, max(e.quantity) AS quantity_max,
    (array_agg(e.quantity ORDER BY e.event_time DESC, e.seq DESC))[1] AS last_quantity
FROM unnest($2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[]) AS g(c, m, s, en)
JOIN usage_events e ON e.customer_id = g.c AND e.meter = g.m AND e.provider = $1
    AND e.event_time >= g.s AND e.event_time < g.en AND e.report_state <> 'failed'
GROUP BY 1, 2, 3"""

# A lane conflict (another worker just opened a report on it) inserts nothing for that report.
# $1 report_id[], $2 provider, $3 lane[] (NULL: no lane), $4 events[] (JSON text), $5 value[],
# $6 owner, $7 lease (seconds), $8 stated_at[]
INSERT_REPORTS = """
INSERT INTO reports (report_id, provider, lane, events, value, lease_until, leased_by,
                     first_sent_at, stated_at)
SELECT r, $2, l, ev::jsonb, v, now() + make_interval(secs => $7), $6, now(), s
FROM unnest($1::uuid[], $3::text[], $4::text[], $5::bigint[], $8::timestamptz[])
    AS u(r, l, ev, v, s)
ON CONFLICT (lane) WHERE state = 'open' AND lane IS NOT NULL DO NOTHING
RETURNING report_id"""

# $1 event_id[], $2 report_id[]
ASSIGN_EVENTS = """
UPDATE usage_events e SET report_id = u.r
FROM unnest($1::uuid[], $2::uuid[]) AS u(e, r)
WHERE e.event_id = u.e"""

_REPORT_FIELDS = """r.report_id, r.provider, r.events, r.value, r.checkpoint, r.attempts,
    r.first_sent_at, r.stated_at"""

# Open reports that are due and whose lease (if any) has run out: a retry, or a dead worker's.
# $1 provider, $2 owner, $3 lease (seconds), $4 limit
CLAIM_REPORTS = f"""
UPDATE reports r SET lease_until = now() + make_interval(secs => $3), leased_by = $2,
    first_sent_at = coalesce(r.first_sent_at, now())
FROM (
    SELECT report_id FROM reports
    WHERE provider = $1 AND state = 'open' AND next_attempt_at <= now()
        AND (lease_until IS NULL OR lease_until < now())
    ORDER BY next_attempt_at
    LIMIT $4
    FOR UPDATE SKIP LOCKED
) due
WHERE r.report_id = due.report_id
RETURNING {_REPORT_FIELDS}"""

# Only while the lease is ours: a Lemon Squeezy baseline must be stored before the send. It
# renews the lease, so no other worker takes the report while the send it precedes may land.
# $1 report_id, $2 owner, $3 checkpoint (JSON text), $4 lease (seconds from now)
SAVE_CHECKPOINT = """
UPDATE reports SET checkpoint = $3::jsonb, lease_until = now() + make_interval(secs => $4)
WHERE report_id = $1 AND state = 'open' AND leased_by = $2 AND lease_until > now()
RETURNING report_id"""

# $1 report_id, $2 owner, $3 delay (seconds), $4 reason
RETRY_LATER = """
UPDATE reports SET attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => $3),
    lease_until = NULL, leased_by = NULL, last_error = $4
WHERE report_id = $1 AND state = 'open' AND leased_by = $2"""

# Settles a report once, whoever holds the lease: a delivery is a fact.
# $1 report_id, $2 state (delivered | failed), $3 reason
CLOSE_REPORT = """
UPDATE reports SET state = $2, last_error = $3, settled_at = now(), lease_until = NULL
WHERE report_id = $1 AND state = 'open'
RETURNING report_id"""

# Several delivered reports at once; report rows are locked in id order.
# $1 report_id[]
CLOSE_DELIVERED = """
UPDATE reports r SET state = 'delivered', last_error = '', settled_at = now(), lease_until = NULL
FROM (
    SELECT report_id FROM reports WHERE report_id = ANY($1::uuid[]) AND state = 'open'
    ORDER BY report_id
    FOR UPDATE
) due
WHERE r.report_id = due.report_id
RETURNING r.report_id"""

# $1 report_id[]
LOCK_REPORT_CUSTOMERS = """
SELECT customer_id FROM customers
WHERE customer_id IN (
    SELECT customer_id FROM usage_events
    WHERE report_id = ANY($1::uuid[]) AND report_state = 'pending')
ORDER BY customer_id
FOR SHARE"""

_MOVED = "RETURNING e.customer_id, e.meter, e.event_time, e.quantity - e.covered AS quantity"

# $1 report_id, $2 event_id[], $3 reason[]
PARK_EVENTS = f"""
UPDATE usage_events e SET report_state = 'failed', last_error = u.reason
FROM unnest($2::uuid[], $3::text[]) AS u(event_id, reason)
WHERE e.event_id = u.event_id AND e.report_id = $1 AND e.report_state = 'pending'
{_MOVED}"""

# $1 report_id, $2 reason
PARK_REPORT_EVENTS = f"""
UPDATE usage_events e SET report_state = 'failed', last_error = $2
WHERE e.report_id = $1 AND e.report_state = 'pending'
{_MOVED}"""

# $1 report_id[]
MARK_REPORTED = f"""
UPDATE usage_events e SET report_state = 'reported', reported_at = now(), last_error = ''
WHERE e.report_id = ANY($1::uuid[]) AND e.report_state = 'pending'
{_MOVED}"""

# MARK_REPORTED, folded per totals row (events outside every period left out), sorted.
# $1 report_id[]
MARK_REPORTED_FOLDED = f"""
WITH moved AS (
    UPDATE usage_events e SET report_state = 'reported', reported_at = now(), last_error = ''
    WHERE e.report_id = ANY($1::uuid[]) AND e.report_state = 'pending'
    {_MOVED}
)
SELECT t.customer_id, t.meter, t.period_start, count(*) AS n, sum(m.quantity) AS s
FROM moved m
JOIN usage_totals t ON t.customer_id = m.customer_id AND t.meter = m.meter
    AND t.period_start <= m.event_time AND m.event_time < t.period_end
GROUP BY 1, 2, 3
ORDER BY 1, 2, 3"""

_PARKED = """e.report_state = 'failed' AND ($1::text = '' OR e.provider = $1)
    AND (cardinality($2::uuid[]) = 0 OR e.event_id = ANY($2::uuid[]))"""

# $1 provider ('' for all), $2 event_id[] (empty for all)
LOCK_PARKED_CUSTOMERS = f"""
SELECT customer_id FROM customers
WHERE customer_id IN (SELECT e.customer_id FROM usage_events e WHERE {_PARKED})
ORDER BY customer_id
FOR SHARE"""

# Parked events go back to pending, out of their report: the next claim builds a new one.
# $1 provider ('' for all), $2 event_id[] (empty for all)
REQUEUE = f"""
UPDATE usage_events e SET report_id = NULL, last_error = '',
    report_state = CASE WHEN e.provider = '' THEN 'unbilled' ELSE 'pending' END
WHERE {_PARKED}
{_MOVED}, e.report_state"""

_EVENTS_IN_TOTALS = """
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[]) AS ev(c, m, w, q)
JOIN usage_totals t ON t.customer_id = ev.c AND t.meter = ev.m
    AND t.period_start <= ev.w AND ev.w < t.period_end"""

# $1 customer_id[], $2 meter[], $3 event_time[], $4 quantity[]
LOCK_TOTALS = f"""
SELECT t.customer_id {_EVENTS_IN_TOTALS}
ORDER BY t.customer_id, t.meter, t.period_start
FOR UPDATE OF t"""

# Moves events between the drain counters of their periods' totals rows.
# $1..$4 as LOCK_TOTALS, $5 reported delta per event (-1, 0, 1), $6 failed delta, $7 unbilled
ADJUST_TOTALS = f"""
UPDATE usage_totals t SET
    reported_count = t.reported_count + $5 * a.n, reported_sum = t.reported_sum + $5 * a.s,
    failed_count = t.failed_count + $6 * a.n, failed_sum = t.failed_sum + $6 * a.s,
    unbilled_count = t.unbilled_count + $7 * a.n, unbilled_sum = t.unbilled_sum + $7 * a.s
FROM (
    SELECT t.customer_id, t.meter, t.period_start, count(*) AS n, sum(ev.q) AS s
    {_EVENTS_IN_TOTALS}
    GROUP BY 1, 2, 3
) a
WHERE t.customer_id = a.customer_id AND t.meter = a.meter AND t.period_start = a.period_start
RETURNING {CHANGED_TOTALS}"""

# ADJUST_TOTALS for events already folded per totals row (MARK_REPORTED_FOLDED): the rows are
# locked in key order (the CTE is read in full by the update), then moved.
# $1 customer_id[], $2 meter[], $3 period_start[], $4 events[], $5 quantity sum[],
# $6 reported delta per event (-1, 0, 1), $7 failed delta, $8 unbilled delta
ADJUST_FOLDED = f"""
WITH locked AS (
    SELECT t.customer_id, t.meter, t.period_start, a.n, a.s
    FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[], $5::bigint[])
        AS a(customer_id, meter, period_start, n, s)
    JOIN usage_totals t ON t.customer_id = a.customer_id AND t.meter = a.meter
        AND t.period_start = a.period_start
    ORDER BY 1, 2, 3
    FOR UPDATE OF t
)
UPDATE usage_totals t SET
    reported_count = t.reported_count + $6 * a.n, reported_sum = t.reported_sum + $6 * a.s,
    failed_count = t.failed_count + $7 * a.n, failed_sum = t.failed_sum + $7 * a.s,
    unbilled_count = t.unbilled_count + $8 * a.n, unbilled_sum = t.unbilled_sum + $8 * a.s
FROM locked a
WHERE t.customer_id = a.customer_id AND t.meter = a.meter AND t.period_start = a.period_start
RETURNING {CHANGED_TOTALS}"""

# Events of a customer known only by its usage (a placeholder) are not attributed yet: '?'.
_PROVIDER = "coalesce(e.provider, '?')"

# Per provider the events are attributed to; `moved`: those whose customer is billed by another
# provider now.
STATUS_EVENTS = f"""
SELECT {_PROVIDER} AS provider,
    count(*) FILTER (WHERE e.report_state = 'pending') AS pending,
    min(e.recorded_at) FILTER (WHERE e.report_state = 'pending') AS oldest_pending,
    count(*) FILTER (WHERE e.report_state = 'failed') AS failed,
    count(*) FILTER (WHERE c.plan_id <> '' AND c.provider <> e.provider) AS moved,
    now() AS now
FROM usage_events e LEFT JOIN customers c ON c.customer_id = e.customer_id
WHERE e.report_state IN ('pending', 'failed')
GROUP BY 1 ORDER BY 1"""

STATUS_REASONS = f"""
SELECT {_PROVIDER} AS provider, e.last_error, count(*) AS events
FROM usage_events e
WHERE e.report_state = 'failed'
GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2"""

STATUS_RETRYING = """
SELECT provider, count(*) AS reports, max(attempts) AS attempts,
    (array_agg(last_error ORDER BY next_attempt_at DESC))[1] AS last_error
FROM reports WHERE state = 'open' AND attempts > 0
GROUP BY provider ORDER BY provider"""


# Events attributed to a provider other than their customer's current one, that it never
# accepted (pending or parked). $1 from provider ('' any), $2 customer_id[] (empty: all)
_MOVABLE = """e.provider IS NOT NULL AND e.provider <> c.provider AND c.plan_id <> ''
    AND e.report_state IN ('pending', 'failed') AND ($1::text = '' OR e.provider = $1)
    AND (cardinality($2::text[]) = 0 OR e.customer_id = ANY($2::text[]))"""

# $1, $2 as _MOVABLE
LOCK_MOVABLE_CUSTOMERS = f"""
SELECT c.customer_id FROM customers c
WHERE c.customer_id IN (
    SELECT e.customer_id FROM usage_events e JOIN customers c ON c.customer_id = e.customer_id
    WHERE {_MOVABLE})
ORDER BY c.customer_id
FOR SHARE"""

# Open reports holding movable events that are due and no worker holds (a worker may be sending,
# or a send's outcome may still land). $1, $2 as _MOVABLE
LOCK_MOVABLE_REPORTS = f"""
SELECT r.report_id FROM reports r
WHERE r.state = 'open' AND (r.lease_until IS NULL OR r.lease_until < now())
    AND r.next_attempt_at <= now()
    AND r.report_id IN (
        SELECT e.report_id FROM usage_events e JOIN customers c ON c.customer_id = e.customer_id
        WHERE {_MOVABLE} AND e.report_state = 'pending' AND e.report_id IS NOT NULL)
ORDER BY r.report_id
FOR UPDATE SKIP LOCKED"""

# Re-attributes movable events to their customer's current provider ('' none: unbilled), out of
# their reports; those in an open report not given in $3 stay.
# $1, $2 as _MOVABLE, $3 abandoned report_id[]
MOVE_EVENTS = f"""
WITH moving AS (
    SELECT e.event_id, e.report_state AS was, e.provider AS was_provider,
        e.report_id AS was_report, c.provider AS target
    FROM usage_events e JOIN customers c ON c.customer_id = e.customer_id
    WHERE {_MOVABLE}
        AND (e.report_state = 'failed' OR e.report_id IS NULL OR e.report_id = ANY($3::uuid[]))
    FOR UPDATE OF e
)
UPDATE usage_events e SET provider = m.target, report_id = NULL, last_error = '',
    report_state = CASE WHEN m.target = '' THEN 'unbilled' ELSE 'pending' END
FROM moving m
WHERE e.event_id = m.event_id
RETURNING e.customer_id, e.meter, e.event_time, e.quantity - e.covered AS quantity, m.was,
    e.report_state,
    m.was_provider, m.was_report, m.target"""

# Movable events left in open reports. $1, $2 as _MOVABLE
COUNT_IN_OPEN_REPORTS = f"""
SELECT count(*) FROM usage_events e JOIN customers c ON c.customer_id = e.customer_id
WHERE {_MOVABLE} AND e.report_state = 'pending' AND e.report_id IS NOT NULL"""

# The rest of an abandoned report's events go back to the queue: per-event providers dedupe them
# by event id when they are sent again. $1 report_id[]
RELEASE_EVENTS = """
UPDATE usage_events SET report_id = NULL
WHERE report_id = ANY($1::uuid[]) AND report_state = 'pending'"""

# $1 report_id[], $2 reason
ABANDON_REPORTS = """
UPDATE reports SET state = 'failed', last_error = $2, settled_at = now(), lease_until = NULL
WHERE report_id = ANY($1::uuid[]) AND state = 'open'"""
