"""Every SQL statement of the core service, by name. Code refers to these; it never builds SQL."""

from __future__ import annotations

MIGRATION_LOCK = "SELECT pg_advisory_lock(7301958420017)"
MIGRATION_UNLOCK = "SELECT pg_advisory_unlock(7301958420017)"
MIGRATION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
MIGRATIONS_APPLIED = "SELECT version FROM schema_migrations"
# $1 version (the migration file's stem)
MIGRATION_DONE = "INSERT INTO schema_migrations (version) VALUES ($1)"

_CUSTOMER_COLUMNS = """customer_id, plan_id, subscription_status, period_start, period_end,
    provider, provider_customer_id, subscription_items, billing_interval, billing_interval_count,
    billing_anchor"""

# A customer row with an empty plan_id is a placeholder: a customer known only by its usage.

# $1 customer_id
GET_CUSTOMER = f"SELECT {_CUSTOMER_COLUMNS} FROM customers WHERE customer_id = $1"

# $1 customer_id. Taken by UpsertCustomer: waits for recorders still counting on the old periods.
GET_CUSTOMER_FOR_UPDATE = f"""
SELECT {_CUSTOMER_COLUMNS}, pruned_before FROM customers WHERE customer_id = $1 FOR UPDATE"""

# A customer, locked shared: recorders count on its periods, which only UpsertCustomer changes.
# $1 customer_id
LOCK_CUSTOMER = """
SELECT customer_id, plan_id, period_start, period_end, billing_interval, billing_interval_count,
    billing_anchor, provider
FROM customers
WHERE customer_id = $1 FOR SHARE"""

# A placeholder for a customer not seen before, so that recorders have a row to lock (and the
# first UpsertCustomer a row to wait on). $1 customer_id
INSERT_PLACEHOLDER = """
INSERT INTO customers (customer_id, plan_id, subscription_status) VALUES ($1, '', '')
ON CONFLICT (customer_id) DO NOTHING"""

_PERIOD_COLUMNS = """customer_id, period_start, period_end, billing_interval,
    billing_interval_count, billing_anchor"""

# A customer's confirmed periods, oldest first. A read: callers hold the customer's row.
# $1 customer_id
STORED_PERIODS = f"""
SELECT {_PERIOD_COLUMNS} FROM billing_periods
WHERE customer_id = $1 ORDER BY period_start"""

# A webhook's period replaces the confirmed periods from its start on; one that holds its start
# is cut there. $1 customer_id, $2 the new period's start
DROP_PERIODS_FROM = "DELETE FROM billing_periods WHERE customer_id = $1 AND period_start >= $2"
CUT_PERIOD_AT = """
UPDATE billing_periods SET period_end = $2
WHERE customer_id = $1 AND period_start < $2 AND period_end > $2"""

# $1 customer_id, $2 period_start, $3 period_end, $4 billing_interval, $5 interval count,
# $6 anchor, $7 confirmed at
INSERT_PERIOD = f"""
INSERT INTO billing_periods ({_PERIOD_COLUMNS}, confirmed_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)"""

# $1 customer_id, $2 plan_id, $3 subscription_status, $4 period_start, $5 period_end,
# $6 provider, $7 provider_customer_id, $8 subscription_items (jsonb), $9 billing_interval,
# $10 interval count, $11 anchor, $12 updated at. The row exists (placeholder or customer).
UPDATE_CUSTOMER = f"""
UPDATE customers SET plan_id = $2, subscription_status = $3, period_start = $4,
    period_end = $5, provider = $6, provider_customer_id = $7, subscription_items = $8,
    billing_interval = $9, billing_interval_count = $10, billing_anchor = $11, updated_at = $12
WHERE customer_id = $1
RETURNING {_CUSTOMER_COLUMNS}"""

# The events of a customer known only by its usage are attributed to the provider of its first
# UpsertCustomer: '' (none) makes them unbilled, as does a meter its plan says is paid by
# credits alone (prepaid without overage). $1 customer_id, $2 provider, $3 meter[] (unbilled)
ATTRIBUTE_EVENTS = """
UPDATE usage_events SET provider = $2,
    report_state = CASE
        WHEN $2 = '' OR meter = ANY($3::text[]) THEN 'unbilled' ELSE report_state END
WHERE customer_id = $1 AND provider IS NULL"""

