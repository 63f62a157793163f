-- The database refuses a state or enum value the code does not know. Each list is the Python
-- enum or state set named beside it (tests/test_schema.py compares them).

-- domain.SubscriptionStatus; '' only for a customer known only by its usage (a placeholder).
ALTER TABLE customers ADD CONSTRAINT customers_subscription_status_known CHECK (
    subscription_status IN ('', 'active', 'trialing', 'past_due', 'canceled', 'unpaid',
        'incomplete', 'paused'));

-- domain.Provider; '' none.
ALTER TABLE customers ADD CONSTRAINT customers_provider_known CHECK (
    provider IN ('', 'stripe', 'lemon_squeezy', 'polar', 'dodo_payments', 'creem'));

-- periods.Interval
ALTER TABLE customers ADD CONSTRAINT customers_billing_interval_known CHECK (
    billing_interval IN ('day', 'week', 'month', 'year'));
ALTER TABLE customers ADD CONSTRAINT customers_billing_interval_count_positive CHECK (
    billing_interval_count > 0);
ALTER TABLE billing_periods ADD CONSTRAINT billing_periods_billing_interval_known CHECK (
    billing_interval IN ('day', 'week', 'month', 'year'));
ALTER TABLE billing_periods ADD CONSTRAINT billing_periods_billing_interval_count_positive CHECK (
    billing_interval_count > 0);

-- A provider the customer has had: never ''.
ALTER TABLE customer_providers ADD CONSTRAINT customer_providers_provider_known CHECK (
    provider IN ('stripe', 'lemon_squeezy', 'polar', 'dodo_payments', 'creem'));

-- The event's provider: '' none (unbilled); NULL while its customer is a placeholder.
ALTER TABLE usage_events ADD CONSTRAINT usage_events_provider_known CHECK (
    provider IN ('', 'stripe', 'lemon_squeezy', 'polar', 'dodo_payments', 'creem'));

-- Where the drain has an event: waiting or in an open report, reported, parked, never reported.
ALTER TABLE usage_events ADD CONSTRAINT usage_events_report_state_known CHECK (
    report_state IN ('pending', 'reported', 'failed', 'unbilled'));

ALTER TABLE reports ADD CONSTRAINT reports_provider_known CHECK (
    provider IN ('stripe', 'lemon_squeezy', 'polar', 'dodo_payments', 'creem'));
ALTER TABLE reports ADD CONSTRAINT reports_state_known CHECK (
    state IN ('open', 'delivered', 'failed'));
-- usage: events being reported; fix: what a reconciliation found a provider lacks.
ALTER TABLE reports ADD CONSTRAINT reports_kind_known CHECK (kind IN ('usage', 'fix'));
