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
    provider, provider_customer_id, subscription_items"""

# $1 customer_id
GET_CUSTOMER = f"SELECT {_CUSTOMER_COLUMNS} FROM customers WHERE customer_id = $1"

# $1 customer_id. Shares the row with concurrent recorders; waits for an UpsertCustomer.
GET_CUSTOMER_FOR_SHARE = (
    f"SELECT {_CUSTOMER_COLUMNS} FROM customers WHERE customer_id = $1 FOR SHARE"
)

# $1 customer_id. Taken by UpsertCustomer: waits for recorders still counting on the old period.
GET_CUSTOMER_FOR_UPDATE = (
    f"SELECT {_CUSTOMER_COLUMNS} FROM customers WHERE customer_id = $1 FOR UPDATE"
)

# The current periods of customers, locked shared (recorders count on them).
# $1 customer_id[] (sorted, so concurrent batches lock in one order)
LOCK_CUSTOMERS = """
SELECT customer_id, period_start, period_end FROM customers
WHERE customer_id = ANY($1::text[]) ORDER BY customer_id FOR SHARE"""

# $1 customer_id, $2 plan_id, $3 subscription_status, $4 period_start, $5 period_end,
# $6 provider, $7 provider_customer_id, $8 subscription_items (jsonb)
UPSERT_CUSTOMER = f"""
INSERT INTO customers ({_CUSTOMER_COLUMNS})
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (customer_id) DO UPDATE SET
    plan_id = excluded.plan_id,
    subscription_status = excluded.subscription_status,
    period_start = excluded.period_start,
    period_end = excluded.period_end,
    provider = excluded.provider,
    provider_customer_id = excluded.provider_customer_id,
    subscription_items = excluded.subscription_items,
    updated_at = now()
RETURNING {_CUSTOMER_COLUMNS}"""

# $1 customer_id, $2 period_start
CLEAR_PERIOD_TOTALS = "DELETE FROM usage_totals WHERE customer_id = $1 AND period_start = $2"

# Rebuilds a customer's totals for a period from its events (when the period changes).
# $1 customer_id, $2 period_start, $3 period_end
RECOMPUTE_PERIOD_TOTALS = """
INSERT INTO usage_totals (
    customer_id, meter, period_start, period_end, event_count, quantity_sum, quantity_max,
    last_quantity, last_event_time, reported_count, reported_sum, failed_count, failed_sum)
SELECT customer_id, meter, $2, $3, count(*), sum(quantity), max(quantity),
    (array_agg(quantity ORDER BY event_time DESC, recorded_at DESC))[1], max(event_time),
    count(*) FILTER (WHERE report_state = 'reported'),
    coalesce(sum(quantity) FILTER (WHERE report_state = 'reported'), 0),
    count(*) FILTER (WHERE report_state = 'failed'),
    coalesce(sum(quantity) FILTER (WHERE report_state = 'failed'), 0)
FROM usage_events
WHERE customer_id = $1 AND event_time >= $2 AND event_time < $3
GROUP BY customer_id, meter"""

# $1 event_id[], $2 customer_id[], $3 idempotency_key[], $4 meter[], $5 quantity[],
# $6 event_time[], $7 properties[] (JSON text), $8 payload_hash[]
INSERT_EVENTS = """
INSERT INTO usage_events (
    event_id, customer_id, idempotency_key, meter, quantity, event_time, properties, payload_hash)
SELECT e, c, k, m, q, t, p::jsonb, h
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::timestamptz[],
            $7::text[], $8::bytea[]) AS u(e, c, k, m, q, t, p, h)
ON CONFLICT (customer_id, idempotency_key) DO NOTHING
RETURNING event_id"""

# $1 customer_id[], $2 idempotency_key[]
EXISTING_EVENTS = """
SELECT customer_id, idempotency_key, event_id, payload_hash FROM usage_events
WHERE (customer_id, idempotency_key) IN (
    SELECT * FROM unnest($1::text[], $2::text[]))"""

# Adds events to running totals. Rows come sorted by key so concurrent writers lock in one order.
# $1 customer_id[], $2 meter[], $3 period_start[], $4 period_end[], $5 event_count[],
# $6 quantity_sum[], $7 quantity_max[], $8 last_quantity[], $9 last_event_time[]
ADD_TOTALS = """
INSERT INTO usage_totals AS t (
    customer_id, meter, period_start, period_end, event_count, quantity_sum, quantity_max,
    last_quantity, last_event_time)
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::bigint[],
                     $6::bigint[], $7::bigint[], $8::bigint[], $9::timestamptz[])
