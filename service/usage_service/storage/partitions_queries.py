"""SQL for the month partitions of usage_events (storage/partitions.py). A partition's name and
bounds cannot be parameters of DDL: the templates take `{name}` (usage_events_YYYY_MM, made by
partitions.name from a date) and `{start}`/`{end}` (ISO timestamps in UTC, made from dates), so
no caller's text ever reaches them."""

from __future__ import annotations

# Makers of partitions (migrate, prune) take turns.
PARTITIONS_LOCK = "SELECT pg_advisory_xact_lock(7301958420018)"

# The partitions of usage_events, by name (the DEFAULT one included).
PARTITIONS = """
SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'usage_events'::regclass ORDER BY 1"""

# The months (UTC) of the rows the DEFAULT partition holds: normally none.
DEFAULT_MONTHS = """
SELECT DISTINCT date_trunc('month', recorded_at, 'UTC') AS month FROM usage_events_default
ORDER BY 1"""

# Rows moving out of the DEFAULT partition wait for its writers, and they for the move; a month
# partition is attached under a SHARE UPDATE EXCLUSIVE lock of usage_events, which recorders'
# locks do not conflict with.
LOCK_DEFAULT = "LOCK TABLE usage_events_default IN ACCESS EXCLUSIVE MODE"

NEW_MONTH = """
CREATE TABLE {name} (LIKE usage_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"""

# Moves the DEFAULT partition's rows of the month into its new table.
MOVE_FROM_DEFAULT = """
WITH moved AS (
    DELETE FROM usage_events_default
    WHERE recorded_at >= '{start}'::timestamptz AND recorded_at < '{end}'::timestamptz
    RETURNING *
)
INSERT INTO {name} SELECT * FROM moved"""

ATTACH_MONTH = """
ALTER TABLE usage_events ATTACH PARTITION {name}
FOR VALUES FROM ('{start}') TO ('{end}')"""

# Whether a month holds an event not settled (pending, in a report or not, or parked): each
# part is answered by one of the partial indexes every partition has.
UNSETTLED = """
SELECT EXISTS (SELECT 1 FROM {name} WHERE report_state = 'pending' AND report_id IS NULL)
    OR EXISTS (SELECT 1 FROM {name} WHERE report_state = 'pending' AND report_id IS NOT NULL)
    OR EXISTS (SELECT 1 FROM {name} WHERE report_state = 'failed')"""

# A month's events per customer and meter: how many, their quantity, the latest event_time.
MONTH_COUNTS = """
SELECT customer_id, meter, count(*) AS events, sum(quantity)::bigint AS quantity,
    max(event_time) AS last_event_time
FROM {name} GROUP BY customer_id, meter ORDER BY customer_id, meter"""

# Of the customers given with the latest event_time of their events in a month, those whose
# last confirmed period does not start after it (or who have none): their events are not all
# in closed periods. A read. $1 customer_id[], $2 latest event_time[]
OPEN_CUSTOMERS = """
SELECT u.c FROM unnest($1::text[], $2::timestamptz[]) AS u(c, t)
LEFT JOIN customers c ON c.customer_id = u.c
WHERE c.period_start IS NULL OR c.period_start <= u.t"""

# Closes a customer's periods before its last confirmed one for good (as prune's row deletion
# does) when all its events in a month ($2: the latest event_time) are before that period; no
# row: they are not, and the month stays.
# $1 customer_id, $2 latest event_time
CLOSE_BEFORE = """
UPDATE customers SET pruned_before = greatest(pruned_before, period_start)
WHERE customer_id = $1 AND period_start > $2
RETURNING period_start"""

# What a month's drop takes from a customer, per meter, kept until prune folds it into the
# lifetime totals (queries.FOLD_PRUNED). $1 customer_id, $2 month, $3 meter[], $4 events[],
# $5 quantity[]
KEEP_PRUNED = """
INSERT INTO usage_pruned (customer_id, month, meter, events, quantity)
SELECT $1, $2, * FROM unnest($3::text[], $4::bigint[], $5::bigint[])"""

# Customers with dropped months' counts not folded in yet, in order. A read.
UNFOLDED = "SELECT DISTINCT customer_id FROM usage_pruned ORDER BY 1"

# A month's drop waits at most this long for each lock, so recorders never queue behind it for
# longer: a drop that times out is tried again, or left to the next prune.
DROP_LOCK_TIMEOUT = "SET LOCAL lock_timeout = '500ms'"

# Every read and write of events goes through usage_events: holding it, nothing reads or writes
# the month's rows while they go. Taken first, so the drop never waits for a lock it upgrades.
LOCK_EVENTS = "LOCK TABLE ONLY usage_events IN ACCESS EXCLUSIVE MODE"

# Out of usage_events under the lock (a change of the catalog only); its files go after the
# commit, by DROP_MONTH, holding nothing but the table itself.
DETACH_MONTH = "ALTER TABLE usage_events DETACH PARTITION {name}"

DROP_MONTH = "DROP TABLE {name}"

# Month tables detached but not dropped (a prune stopped between the two), by name.
DETACHED = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND c.relkind = 'r' AND NOT c.relispartition
    AND c.relname ~ '^usage_events_[0-9]{4}_[0-9]{2}$'
ORDER BY 1"""
