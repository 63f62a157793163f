-- The schema the migrations in migrations/ build, read from pg_catalog by tools/schema.py.
-- Generated: do not edit. After changing a migration, run `.venv/bin/python tools/schema.py`;
-- tests/test_schema.py compares this file with a database built from the migrations.

CREATE TABLE billing_periods (
    customer_id text NOT NULL,
    period_start timestamp with time zone NOT NULL,
    period_end timestamp with time zone NOT NULL,
    billing_interval text NOT NULL,
    billing_interval_count integer NOT NULL,
    billing_anchor timestamp with time zone NOT NULL,
    confirmed_at timestamp with time zone NOT NULL DEFAULT now(),
    CONSTRAINT billing_periods_billing_interval_count_positive CHECK ((billing_interval_count > 0)),
    CONSTRAINT billing_periods_billing_interval_known CHECK ((billing_interval = ANY (ARRAY['day'::text, 'week'::text, 'month'::text, 'year'::text]))),
    CONSTRAINT billing_periods_check CHECK ((period_start < period_end)),
    CONSTRAINT billing_periods_pkey PRIMARY KEY (customer_id, period_start)
);

CREATE TABLE credit_burns (
    customer_id text NOT NULL,
    event_id uuid NOT NULL,
    grant_id uuid NOT NULL,
    amount bigint NOT NULL,
    CONSTRAINT credit_burns_amount_positive CHECK ((amount > 0)),
    CONSTRAINT credit_burns_pkey PRIMARY KEY (customer_id, event_id, grant_id)
);
CREATE INDEX credit_burns_by_grant ON public.credit_burns USING btree (customer_id, grant_id);

CREATE TABLE credit_grants (
    customer_id text NOT NULL,
    grant_id uuid NOT NULL,
    feature text NOT NULL,
    amount bigint NOT NULL,
    burned bigint NOT NULL DEFAULT 0,
    priority integer NOT NULL,
    effective_at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone,
    voided_at timestamp with time zone,
    spent_at timestamp with time zone,
    source text NOT NULL,
    idempotency_key text NOT NULL,
    payload_hash bytea NOT NULL,
    created_at timestamp with time zone NOT NULL,
    CONSTRAINT credit_grants_amount_positive CHECK ((amount > 0)),
    CONSTRAINT credit_grants_burned_within CHECK (((burned >= 0) AND (burned <= amount))),
    CONSTRAINT credit_grants_customer_id_idempotency_key_key UNIQUE (customer_id, idempotency_key),
    CONSTRAINT credit_grants_expires_after_effective CHECK ((expires_at > effective_at)),
    CONSTRAINT credit_grants_pkey PRIMARY KEY (customer_id, grant_id),
    CONSTRAINT credit_grants_priority_nonnegative CHECK ((priority >= 0)),
    CONSTRAINT credit_grants_source_known CHECK ((source = ANY (ARRAY['plan'::text, 'rollover'::text, 'top_up'::text])))
);
CREATE INDEX credit_grants_by_feature ON public.credit_grants USING btree (customer_id, feature);

CREATE TABLE customer_providers (
    customer_id text NOT NULL,
    provider text NOT NULL,
    provider_customer_id text NOT NULL DEFAULT ''::text,
    subscription_items jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at timestamp with time zone NOT NULL DEFAULT now(),
    CONSTRAINT customer_providers_pkey PRIMARY KEY (customer_id, provider),
    CONSTRAINT customer_providers_provider_known CHECK ((provider = ANY (ARRAY['stripe'::text, 'lemon_squeezy'::text, 'polar'::text, 'dodo_payments'::text, 'creem'::text])))
);

CREATE TABLE customers (
    customer_id text NOT NULL,
    plan_id text NOT NULL,
    subscription_status text NOT NULL,
    period_start timestamp with time zone,
    period_end timestamp with time zone,
    provider text NOT NULL DEFAULT ''::text,
    provider_customer_id text NOT NULL DEFAULT ''::text,
    subscription_items jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    updated_at timestamp with time zone NOT NULL DEFAULT now(),
    billing_interval text NOT NULL DEFAULT 'month'::text,
    billing_interval_count integer NOT NULL DEFAULT 1,
    billing_anchor timestamp with time zone,
    pruned_before timestamp with time zone,
    CONSTRAINT customers_billing_interval_count_positive CHECK ((billing_interval_count > 0)),
    CONSTRAINT customers_billing_interval_known CHECK ((billing_interval = ANY (ARRAY['day'::text, 'week'::text, 'month'::text, 'year'::text]))),
    CONSTRAINT customers_check CHECK ((period_start < period_end)),
    CONSTRAINT customers_pkey PRIMARY KEY (customer_id),
    CONSTRAINT customers_provider_known CHECK ((provider = ANY (ARRAY[''::text, 'stripe'::text, 'lemon_squeezy'::text, 'polar'::text, 'dodo_payments'::text, 'creem'::text]))),
    CONSTRAINT customers_subscription_status_known CHECK ((subscription_status = ANY (ARRAY[''::text, 'active'::text, 'trialing'::text, 'past_due'::text, 'canceled'::text, 'unpaid'::text, 'incomplete'::text, 'paused'::text])))
);

