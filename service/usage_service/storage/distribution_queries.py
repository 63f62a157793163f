"""SQL that distributes the schema on Citus (storage/distribution.py)."""

from __future__ import annotations

CITUS_PRESENT = "SELECT count(*) > 0 FROM pg_extension WHERE extname = 'citus'"

# The schema's tables Citus does not manage yet (partitions follow their parent), each with
# whether it carries customer_id (storage rule 1: then it is the customer's, else a small
# reference table).
UNDISTRIBUTED = """
SELECT c.relname AS name,
    EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'customer_id'
        AND NOT a.attisdropped) AS by_customer
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
    AND c.relname <> 'schema_migrations'
    AND NOT EXISTS (SELECT 1 FROM pg_dist_partition d WHERE d.logicalrelid = c.oid)
ORDER BY c.relname <> 'customers', c.relname"""

# $1 table
DISTRIBUTE = "SELECT create_distributed_table($1::regclass, 'customer_id', colocate_with => $2)"
REFERENCE = "SELECT create_reference_table($1::regclass)"

# Whether a table is distributed by customer_id. $1 table
DISTRIBUTED = "SELECT count(*) > 0 FROM pg_dist_partition WHERE logicalrelid = $1::regclass"

# Catalog queries see shards as the tables they are (Citus hides them by default by filtering
# pg_class, which makes a client's type lookups take about a second per new connection, where
# there are no shards to hide on a coordinator). For the database's new sessions.
SHOW_SHARDS = """
DO $$ BEGIN
    EXECUTE format('ALTER DATABASE %I SET citus.override_table_visibility = off',
        current_database());
END $$"""
