-- The drain: reports sent to payment providers, and each event's place in one.

-- A report is what goes to a provider as one unit. Its id is the stable identifier (Stripe's
-- identifier and Idempotency-Key), written before the first send; a retry re-sends the same
-- events with the same id. Retry state and the lease live here.
CREATE TABLE reports (
    report_id       uuid PRIMARY KEY,
    provider        text NOT NULL,
    -- provider, customer and meter (chr(31) between) for providers that allow one call in flight
    -- per customer and meter (Stripe) or keep one running total per item (Lemon Squeezy).
    lane            text,
    state           text NOT NULL DEFAULT 'open',  -- open | delivered | failed
    events          jsonb NOT NULL,                -- the events as sent (customer details included)
    value           bigint NOT NULL DEFAULT 0,     -- lane reports: the collapsed value sent
    checkpoint      jsonb NOT NULL DEFAULT '{}'::jsonb,  -- adapter state saved before a send
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,                   -- a worker owns the report until then
    leased_by       text,
    first_sent_at   timestamptz,                   -- first handed to a provider (Stripe's 24 h)
    last_error      text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    settled_at      timestamptz
);
-- At most one open report per lane: one call in flight per customer and meter, across replicas.
CREATE UNIQUE INDEX reports_open_lane ON reports (lane) WHERE state = 'open' AND lane IS NOT NULL;
CREATE INDEX reports_due ON reports (provider, next_attempt_at) WHERE state = 'open';

ALTER TABLE usage_events
    ADD COLUMN report_id   uuid,                    -- set when claimed into a report
    ADD COLUMN last_error  text NOT NULL DEFAULT '', -- why the event is parked as failed
    ADD COLUMN reported_at timestamptz;
-- The claim scans this: pending events not yet in a report, oldest first.
CREATE INDEX usage_events_unclaimed ON usage_events (event_time, event_id)
    WHERE report_state = 'pending' AND report_id IS NULL;
-- Settling a report finds its events through this.
CREATE INDEX usage_events_in_report ON usage_events (report_id)
    WHERE report_state = 'pending' AND report_id IS NOT NULL;
CREATE INDEX usage_events_parked ON usage_events (customer_id) WHERE report_state = 'failed';