# A customer's ids at a provider, kept after it moves on: events attributed to that provider
# are still sent with them. $1 customer_id, $2 provider, $3 provider_customer_id,
# $4 subscription_items (jsonb), $5 updated at
SAVE_CUSTOMER_PROVIDER = """
INSERT INTO customer_providers AS p (
    customer_id, provider, provider_customer_id, subscription_items, updated_at)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (customer_id, provider) DO UPDATE SET
    provider_customer_id = excluded.provider_customer_id,
    subscription_items = excluded.subscription_items, updated_at = excluded.updated_at
WHERE (p.provider_customer_id, p.subscription_items)
    IS DISTINCT FROM (excluded.provider_customer_id, excluded.subscription_items)"""

# The bounds of a customer's totals rows. $1 customer_id
TOTALS_BOUNDS = """
SELECT DISTINCT period_start, period_end FROM usage_totals WHERE customer_id = $1"""

# The time span of a customer's events. $1 customer_id
EVENTS_SPAN = """
SELECT min(event_time) AS first, max(event_time) AS last FROM usage_events
WHERE customer_id = $1"""

# $1 customer_id, $2 period_start[]
DROP_TOTALS = """
DELETE FROM usage_totals WHERE customer_id = $1 AND period_start = ANY($2::timestamptz[])"""

# A customer's events aggregated per meter and period, for the periods given.
# $1 customer_id, $2 period_start[], $3 period_end[]
_EVENT_TOTALS = """
SELECT e.meter, p.s AS period_start, p.e AS period_end, count(*) AS event_count,
    sum(e.quantity) AS quantity_sum, max(e.quantity) AS quantity_max,
    (array_agg(e.quantity ORDER BY e.event_time DESC, e.seq DESC))[1] AS last_quantity,
    max(e.event_time) AS last_event_time,
    (array_agg(e.seq ORDER BY e.event_time DESC, e.seq DESC))[1] AS last_seq,
    count(*) FILTER (WHERE e.report_state = 'reported') AS reported_count,
    coalesce(sum(e.quantity - e.covered) FILTER (WHERE e.report_state = 'reported'), 0)
        AS reported_sum,
    count(*) FILTER (WHERE e.report_state = 'failed') AS failed_count,
    coalesce(sum(e.quantity - e.covered) FILTER (WHERE e.report_state = 'failed'), 0)
        AS failed_sum,
    count(*) FILTER (WHERE e.report_state = 'unbilled') AS unbilled_count,
    coalesce(sum(e.quantity - e.covered) FILTER (WHERE e.report_state = 'unbilled'), 0)
        AS unbilled_sum,
    count(*) FILTER (WHERE e.report_state = 'covered') AS covered_count,
    coalesce(sum(e.covered), 0) AS covered_sum
FROM unnest($2::timestamptz[], $3::timestamptz[]) AS p(s, e)
JOIN usage_events e ON e.customer_id = $1 AND e.event_time >= p.s AND e.event_time < p.e
GROUP BY e.meter, p.s, p.e"""

EVENT_TOTALS = _EVENT_TOTALS

# Rebuilds a customer's totals for periods (whose rows were dropped) from their events.
REBUILD_TOTALS = f"""
INSERT INTO usage_totals (
    customer_id, meter, period_start, period_end, event_count, quantity_sum, quantity_max,
    last_quantity, last_event_time, last_seq, reported_count, reported_sum, failed_count,
    failed_sum, unbilled_count, unbilled_sum, covered_count, covered_sum)
SELECT $1, meter, period_start, period_end, event_count, quantity_sum, quantity_max,
    last_quantity, last_event_time, last_seq, reported_count, reported_sum, failed_count,
    failed_sum, unbilled_count, unbilled_sum, covered_count, covered_sum
FROM ({_EVENT_TOTALS}) agg"""