ON CONFLICT (customer_id, meter, period_start) DO UPDATE SET
    period_end = excluded.period_end,
    event_count = t.event_count + excluded.event_count,
    quantity_sum = t.quantity_sum + excluded.quantity_sum,
    quantity_max = greatest(t.quantity_max, excluded.quantity_max),
    last_quantity = CASE
        WHEN t.last_event_time IS NULL OR excluded.last_event_time >= t.last_event_time
        THEN excluded.last_quantity ELSE t.last_quantity END,
    last_event_time = greatest(t.last_event_time, excluded.last_event_time)"""

_TOTALS_COLUMNS = """meter, event_count, quantity_sum, quantity_max, last_quantity,
    last_event_time, reported_count, reported_sum, failed_count, failed_sum"""

# Creates (if need be) and locks one totals row, returning it: the consume path's row lock.
# $1 customer_id, $2 meter, $3 period_start, $4 period_end
LOCK_TOTALS = f"""
INSERT INTO usage_totals AS t (customer_id, meter, period_start, period_end)
VALUES ($1, $2, $3, $4)
ON CONFLICT (customer_id, meter, period_start) DO UPDATE SET period_end = excluded.period_end
RETURNING {_TOTALS_COLUMNS}"""

# The consume path's first statement: the customer (shared lock), its current period's totals row
# created if need be and locked, when its plan meters the feature and its status allows usage,
# and the event already stored under the key, if any (read before the totals lock was granted).
# $1 customer_id, $2 meter, $3 plan ids that meter $2, $4 allowed statuses, $5 idempotency_key
CONSUME_LOCK = f"""
WITH c AS (
    SELECT {_CUSTOMER_COLUMNS} FROM customers WHERE customer_id = $1 FOR SHARE
), locked AS (
    INSERT INTO usage_totals AS t (customer_id, meter, period_start, period_end)
    SELECT customer_id, $2, period_start, period_end FROM c
    WHERE plan_id = ANY($3::text[]) AND subscription_status = ANY($4::text[])
    ON CONFLICT (customer_id, meter, period_start) DO UPDATE SET period_end = excluded.period_end
    RETURNING {_TOTALS_COLUMNS}
)
SELECT c.*, locked.meter IS NOT NULL AS locked, locked.*,
    k.event_id AS seen_event_id, k.payload_hash AS seen_payload_hash
FROM c
LEFT JOIN locked ON true
LEFT JOIN usage_events k ON k.customer_id = $1 AND k.idempotency_key = $5"""

# One consumed event and, when it is in the customer's current period, its totals row (created
# and locked by CONSUME_LOCK or LOCK_TOTALS) in the same statement. No row: the key was taken.
# $1 event_id, $2 customer_id, $3 idempotency_key, $4 meter, $5 quantity, $6 event_time,
# $7 properties (JSON text), $8 payload_hash, $9 counts in the period, $10 period_start
CONSUME_INSERT = """
WITH ins AS (
    INSERT INTO usage_events (
        event_id, customer_id, idempotency_key, meter, quantity, event_time, properties,
        payload_hash)
    VALUES ($1::uuid, $2, $3, $4, $5, $6, $7::text::jsonb, $8)
    ON CONFLICT (customer_id, idempotency_key) DO NOTHING
    RETURNING event_id, customer_id, meter, quantity, event_time
), added AS (
    UPDATE usage_totals t SET
        event_count = t.event_count + 1,
        quantity_sum = t.quantity_sum + ins.quantity,
        quantity_max = greatest(t.quantity_max, ins.quantity),
        last_quantity = CASE
            WHEN t.last_event_time IS NULL OR ins.event_time >= t.last_event_time
            THEN ins.quantity ELSE t.last_quantity END,
        last_event_time = greatest(t.last_event_time, ins.event_time)
    FROM ins
    WHERE $9::boolean AND t.customer_id = ins.customer_id AND t.meter = ins.meter
        AND t.period_start = $10
    RETURNING t.customer_id
)
SELECT event_id FROM ins"""

# $1 customer_id, $2 period_start
PERIOD_TOTALS = f"""
SELECT {_TOTALS_COLUMNS} FROM usage_totals WHERE customer_id = $1 AND period_start = $2"""

# $1 customer_id, $2 meter, $3 period_start
METER_TOTALS = f"""
SELECT {_TOTALS_COLUMNS} FROM usage_totals
WHERE customer_id = $1 AND meter = $2 AND period_start = $3"""

# $1 customer_id, $2 idempotency_key
EVENT_BY_KEY = """
SELECT event_id, payload_hash FROM usage_events WHERE customer_id = $1 AND idempotency_key = $2"""

# Checks without consume, many at once: each (customer, meter) pair with the customer and its
# current period's totals row, both by primary key. Pairs of unknown customers have no row.
# $1 customer_id[], $2 meter[]; i is the pair's 1-based position
CHECK_READS = """
SELECT u.i, c.customer_id, c.plan_id, c.subscription_status, c.period_start, c.period_end,
    c.provider, c.provider_customer_id, c.subscription_items,
    t.customer_id IS NOT NULL AS has_totals, t.event_count, t.quantity_sum, t.quantity_max,
    t.last_quantity, t.last_event_time, t.reported_count, t.reported_sum, t.failed_count,
    t.failed_sum
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(customer_id, meter, i)
JOIN customers c ON c.customer_id = u.customer_id
LEFT JOIN usage_totals t
    ON t.customer_id = c.customer_id AND t.meter = u.meter AND t.period_start = c.period_start"""
