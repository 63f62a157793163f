-- Customers, as told by the app's payment-webhook handler through UpsertCustomer.
CREATE TABLE customers (
    customer_id          text PRIMARY KEY,
    plan_id              text NOT NULL,
    subscription_status  text NOT NULL,          -- active | trialing | past_due | canceled | unpaid | incomplete | paused
    period_start         timestamptz NOT NULL,   -- current billing period, [period_start, period_end)
    period_end           timestamptz NOT NULL,
    provider             text NOT NULL DEFAULT '',  -- '' (none) | stripe | lemon_squeezy | polar | dodo_payments | creem
    provider_customer_id text NOT NULL DEFAULT '',
    subscription_items   jsonb NOT NULL DEFAULT '{}'::jsonb,  -- meter -> Lemon Squeezy subscription item id
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CHECK (period_start < period_end)
);

-- One row per acknowledged usage event, unique per (customer_id, idempotency_key) for ever.
CREATE TABLE usage_events (
    event_id        uuid PRIMARY KEY,
    customer_id     text NOT NULL,
    idempotency_key text NOT NULL,
    meter           text NOT NULL,
    quantity        bigint NOT NULL CHECK (quantity >= 0),
    event_time      timestamptz NOT NULL,
    properties      jsonb NOT NULL DEFAULT '{}'::jsonb,
    payload_hash    bytea NOT NULL,              -- sha256 of what the caller sent; a retry must match it
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    report_state    text NOT NULL DEFAULT 'pending',  -- pending | reported | failed
    CONSTRAINT usage_events_customer_key UNIQUE (customer_id, idempotency_key)
);
CREATE INDEX usage_events_customer_time ON usage_events (customer_id, event_time);

-- Running totals per customer, meter and billing period, kept in the same transaction as each
-- event, so checks and summaries read one row instead of scanning events. Every aggregation is
-- kept at once; the meter's aggregation in the plans file picks which one is "used".
CREATE TABLE usage_totals (
    customer_id     text NOT NULL,
    meter           text NOT NULL,
    period_start    timestamptz NOT NULL,
    period_end      timestamptz NOT NULL,
    event_count     bigint NOT NULL DEFAULT 0,
    quantity_sum    bigint NOT NULL DEFAULT 0,
    quantity_max    bigint NOT NULL DEFAULT 0,
    last_quantity   bigint NOT NULL DEFAULT 0,
    last_event_time timestamptz,
    -- Drain progress, in events and in summed quantity.
    reported_count  bigint NOT NULL DEFAULT 0,
    reported_sum    bigint NOT NULL DEFAULT 0,
    failed_count    bigint NOT NULL DEFAULT 0,
    failed_sum      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (customer_id, meter, period_start)
);
