"""Every SQL statement of threshold alerts and their webhooks, by name. Times are parameters."""

from __future__ import annotations

# Customers whose change log has versions their cursor has not reached, in customer order after
# a customer id (keyset paging). A lock-free read. $1 after customer_id, $2 limit
DUE_CUSTOMERS = """
SELECT h.customer_id FROM usage_change_heads h
LEFT JOIN usage_alert_cursors c ON c.customer_id = h.customer_id
WHERE h.customer_id > $1 AND h.version > coalesce(c.version, 0)
ORDER BY h.customer_id
LIMIT $2"""

# Whether one customer's log is ahead of its cursor (no row: it has no log). $1 customer_id
IS_DUE = """
SELECT h.version > coalesce(
    (SELECT c.version FROM usage_alert_cursors c WHERE c.customer_id = $1), 0) AS due
FROM usage_change_heads h WHERE h.customer_id = $1"""

# A cursor at 0 for a customer that has none (without waiting on a cursor another worker
# holds). $1 customer_id
ADD_CURSOR = """
INSERT INTO usage_alert_cursors (customer_id, version)
SELECT $1, 0 WHERE NOT EXISTS (SELECT 1 FROM usage_alert_cursors WHERE customer_id = $1)
ON CONFLICT (customer_id) DO NOTHING"""

# The customer's cursor, locked; no row while another worker holds it. $1 customer_id
LOCK_CURSOR = """
SELECT version, plan_id FROM usage_alert_cursors WHERE customer_id = $1 FOR UPDATE SKIP LOCKED"""

# The customer's log head and plan (NULL: a customer known only by its usage), read together:
# a plan change and its 'customer' change commit at once. $1 customer_id
HEAD_AND_PLAN = """
SELECT h.version, c.plan_id FROM usage_change_heads h
LEFT JOIN customers c ON c.customer_id = h.customer_id
WHERE h.customer_id = $1"""

# $1 customer_id, $2 version, $3 plan_id as of that version
MOVE_CURSOR = "UPDATE usage_alert_cursors SET version = $2, plan_id = $3 WHERE customer_id = $1"

# The alerts already raised in some periods. $1 customer_id, $2 period_start[]
KNOWN_ALERTS = """
SELECT feature, period_start, threshold FROM usage_alerts
WHERE customer_id = $1 AND period_start = ANY($2::timestamptz[])"""

# Nothing when the alert was raised before. $1 customer_id, $2 feature, $3 period_start,
# $4 threshold, $5 alert_id, $6 period_end, $7 amount, $8 used, $9 created_at
ADD_ALERT = """
INSERT INTO usage_alerts (customer_id, feature, period_start, threshold, alert_id, period_end,
    amount, used, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (customer_id, feature, period_start, threshold) DO NOTHING
RETURNING alert_id"""

# The customer's alerts, oldest first. $1 customer_id
ALERTS = """
SELECT alert_id, feature, period_start, period_end, threshold, amount, used, created_at
FROM usage_alerts WHERE customer_id = $1 ORDER BY created_at, amount"""

# A webhook due at once. $1 customer_id, $2 alert_id, $3 body, $4 created_at
ADD_WEBHOOK = """
INSERT INTO usage_webhook_outbox (customer_id, alert_id, body, created_at, next_attempt_at)
VALUES ($1, $2, $3, $4, $4)"""

# Webhooks due and not leased, oldest due first. A lock-free read. $1 now, $2 limit
DUE_WEBHOOKS = """
SELECT customer_id, alert_id FROM usage_webhook_outbox
WHERE next_attempt_at <= $1 AND (lease_until IS NULL OR lease_until < $1)
ORDER BY next_attempt_at
LIMIT $2"""

# Leases one due webhook, unless another worker holds or just took it (then no row); counts the
# attempt. $1 customer_id, $2 alert_id, $3 now, $4 lease_until, $5 owner
CLAIM_WEBHOOK = """
UPDATE usage_webhook_outbox o SET lease_until = $4, leased_by = $5, attempts = o.attempts + 1
FROM (
    SELECT customer_id, alert_id FROM usage_webhook_outbox
    WHERE customer_id = $1 AND alert_id = $2 AND next_attempt_at <= $3
        AND (lease_until IS NULL OR lease_until < $3)
    FOR UPDATE SKIP LOCKED
) due
WHERE o.customer_id = $1 AND o.alert_id = due.alert_id
RETURNING o.body, o.attempts"""

# The receiver accepted it. $1 customer_id, $2 alert_id
WEBHOOK_DELIVERED = "DELETE FROM usage_webhook_outbox WHERE customer_id = $1 AND alert_id = $2"

# Tries again later, while the lease is still ours. $1 customer_id, $2 alert_id, $3 owner,
# $4 next_attempt_at, $5 last_error
WEBHOOK_RETRY = """
UPDATE usage_webhook_outbox SET next_attempt_at = $4, last_error = $5, lease_until = NULL,
    leased_by = NULL
WHERE customer_id = $1 AND alert_id = $2 AND leased_by = $3"""

# The webhooks waiting: how many, the oldest's creation, and when the next one may be sent
# (a leased one: once its lease runs out). A lock-free read.
WEBHOOK_BACKLOG = """
SELECT count(*) AS waiting, min(created_at) AS oldest,
    min(greatest(next_attempt_at, coalesce(lease_until, next_attempt_at))) AS next_due
FROM usage_webhook_outbox"""

# Each waiting webhook, for operators and tests. No parameters.
WEBHOOKS = """
SELECT customer_id, alert_id, body, attempts, next_attempt_at, last_error
FROM usage_webhook_outbox ORDER BY created_at"""
