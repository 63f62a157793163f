"""Every SQL statement of the drain, and of the operator commands around it, by name.

Reports belong to one customer (key: customer_id, report_id). Every statement that writes or
locks names one customer (`customer_id = $1`) on each table it touches; work across customers is
a lock-free read (DUE_*, *_CUSTOMERS, STATUS_*) followed by statements per customer, taken in
customer_id order."""

from __future__ import annotations

from usage_service.storage.queries import CHANGED_TOTALS

LANE_SEPARATOR = "\x1f"  # chr(31) in SQL

# An event's quantity to report: the part grants did not pay for; properties NULL when empty
# (nothing to decode).
_EVENT_FIELDS = """e.event_id, e.customer_id, e.meter, e.quantity - e.covered AS quantity,
    e.event_time, nullif(e.properties, '{}'::jsonb) AS properties, p.provider_customer_id,
    coalesce(p.subscription_items ->> e.meter, '') AS subscription_item"""

_UNCLAIMED = "e.report_state = 'pending' AND e.report_id IS NULL"

# A lane with a report in flight takes no new report. $1 customer_id (or e.customer_id),
# $2 provider
_LANE_FREE = """NOT EXISTS (
        SELECT 1 FROM reports r
        WHERE r.customer_id = {c} AND r.state = 'open'
            AND r.lane = concat_ws(chr(31), {p}::text, {c}::text, e.meter))"""

# Lock-free: the oldest unclaimed events attributed to a provider (one row each, its customer),
# oldest first; the claim then takes them customer by customer.
# $1 provider, $2 limit
DUE_EVENTS = f"""
SELECT e.customer_id FROM usage_events e
WHERE {_UNCLAIMED} AND e.provider = $1
ORDER BY e.event_time, e.event_id
LIMIT $2"""

# DUE_EVENTS for lane providers: events of lanes with a report in flight wait.
# $1 provider, $2 limit
DUE_LANE_EVENTS = f"""
SELECT e.customer_id FROM usage_events e
WHERE {_UNCLAIMED} AND e.provider = $1
    AND {_LANE_FREE.format(c="e.customer_id", p="$1")}
ORDER BY e.event_time, e.event_id
LIMIT $2"""

# One customer's pending events attributed to a provider, not yet in a report, oldest first,
# skipping rows other workers hold and lanes that have a report in flight; each with the
# customer's ids at that provider (kept after a switch) and the bounds of its period's totals row
# (NULL when the event is outside every known period).
# $1 customer_id, $2 provider, $3 limit
CLAIM_EVENTS = f"""
SELECT {_EVENT_FIELDS}, t.period_start, t.period_end
FROM usage_events e
JOIN customer_providers p ON p.customer_id = $1 AND p.provider = e.provider
LEFT JOIN usage_totals t ON t.customer_id = $1 AND t.meter = e.meter
    AND t.period_start <= e.event_time AND e.event_time < t.period_end
WHERE e.customer_id = $1 AND {_UNCLAIMED} AND e.provider = $2
    AND {_LANE_FREE.format(c="$1", p="$2")}
ORDER BY e.event_time, e.event_id
LIMIT $3
FOR UPDATE OF e SKIP LOCKED"""

