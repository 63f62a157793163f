-- Billing periods: confirmed periods kept as history, cadences to project past them, usage of
-- customers known only by their events, the acceptance order of events and lifetime totals.

-- The cadence that follows the customer's last confirmed period (period_start, period_end).
ALTER TABLE customers
    ADD COLUMN billing_interval       text NOT NULL DEFAULT 'month',  -- day | week | month | year
    ADD COLUMN billing_interval_count integer NOT NULL DEFAULT 1,
    ADD COLUMN billing_anchor         timestamptz;  -- a boundary; its day of month is kept
UPDATE customers SET
    billing_interval = CASE
        WHEN period_end - period_start = interval '1 day' THEN 'day'
        WHEN period_end - period_start = interval '7 days' THEN 'week'
        WHEN period_end - period_start > interval '300 days' THEN 'year'
        ELSE 'month' END,
    billing_anchor = period_end;

-- A customer known only by its usage (recorded before its first UpsertCustomer) has a row with
-- an empty plan_id and no period: recorders lock it, so the first UpsertCustomer waits for them.
ALTER TABLE customers ALTER COLUMN period_start DROP NOT NULL;
ALTER TABLE customers ALTER COLUMN period_end DROP NOT NULL;

-- Periods confirmed by webhooks, with the cadence that follows each. They never overlap; a
-- webhook rewrites them from its start on.
CREATE TABLE billing_periods (
    customer_id            text NOT NULL,
    period_start           timestamptz NOT NULL,
    period_end             timestamptz NOT NULL,
    billing_interval       text NOT NULL,
    billing_interval_count integer NOT NULL,
    billing_anchor         timestamptz NOT NULL,
    confirmed_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, period_start),
    CHECK (period_start < period_end)
);
INSERT INTO billing_periods (
    customer_id, period_start, period_end, billing_interval, billing_interval_count,
    billing_anchor)
SELECT customer_id, period_start, period_end, billing_interval, billing_interval_count,
    billing_anchor
FROM customers;
-- Earlier periods, as their totals rows show them (those that overlap another are left out).
INSERT INTO billing_periods (
    customer_id, period_start, period_end, billing_interval, billing_interval_count,
    billing_anchor)
SELECT DISTINCT t.customer_id, t.period_start, t.period_end, c.billing_interval,
    c.billing_interval_count, t.period_end
FROM usage_totals t JOIN customers c ON c.customer_id = t.customer_id
WHERE t.period_end <= c.period_start
    AND NOT EXISTS (
        SELECT 1 FROM usage_totals o
        WHERE o.customer_id = t.customer_id AND o.period_start < t.period_end
            AND t.period_start < o.period_end
            AND (o.period_start, o.period_end) <> (t.period_start, t.period_end))
ON CONFLICT (customer_id, period_start) DO NOTHING;

-- The order in which the service accepted events: `last` breaks ties of event_time with it.
CREATE SEQUENCE usage_events_seq;
ALTER TABLE usage_events ADD COLUMN seq bigint NOT NULL DEFAULT 0;
ALTER TABLE usage_totals ADD COLUMN last_seq bigint NOT NULL DEFAULT 0;

-- Every event of a customer and meter, whatever its period. Refusing events that would take
-- this past int64 keeps every period's total in range however a webhook later moves the
-- boundaries.
CREATE TABLE usage_lifetime (
    customer_id  text NOT NULL,
    meter        text NOT NULL,
    event_count  bigint NOT NULL DEFAULT 0,
    quantity_sum bigint NOT NULL DEFAULT 0,
    -- of which pruned: events deleted by `usage-service prune`
    pruned_count bigint NOT NULL DEFAULT 0,
    pruned_sum   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (customer_id, meter)
);

-- Periods before this are closed for good: `prune` deleted reported events in them, so their
-- totals can no longer be rebuilt, and no webhook may move their boundaries.
ALTER TABLE customers ADD COLUMN pruned_before timestamptz;
INSERT INTO usage_lifetime (customer_id, meter, event_count, quantity_sum)
SELECT customer_id, meter, count(*), least(sum(quantity), 9223372036854775807)::bigint
FROM usage_events GROUP BY customer_id, meter;
