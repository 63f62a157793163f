"""Every SQL statement of the change log (WatchUsage), by name."""

from __future__ import annotations

CHANNEL = "usage_changes"  # NOTIFY payload: a JSON array of customer ids, or '*' (any)
MAX_PAYLOAD = 7900  # bytes of a NOTIFY payload (PostgreSQL's limit is 8000): longer says '*'

# Appending one customer's changes takes two statements, so that on Citus each runs on the
# customer's node alone (a result one part of a statement hands another is copied to every
# node): ADVANCE_HEAD, then ADD_CHANGES.

# Moves a customer's head past $2 new changes whose latest period starts at $3; returns the new
# version and period start, and whether the period moved on (a rollover).
# $1 customer_id, $2 changes, $3 latest period_start
ADVANCE_HEAD = """
INSERT INTO usage_change_heads AS h (customer_id, version, period_start)
VALUES ($1, $2::bigint, $3::timestamptz)
ON CONFLICT (customer_id) DO UPDATE SET
    version = h.version + excluded.version,
    period_start = greatest(h.period_start, excluded.period_start),
    rolled = h.period_start IS NOT NULL AND excluded.period_start > h.period_start
RETURNING version, period_start, rolled"""

# Appends a customer's changes at the versions ADVANCE_HEAD made room for and, at commit,
# notifies once for the transaction.
# $1 customer_id, $2 version[], $3 kind[], $4 period_start[], $5 period_end[],
# $6 figures (JSON text)[], $7 committed_at, $8 detail (JSON text)[]
ADD_CHANGES = f"""
WITH added AS (
    INSERT INTO usage_changes (customer_id, version, kind, committed_at, period_start,
        period_end, figures, detail)
    SELECT $1::text, v, k, $7, ps, pe, f::jsonb, d::jsonb
    FROM unnest($2::bigint[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::text[],
                $8::text[]) AS u(v, k, ps, pe, f, d)
    RETURNING version
)
SELECT max(version) AS version,
    pg_notify('{CHANNEL}', json_build_array($1::text)::text) AS notified
FROM added"""

# A rollover of a customer with no usage since its period began, written once (by whichever
# replica's watcher sees the boundary pass first): the head moves to the period, then
# ADD_CHANGES writes the change. $1 customer_id, $2 period_start
ROLLOVER_HEAD = """
UPDATE usage_change_heads SET version = version + 1, period_start = $2, rolled = false
WHERE customer_id = $1 AND (period_start IS NULL OR period_start < $2)
RETURNING version"""

# Tells the log's listeners, at commit, that customers' figures changed without a change in
# the log (a repair, a migration, a grant of a feature not prepaid in the plan).
# $1 payload: a JSON array of customer ids, or '*' (any)
NOTIFY = f"SELECT pg_notify('{CHANNEL}', $1)"

# A read model's fence: a NOTIFY on its own channel, delivered after every notification of the
# log committed before it. $1 channel, $2 payload (the fence's token)
FENCE = "SELECT pg_notify($1, $2)"

# The customer's latest version (0 before any change). $1 customer_id
HEAD = "SELECT version, period_start FROM usage_change_heads WHERE customer_id = $1"

# Changes after a version, oldest first. $1 customer_id, $2 after version, $3 limit
SINCE = """
SELECT version, kind, committed_at, period_start, period_end, figures, detail FROM usage_changes
WHERE customer_id = $1 AND version > $2 ORDER BY version LIMIT $3"""

# The oldest version still kept. $1 customer_id
OLDEST = "SELECT min(version) FROM usage_changes WHERE customer_id = $1"

# Changes committed before a time that may go, a batch at a time, each customer's oldest first:
# a change is kept while an earlier one of its customer is (clocks of replicas may disagree, so
# committed_at need not follow version). A read. $1 before, $2 limit
FORGETTABLE = """
SELECT c.customer_id, c.version FROM usage_changes c
WHERE c.committed_at < $1 AND NOT EXISTS (
    SELECT 1 FROM usage_changes k
    WHERE k.customer_id = c.customer_id AND k.version < c.version AND k.committed_at >= $1)
ORDER BY c.customer_id, c.version
LIMIT $2"""

# $1 customer_id, $2 version[]
FORGET = "DELETE FROM usage_changes WHERE customer_id = $1 AND version = ANY($2::bigint[])"
