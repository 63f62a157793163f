-- Billable attribution: the provider an event is billed to is decided once, when it is counted.

-- The provider of each event: '' when its customer had none (the event is 'unbilled' and never
-- reported), NULL while its customer is known only by its usage (decided by the customer's
-- first UpsertCustomer).
ALTER TABLE usage_events ADD COLUMN provider text;

UPDATE usage_events e SET provider = c.provider
FROM customers c
WHERE c.customer_id = e.customer_id AND c.plan_id <> '';

-- report_state gains 'unbilled': counted while the customer had no provider. Events parked
-- while it had one are unbilled too: no provider will ever take them.
UPDATE usage_events SET report_state = 'unbilled', report_id = NULL, last_error = ''
WHERE provider = '' AND report_state IN ('pending', 'failed');

-- A customer's ids at each provider it has had, so that events attributed to an earlier
-- provider are still sent with that provider's ids after a switch.
CREATE TABLE customer_providers (
    customer_id          text NOT NULL,
    provider             text NOT NULL,
    provider_customer_id text NOT NULL DEFAULT '',
    subscription_items   jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, provider)
);

INSERT INTO customer_providers (customer_id, provider, provider_customer_id, subscription_items)
SELECT customer_id, provider, provider_customer_id, subscription_items FROM customers
WHERE plan_id <> '' AND provider <> '';

-- Drain progress gains the unbilled part.
ALTER TABLE usage_totals
    ADD COLUMN unbilled_count bigint NOT NULL DEFAULT 0,
    ADD COLUMN unbilled_sum   bigint NOT NULL DEFAULT 0;

UPDATE usage_totals t SET
    unbilled_count = u.un, unbilled_sum = u.us, failed_count = u.fn, failed_sum = u.fs
FROM (
    SELECT t.customer_id, t.meter, t.period_start,
        count(*) FILTER (WHERE e.report_state = 'unbilled') AS un,
        coalesce(sum(e.quantity) FILTER (WHERE e.report_state = 'unbilled'), 0) AS us,
        count(*) FILTER (WHERE e.report_state = 'failed') AS fn,
        coalesce(sum(e.quantity) FILTER (WHERE e.report_state = 'failed'), 0) AS fs
    FROM usage_totals t
    JOIN usage_events e ON e.customer_id = t.customer_id AND e.meter = t.meter
        AND e.event_time >= t.period_start AND e.event_time < t.period_end
    WHERE e.provider = '' AND e.report_state IN ('unbilled', 'failed')
    GROUP BY 1, 2, 3
) u
WHERE t.customer_id = u.customer_id AND t.meter = u.meter AND t.period_start = u.period_start;

-- When a report's figure is stated: the timestamp of a Stripe max / last meter event, fixed when
-- the report is built so that every re-send carries the same parameters.
ALTER TABLE reports ADD COLUMN stated_at timestamptz;

-- What a report is: usage being reported, or a fix a reconciliation queued (the amount, or the
-- events, that a provider was found to lack).
ALTER TABLE reports ADD COLUMN kind text NOT NULL DEFAULT 'usage';
-- A reconciliation reads a lane's reports (Stripe, Lemon Squeezy) of every state.
CREATE INDEX reports_lane ON reports (lane) WHERE lane IS NOT NULL;

-- The claim reads one provider's unclaimed events, oldest first.
DROP INDEX usage_events_unclaimed;
CREATE INDEX usage_events_unclaimed ON usage_events (provider, event_time, event_id)
    WHERE report_state = 'pending' AND report_id IS NULL;