# Batch providers (no lanes, no period bounds): one customer's pending events like CLAIM_EVENTS,
# put in reports of $5 events in claim order (the k-th report takes the id $4[k]), and the
# reports inserted (events as event_to_json writes them, oldest first) leased to $6 for $7
# seconds, in one statement; returns the reports made. Each CTE is read once, so Citus runs the
# statement on the customer's node in one go.
# $1 customer_id, $2 provider, $3 limit, $4 report_id[] (at least ceil($3 / $5)),
# $5 events per report, $6 owner, $7 lease (seconds)
CLAIM_BATCHES = f"""
WITH locked AS (
    SELECT e.event_id, e.event_time, p.provider_customer_id,
        coalesce(p.subscription_items ->> e.meter, '') AS subscription_item
    FROM usage_events e
    JOIN customer_providers p ON p.customer_id = $1 AND p.provider = e.provider
    WHERE e.customer_id = $1 AND {_UNCLAIMED} AND e.provider = $2
    ORDER BY e.event_time, e.event_id
    LIMIT $3
    FOR UPDATE OF e SKIP LOCKED
), assigned AS (
    UPDATE usage_events e SET report_id = k.report_id
    FROM (  -- numbered once locked: rows skipped for other workers leave no gaps
        SELECT l.*,
            ($4::uuid[])[(row_number() OVER (ORDER BY l.event_time, l.event_id) - 1) / $5 + 1]
                AS report_id
        FROM locked l
    ) k
    WHERE e.customer_id = $1 AND e.event_id = k.event_id
    RETURNING e.report_id, e.event_id, e.meter, e.quantity - e.covered AS quantity, e.event_time,
        e.properties, k.provider_customer_id, k.subscription_item
)
INSERT INTO reports (customer_id, report_id, provider, events, lease_until, leased_by,
                     first_sent_at)
SELECT $1, a.report_id, $2,
    jsonb_agg(jsonb_build_object(
        'event_id', a.event_id, 'customer_id', $1::text, 'meter', a.meter,
        'quantity', a.quantity, 'event_time', a.event_time, 'properties', a.properties,
        'provider_customer_id', a.provider_customer_id,
        'subscription_item', a.subscription_item) ORDER BY a.event_time, a.event_id),
    now() + make_interval(secs => $7), $6, now()
FROM assigned a
GROUP BY a.report_id
RETURNING customer_id, report_id, events::text AS events"""

# The max and the last value of the events billed to one provider in periods of one customer's
# meters, parked ones left out: a period's totals also count events billed elsewhere or unbilled.
# $1 customer_id, $2 provider, $3 meter[], $4 period_start[], $5 period_end[]
PERIOD_FIGURES = """
SELECT e.customer_id, g.m AS meter, g.s AS period_start, max(e.quantity) AS quantity_max,
    (array_agg(e.quantity ORDER BY e.event_time DESC, e.seq DESC))[1] AS last_quantity
FROM unnest($3::text[], $4::timestamptz[], $5::timestamptz[]) AS g(m, s, en)
JOIN usage_events e ON e.customer_id = $1 AND e.meter = g.m AND e.provider = $2
    AND e.event_time >= g.s AND e.event_time < g.en AND e.report_state <> 'failed'
GROUP BY 1, 2, 3"""

# One customer's report; a lane conflict (another worker just opened a report on it) inserts
# nothing. $1 customer_id, $2 report_id, $3 provider, $4 lane (NULL: no lane), $5 events (JSON
# text), $6 value, $7 owner, $8 lease (seconds), $9 stated_at, $10 now (the lease runs from
# then: the claim's earlier statements do not eat into it)
INSERT_REPORT = """
INSERT INTO reports (customer_id, report_id, provider, lane, events, value, lease_until,
                     leased_by, first_sent_at, stated_at)
VALUES ($1, $2::uuid, $3, $4, $5::text::jsonb, $6, $10::timestamptz + make_interval(secs => $8),
        $7, $10, $9)
ON CONFLICT (customer_id, lane) WHERE state = 'open' AND lane IS NOT NULL DO NOTHING
RETURNING customer_id, report_id"""

# $1 customer_id, $2 report_id, $3 event_id[]
ASSIGN_EVENTS = """
UPDATE usage_events e SET report_id = $2::uuid
WHERE e.customer_id = $1 AND e.event_id = ANY($3::uuid[])"""

# Events of a report that was not inserted (a lane conflict) go back to waiting.
# $1 customer_id, $2 report_id
UNASSIGN_EVENTS = """
UPDATE usage_events e SET report_id = NULL
WHERE e.customer_id = $1 AND e.report_id = $2::uuid AND e.report_state = 'pending'"""

_REPORT_FIELDS = """r.customer_id, r.report_id, r.provider, r.events, r.value, r.checkpoint,
    r.attempts, r.first_sent_at, r.stated_at"""