CREATE TABLE decisions (
    customer_id text NOT NULL,
    decision_id uuid NOT NULL,
    feature text NOT NULL,
    quantity bigint NOT NULL,
    consume boolean NOT NULL,
    allowed boolean NOT NULL,
    event_id uuid,
    response bytea NOT NULL,
    created_at timestamp with time zone NOT NULL,
    CONSTRAINT decisions_pkey PRIMARY KEY (customer_id, decision_id)
);
CREATE UNIQUE INDEX decisions_by_event ON public.decisions USING btree (customer_id, event_id);
CREATE INDEX decisions_by_id ON public.decisions USING btree (decision_id);

CREATE TABLE reports (
    report_id uuid NOT NULL,
    provider text NOT NULL,
    lane text,
    state text NOT NULL DEFAULT 'open'::text,
    events jsonb NOT NULL,
    value bigint NOT NULL DEFAULT 0,
    checkpoint jsonb NOT NULL DEFAULT '{}'::jsonb,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamp with time zone NOT NULL DEFAULT now(),
    lease_until timestamp with time zone,
    leased_by text,
    first_sent_at timestamp with time zone,
    last_error text NOT NULL DEFAULT ''::text,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    settled_at timestamp with time zone,
    stated_at timestamp with time zone,
    kind text NOT NULL DEFAULT 'usage'::text,
    customer_id text NOT NULL,
    CONSTRAINT reports_kind_known CHECK ((kind = ANY (ARRAY['usage'::text, 'fix'::text]))),
    CONSTRAINT reports_pkey PRIMARY KEY (customer_id, report_id),
    CONSTRAINT reports_provider_known CHECK ((provider = ANY (ARRAY['stripe'::text, 'lemon_squeezy'::text, 'polar'::text, 'dodo_payments'::text, 'creem'::text]))),
    CONSTRAINT reports_state_known CHECK ((state = ANY (ARRAY['open'::text, 'delivered'::text, 'failed'::text])))
);
CREATE INDEX reports_due ON public.reports USING btree (provider, next_attempt_at) WHERE (state = 'open'::text);
CREATE INDEX reports_lane ON public.reports USING btree (customer_id, lane) WHERE (lane IS NOT NULL);
CREATE UNIQUE INDEX reports_open_lane ON public.reports USING btree (customer_id, lane) WHERE ((state = 'open'::text) AND (lane IS NOT NULL));

CREATE TABLE schema_migrations (
    version text NOT NULL,
    applied_at timestamp with time zone NOT NULL DEFAULT now(),
    CONSTRAINT schema_migrations_pkey PRIMARY KEY (version)
);

CREATE TABLE usage_alert_cursors (
    customer_id text NOT NULL,
    version bigint NOT NULL,
    plan_id text,
    CONSTRAINT usage_alert_cursors_pkey PRIMARY KEY (customer_id)
);

CREATE TABLE usage_alerts (
    customer_id text NOT NULL,
    feature text NOT NULL,
    period_start timestamp with time zone NOT NULL,
    threshold text NOT NULL,
    alert_id uuid NOT NULL,
    period_end timestamp with time zone NOT NULL,
    amount bigint NOT NULL,
    used bigint NOT NULL,
    created_at timestamp with time zone NOT NULL,
    CONSTRAINT usage_alerts_customer_id_alert_id_key UNIQUE (customer_id, alert_id),
    CONSTRAINT usage_alerts_pkey PRIMARY KEY (customer_id, feature, period_start, threshold)
);

CREATE TABLE usage_change_heads (
    customer_id text NOT NULL,
    version bigint NOT NULL,
    period_start timestamp with time zone,
    rolled boolean NOT NULL DEFAULT false,
    CONSTRAINT usage_change_heads_pkey PRIMARY KEY (customer_id)
);

CREATE TABLE usage_changes (
    customer_id text NOT NULL,
    version bigint NOT NULL,
    kind text NOT NULL,
    committed_at timestamp with time zone NOT NULL,
    period_start timestamp with time zone,
    period_end timestamp with time zone,
    figures jsonb NOT NULL,
    detail jsonb NOT NULL DEFAULT '{}'::jsonb,
    CONSTRAINT usage_changes_kind_check CHECK ((kind = ANY (ARRAY['usage'::text, 'rollover'::text, 'customer'::text, 'drain'::text, 'threshold'::text, 'credit'::text]))),
    CONSTRAINT usage_changes_pkey PRIMARY KEY (customer_id, version)
);
CREATE INDEX usage_changes_age ON public.usage_changes USING btree (committed_at);