# The rows of INSERT_EVENTS' arrays. Statements for Citus name their unnest where they use it:
# a CTE of it would be a result Citus copies to every worker.
_EVENTS_IN = """unnest($1::uuid[], $3::text[], $4::text[], $5::bigint[], $6::timestamptz[],
    $7::text[], $8::bytea[], $9::bigint[]) AS u(e, k, m, q, t, p, h, o)"""

# One customer's events. $1 event_id[], $2 customer_id, $3 idempotency_key[], $4 meter[],
# $5 quantity[], $6 event_time[], $7 properties[] (JSON text), $8 payload_hash[], $9 acceptance
# order[] (the event's place in the call, < 2^20): seq = one sequence value per statement, then
# that order; $10 provider (the customer's; '' none: the event is unbilled; NULL: not decided).
# Each event first claims its key in usage_keys (rows come sorted by key); an event whose key is
# taken, now or long ago (its event may be pruned), is not stored and returns no row.
INSERT_EVENTS = f"""
WITH s AS (
    SELECT nextval('usage_events_seq') * 1048576 AS base
), claimed AS (
    INSERT INTO usage_keys (customer_id, idempotency_key, payload_hash, event_id)
    SELECT $2::text, k, h, e FROM {_EVENTS_IN}
    ON CONFLICT (customer_id, idempotency_key) DO NOTHING
    RETURNING event_id
)
INSERT INTO usage_events (
    event_id, customer_id, idempotency_key, meter, quantity, event_time, properties,
    payload_hash, seq, provider, report_state)
SELECT e, $2::text, k, m, q, t, p::jsonb, h, s.base + o,
    $10::text, CASE WHEN $10::text = '' THEN 'unbilled' ELSE 'pending' END
FROM {_EVENTS_IN} JOIN claimed ON claimed.event_id = u.e CROSS JOIN s
RETURNING seq"""

# The event each of a customer's keys names, pruned or not. $1 customer_id,
# $2 idempotency_key[]
EXISTING_EVENTS = """
SELECT customer_id, idempotency_key, event_id, payload_hash FROM usage_keys
WHERE customer_id = $1 AND idempotency_key = ANY($2::text[])"""

# $1 customer_id[], $2 meter[]
LIFETIME_SUMS = """
SELECT l.customer_id, l.meter, l.quantity_sum FROM usage_lifetime l
JOIN unnest($1::text[], $2::text[]) AS u(c, m) ON l.customer_id = u.c AND l.meter = u.m"""

# A totals row as the change log keeps it (storage/changes.py FIGURES), after a change.
CHANGED_TOTALS = """t.customer_id, t.meter, t.period_start, t.period_end, t.event_count,
    t.quantity_sum, t.quantity_max, t.last_quantity, t.reported_count, t.reported_sum,
    t.failed_count, t.failed_sum, t.unbilled_count, t.unbilled_sum, t.covered_count,
    t.covered_sum"""

# Adds one customer's events, folded per meter and period, to the running totals of their
# periods (rows without a period, of placeholders, are left out: ADD_LIFETIME counts them).
# Rows come sorted by key so concurrent writers lock in one order; totals rows are taken before
# lifetime rows, as consumes take them.
# $1 customer_id, $2 meter[], $3 period_start[] (NULL: no period), $4 period_end[],
# $5 event_count[], $6 quantity_sum[], $7 quantity_max[], $8 last_quantity[],
# $9 last_event_time[], $10 last_seq[], $11 unbilled (the customer has no provider)
ADD_TOTALS = f"""
INSERT INTO usage_totals AS t (
    customer_id, meter, period_start, period_end, event_count, quantity_sum, quantity_max,
    last_quantity, last_event_time, last_seq, unbilled_count, unbilled_sum)
SELECT $1::text, m, ps, pe, n, s, mx, lq, lt, ls, CASE WHEN $11::boolean THEN n ELSE 0 END,
    CASE WHEN $11::boolean THEN s ELSE 0 END
FROM unnest($2::text[], $3::timestamptz[], $4::timestamptz[], $5::bigint[], $6::bigint[],
            $7::bigint[], $8::bigint[], $9::timestamptz[], $10::bigint[])
    AS u(m, ps, pe, n, s, mx, lq, lt, ls)
WHERE ps IS NOT NULL
ON CONFLICT (customer_id, meter, period_start) DO UPDATE SET
    event_count = t.event_count + excluded.event_count,
    quantity_sum = t.quantity_sum + excluded.quantity_sum,
    unbilled_count = t.unbilled_count + excluded.unbilled_count,
    unbilled_sum = t.unbilled_sum + excluded.unbilled_sum,
    quantity_max = greatest(t.quantity_max, excluded.quantity_max),
    last_quantity = CASE
        WHEN t.last_event_time IS NULL
            OR (excluded.last_event_time, excluded.last_seq) > (t.last_event_time, t.last_seq)
        THEN excluded.last_quantity ELSE t.last_quantity END,
    last_seq = CASE
        WHEN t.last_event_time IS NULL
            OR (excluded.last_event_time, excluded.last_seq) > (t.last_event_time, t.last_seq)
        THEN excluded.last_seq ELSE t.last_seq END,
    last_event_time = greatest(t.last_event_time, excluded.last_event_time)
RETURNING {CHANGED_TOTALS}"""

