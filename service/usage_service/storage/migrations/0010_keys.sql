-- Idempotency keys in their own table, for ever, and usage_events partitioned by month, so
-- that prune drops whole months instead of deleting rows one by one (storage rule 5).
--
-- usage_keys: one compact row per key ever accepted, never pruned: a retry after its event was
-- pruned is still answered as a duplicate (same payload) or a conflict (another payload).
-- Every write of an event claims its key here in the same statement; every key lookup reads
-- here. The key's owner is the customer, so the table shards with the customer's other rows.
CREATE TABLE usage_keys (
    customer_id     text NOT NULL,
    idempotency_key text NOT NULL,
    payload_hash    bytea NOT NULL,
    event_id        uuid NOT NULL,
    PRIMARY KEY (customer_id, idempotency_key)
);

INSERT INTO usage_keys (customer_id, idempotency_key, payload_hash, event_id)
SELECT customer_id, idempotency_key, payload_hash, event_id FROM usage_events;

-- The events move to a table partitioned by month of recorded_at (when the service committed
-- the event), not of event_time:
-- * prune's criteria are "recorded more than N days ago" and "settled" and "before the
--   customer's current period": a month of recorded_at older than the cutoff is wholly past
--   the first test by its bounds, with no scan;
-- * a month of recorded_at is closed once it is over: no insert ever lands in it again (the
--   service never writes recorded_at; it is the commit's now()). Late events (event_time weeks
--   back, allowed from periods.EARLIEST on) land in the current month, so a month checked as
--   all settled stays so until its drop, and the only partitions the service ever needs are
--   the current month's and the next (made ahead by storage/partitions.py; the DEFAULT
--   partition takes anything else, so no insert can ever fail for want of a partition);
-- * the drain claims pending events by (provider, event_time) through a partial index present
--   in every partition: pending events sit in the newest months, older partitions answer from
--   empty index pages. Summaries and checks read usage_totals, never events; rebuilding a
--   period's totals reads (customer_id, event_time) in each partition kept (prune keeps few).
-- A unique key of a partitioned table must hold the partition key, so the key's uniqueness is
-- usage_keys' and the primary key is (event_id, customer_id, recorded_at): event ids are the
-- service's random UUIDs and usage_keys names each one once; lookups by event id (the drain's)
-- use its prefix. Nothing references usage_events by foreign key (credit_burns, decisions and
-- reports name event ids by value, and outlive pruned events as before).
-- A dropped month's events per customer and meter, written in the drop's transaction, before it
-- takes usage_events (no other writer touches these rows, so the drop's hold stays short);
-- prune then folds them into usage_lifetime's pruned counts, one customer at a time.
CREATE TABLE usage_pruned (
    customer_id text NOT NULL,
    month       date NOT NULL,
    meter       text NOT NULL,
    events      bigint NOT NULL,
    quantity    bigint NOT NULL,
    PRIMARY KEY (customer_id, month, meter)
);

ALTER TABLE usage_events RENAME TO usage_events_unpartitioned;

ALTER TABLE usage_events_unpartitioned DROP CONSTRAINT usage_events_pkey;

ALTER TABLE usage_events_unpartitioned DROP CONSTRAINT usage_events_customer_key;

DROP INDEX usage_events_customer_time;

DROP INDEX usage_events_in_report;

DROP INDEX usage_events_parked;

DROP INDEX usage_events_unclaimed;

CREATE TABLE usage_events (
    event_id        uuid NOT NULL,
    customer_id     text NOT NULL,
    idempotency_key text NOT NULL,
    meter           text NOT NULL,
    quantity        bigint NOT NULL,
    event_time      timestamptz NOT NULL,
    properties      jsonb NOT NULL DEFAULT '{}'::jsonb,
    payload_hash    bytea NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    report_state    text NOT NULL DEFAULT 'pending',
    report_id       uuid,
    last_error      text NOT NULL DEFAULT '',
    reported_at     timestamptz,
    seq             bigint NOT NULL DEFAULT 0,
    provider        text,
    covered         bigint NOT NULL DEFAULT 0,
    CONSTRAINT usage_events_pkey PRIMARY KEY (event_id, customer_id, recorded_at),
    CONSTRAINT usage_events_quantity_check CHECK (quantity >= 0),
    CONSTRAINT usage_events_covered_within CHECK (covered >= 0 AND covered <= quantity),
    CONSTRAINT usage_events_provider_known CHECK (
        provider IN ('', 'stripe', 'lemon_squeezy', 'polar', 'dodo_payments', 'creem')),
    CONSTRAINT usage_events_report_state_known CHECK (
        report_state IN ('pending', 'reported', 'failed', 'unbilled', 'covered'))
) PARTITION BY RANGE (recorded_at);

CREATE INDEX usage_events_customer_time ON usage_events (customer_id, event_time);

CREATE INDEX usage_events_in_report ON usage_events (report_id)
    WHERE report_state = 'pending' AND report_id IS NOT NULL;

CREATE INDEX usage_events_parked ON usage_events (customer_id) WHERE report_state = 'failed';

CREATE INDEX usage_events_unclaimed ON usage_events (provider, event_time, event_id)
    WHERE report_state = 'pending' AND report_id IS NULL;

-- Rows of months without their own partition. storage/partitions.py moves them into their
-- month's partition when it makes it (at every migrate and prune).
CREATE TABLE usage_events_default PARTITION OF usage_events DEFAULT;

INSERT INTO usage_events (
    event_id, customer_id, idempotency_key, meter, quantity, event_time, properties,
    payload_hash, recorded_at, report_state, report_id, last_error, reported_at, seq, provider,
    covered)
SELECT event_id, customer_id, idempotency_key, meter, quantity, event_time, properties,
    payload_hash, recorded_at, report_state, report_id, last_error, reported_at, seq, provider,
    covered
FROM usage_events_unpartitioned;

DROP TABLE usage_events_unpartitioned;
