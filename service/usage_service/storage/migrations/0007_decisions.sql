-- Entitlement decisions GetDecision returns: every consume, and denials when USAGE_KEEP_DENIALS
-- is set. A decision keeps the request as checked and the answer exactly as it was given.
CREATE TABLE decisions (
    customer_id text NOT NULL,
    decision_id uuid NOT NULL,
    feature     text NOT NULL,
    quantity    bigint NOT NULL,
    consume     boolean NOT NULL,
    allowed     boolean NOT NULL,
    -- the consumed event; NULL when nothing was consumed
    event_id    uuid,
    -- the CheckEntitlementResponse as serialized protobuf, returned byte for byte
    response    bytea NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (customer_id, decision_id)
);

CREATE INDEX decisions_by_id ON decisions (decision_id);

-- A replayed consume answers with the decision that consumed its event (one per event; rows
-- without an event do not collide).
CREATE UNIQUE INDEX decisions_by_event ON decisions (customer_id, event_id);
