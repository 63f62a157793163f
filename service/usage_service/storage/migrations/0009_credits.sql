-- Prepaid credits: grants of a metered feature's units, what each event burned from which
-- grant, and the part of each event that grants paid for (never reported to a provider).
CREATE TABLE credit_grants (
    customer_id     text NOT NULL,
    grant_id        uuid NOT NULL,
    feature         text NOT NULL,
    amount          bigint NOT NULL,
    burned          bigint NOT NULL DEFAULT 0,
    priority        integer NOT NULL,
    effective_at    timestamptz NOT NULL,
    -- NULL: never expires
    expires_at      timestamptz,
    voided_at       timestamptz,
    -- when burns took its last unit (NULL: units left)
    spent_at        timestamptz,
    source          text NOT NULL,
    idempotency_key text NOT NULL,
    payload_hash    bytea NOT NULL,
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (customer_id, grant_id),
    UNIQUE (customer_id, idempotency_key),
    CONSTRAINT credit_grants_amount_positive CHECK (amount > 0),
    CONSTRAINT credit_grants_burned_within CHECK (burned >= 0 AND burned <= amount),
    CONSTRAINT credit_grants_priority_nonnegative CHECK (priority >= 0),
    CONSTRAINT credit_grants_expires_after_effective CHECK (expires_at > effective_at),
    CONSTRAINT credit_grants_source_known CHECK (source IN ('plan', 'rollover', 'top_up'))
);

CREATE INDEX credit_grants_by_feature ON credit_grants (customer_id, feature);

CREATE TABLE credit_burns (
    customer_id text NOT NULL,
    event_id    uuid NOT NULL,
    grant_id    uuid NOT NULL,
    amount      bigint NOT NULL,
    PRIMARY KEY (customer_id, event_id, grant_id),
    CONSTRAINT credit_burns_amount_positive CHECK (amount > 0)
);

CREATE INDEX credit_burns_by_grant ON credit_burns (customer_id, grant_id);

-- The part of the event's quantity that grants paid for: the provider is sent the rest.
ALTER TABLE usage_events ADD COLUMN covered bigint NOT NULL DEFAULT 0;

ALTER TABLE usage_events ADD CONSTRAINT usage_events_covered_within CHECK (
    covered >= 0 AND covered <= quantity);

ALTER TABLE usage_events DROP CONSTRAINT usage_events_report_state_known;

ALTER TABLE usage_events ADD CONSTRAINT usage_events_report_state_known CHECK (
    report_state IN ('pending', 'reported', 'failed', 'unbilled', 'covered'));

ALTER TABLE usage_totals ADD COLUMN covered_count bigint NOT NULL DEFAULT 0;

ALTER TABLE usage_totals ADD COLUMN covered_sum bigint NOT NULL DEFAULT 0;

-- A grant created or voided is a change of the customer's figures (its balance).
ALTER TABLE usage_changes DROP CONSTRAINT usage_changes_kind_check;

ALTER TABLE usage_changes ADD CONSTRAINT usage_changes_kind_check CHECK (
    kind IN ('usage', 'rollover', 'customer', 'drain', 'threshold', 'credit'));