# Adds one customer's events, folded as for ADD_TOTALS, to its lifetime totals per meter (an
# overflow there refuses them). $1 customer_id, $2 meter[], $3 event_count[], $4 quantity_sum[]
ADD_LIFETIME = """
INSERT INTO usage_lifetime AS l (customer_id, meter, event_count, quantity_sum)
SELECT $1::text, m, sum(n), sum(s) FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS u(m, n, s)
GROUP BY m ORDER BY m
ON CONFLICT (customer_id, meter) DO UPDATE SET
    event_count = l.event_count + excluded.event_count,
    quantity_sum = l.quantity_sum + excluded.quantity_sum"""

_TOTALS_COLUMNS = """meter, event_count, quantity_sum, quantity_max, last_quantity,
    last_event_time, last_seq, reported_count, reported_sum, failed_count, failed_sum,
    unbilled_count, unbilled_sum, covered_count, covered_sum"""

# Creates (if need be) and locks one totals row, returning it: the consume path's row lock.
# $1 customer_id, $2 meter, $3 period_start, $4 period_end
LOCK_TOTALS = f"""
INSERT INTO usage_totals AS t (customer_id, meter, period_start, period_end)
VALUES ($1, $2, $3, $4)
ON CONFLICT (customer_id, meter, period_start) DO UPDATE SET period_end = t.period_end
RETURNING period_start, period_end, {_TOTALS_COLUMNS}"""

# The consume path's first statement: the customer (shared lock); the totals row of the period
# containing now, locked, when one exists and the customer's plan meters the feature and its
# status allows usage; and the events the keys name (usage_keys: even events since pruned), if
# any, with the decisions that consumed them (read before the totals lock was granted): one row
# per key found, or one row with no key when none is.
# $1 customer_id, $2 meter, $3 plan ids that meter $2, $4 allowed statuses,
# $5 idempotency_key[], $6 now
CONSUME_LOCK = f"""
WITH c AS (
    SELECT {_CUSTOMER_COLUMNS} FROM customers WHERE customer_id = $1 FOR SHARE
), locked AS (
    SELECT t.period_start AS t_start, t.period_end AS t_end, {_TOTALS_COLUMNS}
    FROM usage_totals t
    WHERE t.customer_id = $1 AND t.meter = $2 AND t.period_start <= $6 AND t.period_end > $6
        AND EXISTS (
            SELECT 1 FROM c WHERE plan_id = ANY($3::text[])
                AND subscription_status = ANY($4::text[]))
    ORDER BY t.period_start DESC LIMIT 1
    FOR UPDATE
)
SELECT c.*, locked.t_start IS NOT NULL AS locked, locked.*,
    k.idempotency_key AS seen_key, k.event_id AS seen_event_id,
    k.payload_hash AS seen_payload_hash, d.decision_id AS seen_decision_id
FROM c
LEFT JOIN locked ON true
LEFT JOIN usage_keys k ON k.customer_id = $1 AND k.idempotency_key = ANY($5::text[])
LEFT JOIN decisions d ON d.customer_id = $1 AND d.event_id = k.event_id"""