# Lock-free: open reports that are due and whose lease (if any) has run out (a retry, or a dead
# worker's), oldest due first. $1 provider, $2 limit
DUE_REPORTS = """
SELECT customer_id, report_id FROM reports
WHERE provider = $1 AND state = 'open' AND next_attempt_at <= now()
    AND (lease_until IS NULL OR lease_until < now())
ORDER BY next_attempt_at
LIMIT $2"""

# Leases one due report, if it is still due and free (another worker may have taken it since it
# was read: the row is read again once its lock is ours).
# $1 customer_id, $2 report_id, $3 owner, $4 lease (seconds), $5 now (first sent, if not yet)
CLAIM_REPORT = f"""
UPDATE reports r SET lease_until = now() + make_interval(secs => $4), leased_by = $3,
    first_sent_at = coalesce(r.first_sent_at, $5::timestamptz)
WHERE r.customer_id = $1 AND r.report_id = $2::uuid AND r.state = 'open'
    AND r.next_attempt_at <= now() AND (r.lease_until IS NULL OR r.lease_until < now())
RETURNING {_REPORT_FIELDS}"""

# Only while the lease is ours: a Lemon Squeezy baseline must be stored before the send. It
# renews the lease, so no other worker takes the report while the send it precedes may land.
# $1 customer_id, $2 report_id, $3 owner, $4 checkpoint (JSON text), $5 lease (seconds from now)
SAVE_CHECKPOINT = """
UPDATE reports SET checkpoint = $4::jsonb, lease_until = now() + make_interval(secs => $5)
WHERE customer_id = $1 AND report_id = $2::uuid AND state = 'open' AND leased_by = $3
    AND lease_until > now()
RETURNING report_id"""

# $1 customer_id, $2 report_id, $3 owner, $4 delay (seconds), $5 reason
RETRY_LATER = """
UPDATE reports SET attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => $4),
    lease_until = NULL, leased_by = NULL, last_error = $5
WHERE customer_id = $1 AND report_id = $2::uuid AND state = 'open' AND leased_by = $3"""

# Settles a report once, whoever holds the lease: a delivery is a fact.
# $1 customer_id, $2 report_id, $3 state (delivered | failed), $4 reason
CLOSE_REPORT = """
UPDATE reports SET state = $3, last_error = $4, settled_at = now(), lease_until = NULL
WHERE customer_id = $1 AND report_id = $2::uuid AND state = 'open'
RETURNING report_id"""

# Settles one customer's delivered reports in one statement: closes those still open, marks
# their events reported, and moves the events' counts and sums into the drain counters of their
# periods' totals rows (locked in key order; events outside every period left out). A row per
# adjusted totals row (its columns; NULL when none changed, one row then), each with
# `settled_for` ($1) and `closed` (the report ids closed; NULL: none). Take LOCK_CUSTOMER first.
# $1 customer_id, $2 report_id[]
SETTLE_DELIVERED = f"""
WITH closed AS (
    UPDATE reports r
    SET state = 'delivered', last_error = '', settled_at = now(), lease_until = NULL
    WHERE r.customer_id = $1 AND r.report_id = ANY($2::uuid[]) AND r.state = 'open'
    RETURNING r.report_id
), moved AS (
    UPDATE usage_events e SET report_state = 'reported', reported_at = now(), last_error = ''
    WHERE e.customer_id = $1 AND e.report_id IN (SELECT report_id FROM closed)
        AND e.report_state = 'pending'
    RETURNING e.meter, e.event_time, e.quantity - e.covered AS quantity
), folded AS (
    SELECT t.meter, t.period_start, count(*) AS n, sum(m.quantity) AS s
    FROM moved m
    JOIN usage_totals t ON t.customer_id = $1 AND t.meter = m.meter
        AND t.period_start <= m.event_time AND m.event_time < t.period_end
    GROUP BY 1, 2
), locked AS (
    SELECT t.meter, t.period_start, f.n, f.s
    FROM folded f
    JOIN usage_totals t ON t.customer_id = $1 AND t.meter = f.meter
        AND t.period_start = f.period_start
    ORDER BY 1, 2
    FOR UPDATE OF t
), adjusted AS (
    UPDATE usage_totals t SET
        reported_count = t.reported_count + a.n, reported_sum = t.reported_sum + a.s
    FROM locked a
    WHERE t.customer_id = $1 AND t.meter = a.meter AND t.period_start = a.period_start
    RETURNING {CHANGED_TOTALS}
)
SELECT $1::text AS settled_for, c.closed, a.*
FROM (SELECT array_agg(report_id) AS closed FROM closed) c
LEFT JOIN adjusted a ON true"""

