"""Every SQL statement of the decision trail (GetDecision), by name."""

from __future__ import annotations

# Keeps one decision. $1 customer_id, $2 decision_id, $3 feature, $4 quantity, $5 consume,
# $6 allowed, $7 event_id (NULL: nothing consumed), $8 response (serialized), $9 created_at
KEEP = """
INSERT INTO decisions (
    customer_id, decision_id, feature, quantity, consume, allowed, event_id, response, created_at)
VALUES ($1, $2::uuid, $3, $4, $5, $6, $7::uuid, $8, $9)"""

# Keeps decisions, as KEEP does one: the same columns, as arrays.
KEEP_MANY = """
INSERT INTO decisions (
    customer_id, decision_id, feature, quantity, consume, allowed, event_id, response, created_at)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::bigint[], $5::boolean[],
                     $6::boolean[], $7::uuid[], $8::bytea[], $9::timestamptz[])"""

# A decision by its id alone: a lock-free read (on a sharded database, of every shard).
# $1 decision_id
GET = """
SELECT customer_id, decision_id, feature, quantity, consume, allowed, event_id, response,
    created_at
FROM decisions WHERE decision_id = $1::uuid"""