# The events keys name (usage_keys: even events since pruned; with the decisions that consumed
# them) and the customer's change version, read once the consume holds its locks: one row per
# key found, or one row with no key.
# $1 customer_id, $2 idempotency_key[]
KEYS_AND_VERSION = """
SELECT k.idempotency_key AS seen_key, k.event_id AS seen_event_id,
    k.payload_hash AS seen_payload_hash, d.decision_id AS seen_decision_id,
    coalesce(h.version, 0) AS totals_version
FROM (SELECT 1) one
LEFT JOIN usage_change_heads h ON h.customer_id = $1
LEFT JOIN usage_keys k ON k.customer_id = $1 AND k.idempotency_key = ANY($2::text[])
LEFT JOIN decisions d ON d.customer_id = $1 AND d.event_id = k.event_id"""

# Adds a group of consumes of one customer's meter, whose events INSERT_EVENTS stored, to the
# meter's lifetime total and to its period's totals row (created and locked by CONSUME_LOCK or
# LOCK_TOTALS), folded by the caller.
# $1 customer_id, $2 meter, $3 period_start, $4 count, $5 sum, $6 max, $7 the latest event's
# time, $8 its seq, $9 its quantity, $10 provider ('' none: unbilled)
CONSUME_TOTALS = f"""
WITH life AS (
    INSERT INTO usage_lifetime AS l (customer_id, meter, event_count, quantity_sum)
    VALUES ($1, $2, $4::bigint, $5::bigint)
    ON CONFLICT (customer_id, meter) DO UPDATE SET
        event_count = l.event_count + excluded.event_count,
        quantity_sum = l.quantity_sum + excluded.quantity_sum
)
UPDATE usage_totals t SET
    event_count = t.event_count + $4::bigint,
    quantity_sum = t.quantity_sum + $5::bigint,
    unbilled_count = t.unbilled_count + CASE WHEN $10::text = '' THEN $4::bigint ELSE 0 END,
    unbilled_sum = t.unbilled_sum + CASE WHEN $10::text = '' THEN $5::bigint ELSE 0 END,
    quantity_max = greatest(t.quantity_max, $6::bigint),
    last_quantity = CASE
        WHEN t.last_event_time IS NULL
            OR ($7::timestamptz, $8::bigint) > (t.last_event_time, t.last_seq)
        THEN $9::bigint ELSE t.last_quantity END,
    last_seq = CASE
        WHEN t.last_event_time IS NULL
            OR ($7::timestamptz, $8::bigint) > (t.last_event_time, t.last_seq)
        THEN $8::bigint ELSE t.last_seq END,
    last_event_time = greatest(t.last_event_time, $7::timestamptz)
WHERE t.customer_id = $1 AND t.meter = $2 AND t.period_start = $3
RETURNING {CHANGED_TOTALS}"""

# $1 customer_id, $2 period_start
PERIOD_TOTALS = f"""
SELECT {_TOTALS_COLUMNS} FROM usage_totals WHERE customer_id = $1 AND period_start = $2"""

# A customer's totals for one meter and period (no row: NULL figures) and its change version,
# read together. $1 customer_id, $2 meter, $3 period_start (NULL: none)
METER_TOTALS = f"""
SELECT {_TOTALS_COLUMNS}, coalesce(h.version, 0) AS totals_version
FROM (SELECT 1) one
LEFT JOIN usage_totals t ON t.customer_id = $1 AND t.meter = $2 AND t.period_start = $3
LEFT JOIN usage_change_heads h ON h.customer_id = $1"""

# Every totals row of a customer. $1 customer_id
CUSTOMER_TOTALS = f"""
SELECT period_start, period_end, {_TOTALS_COLUMNS} FROM usage_totals WHERE customer_id = $1"""

