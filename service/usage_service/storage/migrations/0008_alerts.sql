-- Threshold alerts: how far each customer's change log has been checked against its plan's
-- thresholds, the alerts raised (at most one per customer, feature, period and threshold), and
-- the webhooks still to deliver.
CREATE TABLE usage_alert_cursors (
    customer_id text PRIMARY KEY,
    -- the last version of the customer's change log that was checked
    version     bigint NOT NULL,
    -- the customer's plan as of that version (NULL: not known yet)
    plan_id     text
);

CREATE TABLE usage_alerts (
    customer_id  text NOT NULL,
    feature      text NOT NULL,
    period_start timestamptz NOT NULL,
    -- as the plans file declares it, canonical: 80% of included, 100% of limit, 1500000
    threshold    text NOT NULL,
    alert_id     uuid NOT NULL,
    period_end   timestamptz NOT NULL,
    -- the usage the threshold stands for in the period, and the usage that crossed it
    amount       bigint NOT NULL,
    used         bigint NOT NULL,
    created_at   timestamptz NOT NULL,
    PRIMARY KEY (customer_id, feature, period_start, threshold),
    UNIQUE (customer_id, alert_id)
);

-- Webhooks not yet accepted by the receiver (a delivered one is deleted). The body is kept as
-- sent, so every attempt carries the same bytes.
CREATE TABLE usage_webhook_outbox (
    customer_id     text NOT NULL,
    alert_id        uuid NOT NULL,
    body            text NOT NULL,
    created_at      timestamptz NOT NULL,
    next_attempt_at timestamptz NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    lease_until     timestamptz,
    leased_by       text,
    last_error      text NOT NULL DEFAULT '',
    PRIMARY KEY (customer_id, alert_id)
);
CREATE INDEX usage_webhook_outbox_due ON usage_webhook_outbox (next_attempt_at);