# The customer's row, shared: the core's lock order (customers, then events, then totals).
# $1 customer_id
LOCK_CUSTOMER = "SELECT customer_id FROM customers WHERE customer_id = $1 FOR SHARE"

_MOVED = "RETURNING e.customer_id, e.meter, e.event_time, e.quantity - e.covered AS quantity"

# $1 customer_id, $2 report_id, $3 event_id[], $4 reason[]
PARK_EVENTS = f"""
UPDATE usage_events e SET report_state = 'failed', last_error = u.reason
FROM unnest($3::uuid[], $4::text[]) AS u(event_id, reason)
WHERE e.customer_id = $1 AND e.event_id = u.event_id AND e.report_id = $2::uuid
    AND e.report_state = 'pending'
{_MOVED}"""

# $1 customer_id, $2 report_id, $3 reason
PARK_REPORT_EVENTS = f"""
UPDATE usage_events e SET report_state = 'failed', last_error = $3
WHERE e.customer_id = $1 AND e.report_id = $2::uuid AND e.report_state = 'pending'
{_MOVED}"""

# $1 customer_id, $2 report_id[]
MARK_REPORTED = f"""
UPDATE usage_events e SET report_state = 'reported', reported_at = now(), last_error = ''
WHERE e.customer_id = $1 AND e.report_id = ANY($2::uuid[]) AND e.report_state = 'pending'
{_MOVED}"""

_PARKED = """e.report_state = 'failed' AND ($1::text = '' OR e.provider = $1)
    AND (cardinality($2::uuid[]) = 0 OR e.event_id = ANY($2::uuid[]))"""

# Lock-free: the customers with parked events, in order.
# $1 provider ('' for all), $2 event_id[] (empty for all)
PARKED_CUSTOMERS = f"""
SELECT DISTINCT e.customer_id FROM usage_events e WHERE {_PARKED} ORDER BY 1"""

# One customer's parked events go back to pending, out of their report: the next claim builds a
# new one. $1 provider ('' for all), $2 event_id[] (empty for all), $3 customer_id
REQUEUE = f"""
UPDATE usage_events e SET report_id = NULL, last_error = '',
    report_state = CASE WHEN e.provider = '' THEN 'unbilled' ELSE 'pending' END
WHERE e.customer_id = $3 AND {_PARKED}
{_MOVED}, e.report_state"""

# One customer's events in its periods' totals rows. $1 customer_id, $2 meter[], $3 event_time[],
# $4 quantity[]
_EVENTS_IN_TOTALS = """
FROM unnest($2::text[], $3::timestamptz[], $4::bigint[]) AS ev(m, w, q)
JOIN usage_totals t ON t.customer_id = $1 AND t.meter = ev.m
    AND t.period_start <= ev.w AND ev.w < t.period_end"""

# $1..$4 as _EVENTS_IN_TOTALS
LOCK_TOTALS = f"""
SELECT t.customer_id {_EVENTS_IN_TOTALS}
ORDER BY t.meter, t.period_start
FOR UPDATE OF t"""