# $1 customer_id
# (What a dropped month took and prune has not folded in yet counts as pruned.)
CUSTOMER_LIFETIME = """
SELECT l.meter, l.event_count - l.pruned_count - coalesce(p.events, 0) AS event_count,
    l.quantity_sum - l.pruned_sum - coalesce(p.quantity, 0) AS quantity_sum
FROM usage_lifetime l
LEFT JOIN (
    SELECT meter, sum(events)::bigint AS events, sum(quantity)::bigint AS quantity
    FROM usage_pruned WHERE customer_id = $1 GROUP BY meter
) p ON p.meter = l.meter
WHERE l.customer_id = $1"""

# Folds what dropped months took from a customer into its lifetime totals' pruned counts.
# $1 customer_id
FOLD_PRUNED = """
WITH gone AS (
    DELETE FROM usage_pruned WHERE customer_id = $1 RETURNING meter, events, quantity
), folded AS (
    SELECT meter, sum(events)::bigint AS events, sum(quantity)::bigint AS quantity
    FROM gone GROUP BY meter
)
UPDATE usage_lifetime l SET pruned_count = l.pruned_count + f.events,
    pruned_sum = l.pruned_sum + f.quantity
FROM folded f
WHERE l.customer_id = $1 AND l.meter = f.meter"""

# Sets a customer's lifetime totals to what its events and prune say. $1 customer_id
RECOUNT_LIFETIME = """
INSERT INTO usage_lifetime AS l (customer_id, meter, event_count, quantity_sum)
SELECT $1, meter, count(*), least(sum(quantity), 9223372036854775807)::bigint
FROM usage_events WHERE customer_id = $1 GROUP BY meter
ON CONFLICT (customer_id, meter) DO UPDATE SET
    event_count = excluded.event_count + l.pruned_count,
    quantity_sum = least(
        excluded.quantity_sum::numeric + l.pruned_sum, 9223372036854775807)::bigint"""

# $1 customer_id, $2 drop rows ending after this (NULL: all)
DROP_TOTALS_AFTER = """
DELETE FROM usage_totals WHERE customer_id = $1 AND ($2::timestamptz IS NULL OR period_end > $2)"""

# $1 customer_id
PRUNED_BEFORE = "SELECT pruned_before FROM customers WHERE customer_id = $1"

# Events of a customer whose provider is not decided: only a placeholder may have them.
# $1 customer_id
UNATTRIBUTED_EVENTS = """
SELECT count(*) FROM usage_events WHERE customer_id = $1 AND provider IS NULL"""

# $1 customer_id
EVENT_LIFETIME = """
SELECT meter, count(*) AS event_count, sum(quantity) AS quantity_sum FROM usage_events
WHERE customer_id = $1 GROUP BY meter"""

# Every customer id that has a row or events, in order. A read.
ALL_CUSTOMER_IDS = """
SELECT customer_id FROM customers
UNION
SELECT DISTINCT customer_id FROM usage_events
ORDER BY 1"""

# Checks without consume of one customer, many at once: each meter with the customer, the
# latest totals row starting at or before now (the caller keeps it only when it is the period
# containing now) and the customer's change version, all from one snapshot. An unknown customer
# has no row.
# $1 customer_id, $2 meter[], $3 now; i is the meter's 1-based position
CHECK_READS = f"""
SELECT u.i, c.*, t.period_start AS t_start, t.event_count,
    t.quantity_sum, t.quantity_max, t.last_quantity, t.last_event_time, t.last_seq,
    t.reported_count, t.reported_sum, t.failed_count, t.failed_sum, t.unbilled_count,
    t.unbilled_sum, t.covered_count, t.covered_sum, coalesce(h.version, 0) AS totals_version
FROM unnest($2::text[]) WITH ORDINALITY AS u(meter, i)
JOIN (SELECT {_CUSTOMER_COLUMNS} FROM customers WHERE customer_id = $1) c ON true
LEFT JOIN LATERAL (
    SELECT * FROM usage_totals
    WHERE customer_id = $1 AND meter = u.meter AND period_start <= $3
    ORDER BY period_start DESC LIMIT 1) t ON true
LEFT JOIN usage_change_heads h ON h.customer_id = $1"""
