"""Every SQL statement of prepaid credits, by name."""

from __future__ import annotations

GRANT_COLUMNS = """customer_id, grant_id::text, feature, amount, burned, priority, effective_at,
    expires_at, voided_at, spent_at, source, idempotency_key, created_at"""
GRANT_COLUMNS_OF_G = """g.customer_id, g.grant_id::text, g.feature, g.amount, g.burned, g.priority,
    g.effective_at, g.expires_at, g.voided_at, g.spent_at, g.source, g.idempotency_key,
    g.created_at"""

# The grants that may still count: those that expire at or after $3 (the previous period's plan
# grants decide a rollover), and those that never expire unless voided, or spent before $3 (the
# start of the period shown: its figures count what was spent in it). $3 since
_KEPT = """(expires_at >= $3
    OR (expires_at IS NULL AND voided_at IS NULL AND (spent_at IS NULL OR spent_at >= $3)))"""

# The grants of one customer's features that may still count (as _KEPT), locked in the one
# order every locker of grants takes: customer, feature, effective time, id (grants made later
# are for later periods, so a burner that makes them locks them last).
# $1 customer_id[] (all $4), $2 feature[], $3 since[], $4 customer_id
LOCK_GRANTS_OF = f"""
SELECT {GRANT_COLUMNS_OF_G} FROM credit_grants g
JOIN unnest($1::text[], $2::text[], $3::timestamptz[]) AS u(c, f, since)
    ON g.customer_id = u.c AND g.feature = u.f
WHERE g.customer_id = $4 AND (g.expires_at >= u.since OR (g.expires_at IS NULL
    AND g.voided_at IS NULL AND (g.spent_at IS NULL OR g.spent_at >= u.since)))
ORDER BY g.customer_id, g.feature, g.effective_at, g.grant_id
FOR UPDATE OF g"""

# Grants by key, locked (in the order above): the plan's grants another burner made first.
# $1 customer_id[] (all $3), $2 idempotency_key[], $3 customer_id
LOCK_GRANTS_BY_KEY = f"""
SELECT {GRANT_COLUMNS_OF_G} FROM credit_grants g
JOIN unnest($1::text[], $2::text[]) AS u(c, k) ON g.customer_id = u.c AND g.idempotency_key = u.k
WHERE g.customer_id = $3
ORDER BY g.customer_id, g.feature, g.effective_at, g.grant_id
FOR UPDATE OF g"""

# The plan's grants of periods, made on first use; a key taken already inserts nothing.
# $1 customer_id[], $2 grant_id[], $3 feature[], $4 amount[], $5 priority[], $6 effective_at[],
# $7 expires_at[], $8 source[], $9 idempotency_key[], $10 created_at
INSERT_PLAN_GRANTS = f"""
INSERT INTO credit_grants (customer_id, grant_id, feature, amount, priority, effective_at,
    expires_at, source, idempotency_key, payload_hash, created_at)
SELECT c, g, f, a, p, e, x, s, k, ''::bytea, $10
FROM unnest($1::text[], $2::uuid[], $3::text[], $4::bigint[], $5::integer[],
            $6::timestamptz[], $7::timestamptz[], $8::text[], $9::text[])
    AS u(c, g, f, a, p, e, x, s, k)
ON CONFLICT (customer_id, idempotency_key) DO NOTHING
RETURNING {GRANT_COLUMNS}"""

# Every feature's grants of one customer that may still count (as _KEPT). $1 customer_id, $2 since
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

# What events burned, in one statement: the grants' burned units (and when one was spent),
# the burns (which event took how much from which grant), each event's covered part and state,
# and the totals rows' covered and unbilled counters (the rows are locked by the caller).
# $1..$3 customer_id[], grant_id[], units burned[]; $4..$7 burns: customer_id[], event_id[],
# grant_id[], units[]; $8..$11 events: customer_id[], event_id[], covered[], report_state[];
# $12..$18 totals: customer_id[], meter[], period_start[], covered_count delta[],
# covered_sum delta[], unbilled_count delta[], unbilled_sum delta[]; $19 now; $20 the one
# customer_id all the arrays name
APPLY_BURNS = """
WITH spent AS (
    UPDATE credit_grants g SET burned = g.burned + u.b,
        spent_at = CASE WHEN g.burned + u.b = g.amount THEN $19::timestamptz ELSE g.spent_at END
    FROM unnest($1::text[], $2::uuid[], $3::bigint[]) AS u(c, g, b)
    WHERE g.customer_id = $20 AND g.customer_id = u.c AND g.grant_id = u.g
), burns AS (
    INSERT INTO credit_burns (customer_id, event_id, grant_id, amount)
    SELECT * FROM unnest($4::text[], $5::uuid[], $6::uuid[], $7::bigint[])
), events AS (
    UPDATE usage_events e SET covered = u.cv, report_state = u.s
    FROM unnest($8::text[], $9::uuid[], $10::bigint[], $11::text[]) AS u(c, e, cv, s)
    WHERE e.customer_id = $20 AND e.customer_id = u.c AND e.event_id = u.e
)
UPDATE usage_totals t SET
    covered_count = t.covered_count + u.cc, covered_sum = t.covered_sum + u.cs,
    unbilled_count = t.unbilled_count + u.uc, unbilled_sum = t.unbilled_sum + u.us
FROM unnest($12::text[], $13::text[], $14::timestamptz[], $15::bigint[], $16::bigint[],
            $17::bigint[], $18::bigint[]) AS u(c, m, s, cc, cs, uc, us)
WHERE t.customer_id = $20 AND t.customer_id = u.c AND t.meter = u.m AND t.period_start = u.s
RETURNING t.*"""

# The plan's grants of a customer that a webhook confirming a period starting at $2 may move:
# those of periods from $2 on, and those that ran past $2, locked in the order burners lock
# grants. $1 customer_id, $2 start
PLAN_GRANTS_FROM = f"""
SELECT {GRANT_COLUMNS} FROM credit_grants
WHERE customer_id = $1 AND source IN ('plan', 'rollover')
    AND (effective_at >= $2 OR expires_at > $2)
ORDER BY feature, effective_at, grant_id
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