CREATE TABLE usage_events (
    event_id uuid NOT NULL,
    customer_id text NOT NULL,
    idempotency_key text NOT NULL,
    meter text NOT NULL,
    quantity bigint NOT NULL,
    event_time timestamp with time zone NOT NULL,
    properties jsonb NOT NULL DEFAULT '{}'::jsonb,
    payload_hash bytea NOT NULL,
    recorded_at timestamp with time zone NOT NULL DEFAULT now(),
    report_state text NOT NULL DEFAULT 'pending'::text,
    report_id uuid,
    last_error text NOT NULL DEFAULT ''::text,
    reported_at timestamp with time zone,
    seq bigint NOT NULL DEFAULT 0,
    provider text,
    covered bigint NOT NULL DEFAULT 0,
    CONSTRAINT usage_events_covered_within CHECK (((covered >= 0) AND (covered <= quantity))),
    CONSTRAINT usage_events_pkey PRIMARY KEY (event_id, customer_id, recorded_at),
    CONSTRAINT usage_events_provider_known CHECK ((provider = ANY (ARRAY[''::text, 'stripe'::text, 'lemon_squeezy'::text, 'polar'::text, 'dodo_payments'::text, 'creem'::text]))),
    CONSTRAINT usage_events_quantity_check CHECK ((quantity >= 0)),
    CONSTRAINT usage_events_report_state_known CHECK ((report_state = ANY (ARRAY['pending'::text, 'reported'::text, 'failed'::text, 'unbilled'::text, 'covered'::text])))
) PARTITION BY RANGE (recorded_at);
CREATE INDEX usage_events_customer_time ON ONLY public.usage_events USING btree (customer_id, event_time);
CREATE INDEX usage_events_in_report ON ONLY public.usage_events USING btree (report_id) WHERE ((report_state = 'pending'::text) AND (report_id IS NOT NULL));
CREATE INDEX usage_events_parked ON ONLY public.usage_events USING btree (customer_id) WHERE (report_state = 'failed'::text);
CREATE INDEX usage_events_unclaimed ON ONLY public.usage_events USING btree (provider, event_time, event_id) WHERE ((report_state = 'pending'::text) AND (report_id IS NULL));
CREATE INDEX usage_events_unclaimed_by_customer ON ONLY public.usage_events USING btree (customer_id, provider, event_time, event_id) WHERE ((report_state = 'pending'::text) AND (report_id IS NULL));
CREATE TABLE usage_events_default PARTITION OF usage_events DEFAULT;

CREATE TABLE usage_keys (
    customer_id text NOT NULL,
    idempotency_key text NOT NULL,
    payload_hash bytea NOT NULL,
    event_id uuid NOT NULL,
    CONSTRAINT usage_keys_pkey PRIMARY KEY (customer_id, idempotency_key)
);

CREATE TABLE usage_lifetime (
    customer_id text NOT NULL,
    meter text NOT NULL,
    event_count bigint NOT NULL DEFAULT 0,
    quantity_sum bigint NOT NULL DEFAULT 0,
    pruned_count bigint NOT NULL DEFAULT 0,
    pruned_sum bigint NOT NULL DEFAULT 0,
    CONSTRAINT usage_lifetime_pkey PRIMARY KEY (customer_id, meter)
);

CREATE TABLE usage_pruned (
    customer_id text NOT NULL,
    month date NOT NULL,
    meter text NOT NULL,
    events bigint NOT NULL,
    quantity bigint NOT NULL,
    CONSTRAINT usage_pruned_pkey PRIMARY KEY (customer_id, month, meter)
);

CREATE TABLE usage_totals (
    customer_id text NOT NULL,
    meter text NOT NULL,
    period_start timestamp with time zone NOT NULL,
    period_end timestamp with time zone NOT NULL,
    event_count bigint NOT NULL DEFAULT 0,
    quantity_sum bigint NOT NULL DEFAULT 0,
    quantity_max bigint NOT NULL DEFAULT 0,
    last_quantity bigint NOT NULL DEFAULT 0,
    last_event_time timestamp with time zone,
    reported_count bigint NOT NULL DEFAULT 0,
    reported_sum bigint NOT NULL DEFAULT 0,
    failed_count bigint NOT NULL DEFAULT 0,
    failed_sum bigint NOT NULL DEFAULT 0,
    last_seq bigint NOT NULL DEFAULT 0,
    unbilled_count bigint NOT NULL DEFAULT 0,
    unbilled_sum bigint NOT NULL DEFAULT 0,
    covered_count bigint NOT NULL DEFAULT 0,
    covered_sum bigint NOT NULL DEFAULT 0,
    CONSTRAINT usage_totals_pkey PRIMARY KEY (customer_id, meter, period_start)
);

CREATE TABLE usage_webhook_outbox (
    customer_id text NOT NULL,
    alert_id uuid NOT NULL,
    body text NOT NULL,
    created_at timestamp with time zone NOT NULL,
    next_attempt_at timestamp with time zone NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    lease_until timestamp with time zone,
    leased_by text,
    last_error text NOT NULL DEFAULT ''::text,
    CONSTRAINT usage_webhook_outbox_pkey PRIMARY KEY (customer_id, alert_id)
);
CREATE INDEX usage_webhook_outbox_due ON public.usage_webhook_outbox USING btree (next_attempt_at);

CREATE SEQUENCE usage_events_seq AS bigint START 1 INCREMENT 1;
