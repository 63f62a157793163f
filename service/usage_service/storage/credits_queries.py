"""Every SQL statement of prepaid credits, by name. Each names one customer."""

from __future__ import annotations

GRANT_COLUMNS = """customer_id, grant_id::text, feature, amount, burned, priority, effective_at,
    expires_at, voided_at, spent_at, source, idempotency_key, created_at"""

# A customer's grants of a feature that may still count: those that expire at or after $3 (the
# previous period's plan grants decide a rollover), and those that never expire unless voided,
# or spent before $3 (the start of the period shown: its figures count what was spent in it).
# $1 customer_id, $2 feature, $3 since
_KEPT = """(expires_at >= $3
    OR (expires_at IS NULL AND voided_at IS NULL AND (spent_at IS NULL OR spent_at >= $3)))"""
_LIVE = f"""
FROM credit_grants
WHERE customer_id = $1 AND feature = $2 AND {_KEPT}"""

LIVE_GRANTS = f"SELECT {GRANT_COLUMNS} {_LIVE}"

# The same, locked: burning holds them until commit (after the totals rows it counts in).
LOCK_GRANTS = f"SELECT {GRANT_COLUMNS} {_LIVE} ORDER BY grant_id FOR UPDATE"

# Several features' grants of one customer, for a summary. $1 customer_id, $2 feature[], $3 since
LIVE_GRANTS_OF = f"""
SELECT {GRANT_COLUMNS} FROM credit_grants
WHERE customer_id = $1 AND feature = ANY($2::text[]) AND {_KEPT}"""

# Every feature's grants of one customer, as LIVE_GRANTS. $1 customer_id, $2 since
CUSTOMER_GRANTS = f"""
SELECT {GRANT_COLUMNS} FROM credit_grants
WHERE customer_id = $1 AND {_KEPT.replace("$3", "$2")}"""

# One grant; a key taken already inserts nothing. $1 customer_id, $2 grant_id, $3 feature,
# $4 amount, $5 priority, $6 effective_at, $7 expires_at, $8 source, $9 idempotency_key,
# $10 payload_hash, $11 created_at
INSERT_GRANT = f"""
INSERT INTO credit_grants (customer_id, grant_id, feature, amount, priority, effective_at,
    expires_at, source, idempotency_key, payload_hash, created_at)
VALUES ($1, $2::uuid, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (customer_id, idempotency_key) DO NOTHING
RETURNING {GRANT_COLUMNS}"""

# $1 customer_id, $2 idempotency_key
GRANT_BY_KEY = f"""
SELECT {GRANT_COLUMNS}, payload_hash FROM credit_grants
WHERE customer_id = $1 AND idempotency_key = $2"""

# $1 customer_id, $2 grant_id
LOCK_GRANT = f"""
SELECT {GRANT_COLUMNS} FROM credit_grants WHERE customer_id = $1 AND grant_id = $2::uuid
FOR UPDATE"""

# $1 customer_id, $2 grant_id, $3 voided at
VOID_GRANT = f"""
UPDATE credit_grants SET voided_at = $3
WHERE customer_id = $1 AND grant_id = $2::uuid AND voided_at IS NULL
RETURNING {GRANT_COLUMNS}"""

# $1 customer_id, $2 feature ('' all)
LIST_GRANTS = f"""
SELECT {GRANT_COLUMNS} FROM credit_grants
WHERE customer_id = $1 AND ($2 = '' OR feature = $2)"""

# What events burned, in one statement for one customer: the grants' burned units, the burns
# (which event took how much from which grant), each event's covered part and state, and the
# totals rows' covered and unbilled counters (the rows are locked by the caller already).
# $1 customer_id, $2 grant_id[], $3 units burned[], $4 burn event_id[], $5 burn grant_id[],
# $6 burn units[], $7 event_id[], $8 covered[], $9 report_state[], $10 meter[],
# $11 period_start[], $12 covered_count delta[], $13 covered_sum delta[],
# $14 unbilled_count delta[], $15 unbilled_sum delta[], $16 now (when a grant is spent)
APPLY_BURNS = """
WITH spent AS (
    UPDATE credit_grants g SET burned = g.burned + u.b,
        spent_at = CASE WHEN g.burned + u.b = g.amount THEN $16::timestamptz ELSE g.spent_at END
    FROM unnest($2::uuid[], $3::bigint[]) AS u(g, b)
    WHERE g.customer_id = $1 AND g.grant_id = u.g
), burns AS (
    INSERT INTO credit_burns (customer_id, event_id, grant_id, amount)
    SELECT $1, e, g, a FROM unnest($4::uuid[], $5::uuid[], $6::bigint[]) AS u(e, g, a)
), events AS (
    UPDATE usage_events e SET covered = u.c, report_state = u.s
    FROM unnest($7::uuid[], $8::bigint[], $9::text[]) AS u(e, c, s)
    WHERE e.customer_id = $1 AND e.event_id = u.e
)
UPDATE usage_totals t SET
    covered_count = t.covered_count + u.cc, covered_sum = t.covered_sum + u.cs,
    unbilled_count = t.unbilled_count + u.uc, unbilled_sum = t.unbilled_sum + u.us
FROM unnest($10::text[], $11::timestamptz[], $12::bigint[], $13::bigint[], $14::bigint[],
            $15::bigint[]) AS u(m, s, cc, cs, uc, us)
WHERE t.customer_id = $1 AND t.meter = u.m AND t.period_start = u.s
RETURNING t.*"""

# The plan's grants of a customer that a webhook confirming a period starting at $2 may move:
# those of periods from $2 on, and one that ran past $2. $1 customer_id, $2 start
PLAN_GRANTS_FROM = f"""
SELECT {GRANT_COLUMNS} FROM credit_grants
WHERE customer_id = $1 AND source IN ('plan', 'rollover')
    AND (effective_at >= $2 OR expires_at > $2)
ORDER BY grant_id
FOR UPDATE"""

# $1 customer_id, $2 grant_id, $3 expires_at
SET_GRANT_EXPIRY = """
UPDATE credit_grants SET expires_at = $3 WHERE customer_id = $1 AND grant_id = $2::uuid"""

# The grant units one event burned. $1 customer_id, $2 event_id
BURNED_BY = """
SELECT coalesce(sum(amount), 0)::bigint FROM credit_burns
WHERE customer_id = $1 AND event_id = $2::uuid"""

# Per grant of a customer: its burned units against the burns recorded for it. $1 customer_id
GRANT_BURNS = """
SELECT g.grant_id::text, g.burned, coalesce(sum(b.amount), 0)::bigint AS burns
FROM credit_grants g
LEFT JOIN credit_burns b ON b.customer_id = $1 AND b.grant_id = g.grant_id
WHERE g.customer_id = $1
GROUP BY g.grant_id, g.burned"""

# Per event of a customer that grants paid for (or that burned a grant): its covered part, its
# state and meter, against the units its burns took. $1 customer_id
EVENT_BURNS = """
SELECT e.event_id::text, e.meter, e.quantity, e.covered, e.report_state,
    coalesce(sum(b.amount), 0)::bigint AS burns
FROM usage_events e
LEFT JOIN credit_burns b ON b.customer_id = $1 AND b.event_id = e.event_id
WHERE e.customer_id = $1 AND (e.covered > 0 OR e.report_state = 'covered' OR b.amount IS NOT NULL)
GROUP BY e.event_id, e.meter, e.quantity, e.covered, e.report_state"""
