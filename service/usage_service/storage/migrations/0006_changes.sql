-- The change log WatchUsage streams: every committed change of a customer's figures, in commit
-- order. Versions are strictly increasing per customer: they are given out under the lock of
-- the customer's head row, which a writing transaction takes last and holds to its commit.
CREATE TABLE usage_change_heads (
    customer_id  text PRIMARY KEY,
    version      bigint NOT NULL,
    -- the latest period a change was recorded in: usage in a later one is a rollover
    period_start timestamptz,
    rolled       boolean NOT NULL DEFAULT false
);

CREATE TABLE usage_changes (
    customer_id  text NOT NULL,
    version      bigint NOT NULL,
    kind         text NOT NULL,
    committed_at timestamptz NOT NULL,
    period_start timestamptz,
    period_end   timestamptz,
    -- meter -> the period's totals after the change (storage/changes.py, FIGURES)
    figures      jsonb NOT NULL,
    -- what else the change says (a threshold crossing: its alert)
    detail       jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (customer_id, version),
    CHECK (kind IN ('usage', 'rollover', 'customer', 'drain', 'threshold'))
);

CREATE INDEX usage_changes_age ON usage_changes (committed_at);