# Moves one customer's events between the drain counters of their periods' totals rows.
# $1..$4 as _EVENTS_IN_TOTALS, $5 reported delta per event (-1, 0, 1), $6 failed delta,
# $7 unbilled delta
ADJUST_TOTALS = f"""
UPDATE usage_totals t SET
    reported_count = t.reported_count + $5 * a.n, reported_sum = t.reported_sum + $5 * a.s,
    failed_count = t.failed_count + $6 * a.n, failed_sum = t.failed_sum + $6 * a.s,
    unbilled_count = t.unbilled_count + $7 * a.n, unbilled_sum = t.unbilled_sum + $7 * a.s
FROM (
    SELECT t.meter, t.period_start, count(*) AS n, sum(ev.q) AS s
    {_EVENTS_IN_TOTALS}
    GROUP BY 1, 2
) a
WHERE t.customer_id = $1 AND t.meter = a.meter AND t.period_start = a.period_start
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
# accepted (pending or parked). $1 from provider ('' any)
_MOVABLE = """e.provider IS NOT NULL AND e.provider <> c.provider AND c.plan_id <> ''
    AND e.report_state IN ('pending', 'failed') AND ($1::text = '' OR e.provider = $1)"""

# Lock-free: customers with movable events, in order.
# $1 as _MOVABLE, $2 customer_id[] (empty: all)
MOVABLE_CUSTOMERS = f"""
SELECT DISTINCT e.customer_id
FROM usage_events e JOIN customers c ON c.customer_id = e.customer_id
WHERE {_MOVABLE} AND (cardinality($2::text[]) = 0 OR e.customer_id = ANY($2::text[]))
ORDER BY 1"""

# One customer's movable events (the rest of the statement names it on every table).
# $1 as _MOVABLE, $2 customer_id
_CUSTOMER_MOVABLE = f"""usage_events e JOIN customers c ON c.customer_id = $2
WHERE e.customer_id = $2 AND {_MOVABLE}"""

# One customer's open reports holding movable events that are due and no worker holds (a worker
# may be sending, or a send's outcome may still land). $1, $2 as _CUSTOMER_MOVABLE
LOCK_MOVABLE_REPORTS = f"""
SELECT r.report_id FROM reports r
WHERE r.customer_id = $2 AND r.state = 'open'
    AND (r.lease_until IS NULL OR r.lease_until < now()) AND r.next_attempt_at <= now()
    AND r.report_id IN (
        SELECT e.report_id FROM {_CUSTOMER_MOVABLE}
            AND e.report_state = 'pending' AND e.report_id IS NOT NULL)
ORDER BY r.report_id
FOR UPDATE OF r SKIP LOCKED"""

# Re-attributes one customer's movable events to its current provider ('' none: unbilled), out
# of their reports; those in an open report not given in $3 stay.
# $1, $2 as _CUSTOMER_MOVABLE, $3 abandoned report_id[]
MOVE_EVENTS = f"""
WITH moving AS (
    SELECT e.event_id, e.report_state AS was, e.provider AS was_provider,
        e.report_id AS was_report, c.provider AS target
    FROM {_CUSTOMER_MOVABLE}
        AND (e.report_state = 'failed' OR e.report_id IS NULL OR e.report_id = ANY($3::uuid[]))
    FOR UPDATE OF e
)
UPDATE usage_events e SET provider = m.target, report_id = NULL, last_error = '',
    report_state = CASE WHEN m.target = '' THEN 'unbilled' ELSE 'pending' END
FROM moving m
WHERE e.customer_id = $2 AND e.event_id = m.event_id
RETURNING e.customer_id, e.meter, e.event_time, e.quantity - e.covered AS quantity, m.was,
    e.report_state,
    m.was_provider, m.was_report, m.target"""

# One customer's movable events left in open reports. $1, $2 as _CUSTOMER_MOVABLE
COUNT_IN_OPEN_REPORTS = f"""
SELECT count(*) FROM {_CUSTOMER_MOVABLE}
    AND e.report_state = 'pending' AND e.report_id IS NOT NULL"""

# The rest of an abandoned report's events go back to the queue: per-event providers dedupe them
# by event id when they are sent again. $1 customer_id, $2 report_id[]
RELEASE_EVENTS = """
UPDATE usage_events SET report_id = NULL
WHERE customer_id = $1 AND report_id = ANY($2::uuid[]) AND report_state = 'pending'"""

# $1 customer_id, $2 report_id[], $3 reason
ABANDON_REPORTS = """
UPDATE reports SET state = 'failed', last_error = $3, settled_at = now(), lease_until = NULL
WHERE customer_id = $1 AND report_id = ANY($2::uuid[]) AND state = 'open'"""
