-- Period closes wait here until every event of their source (ingestion's log) before them has
-- been applied; source_watermarks holds, per source, the highest sequence up to which every
-- event has been applied (contiguously) by the usage consumer.
CREATE TABLE IF NOT EXISTS pending_closes (
    event_id       text PRIMARY KEY,
    tenant_id      text NOT NULL,
    environment    text NOT NULL,
    source         text NOT NULL,
    required_seq   bigint NOT NULL,
    correlation_id text,
    data           jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS pending_closes_due ON pending_closes (source, required_seq);

CREATE TABLE IF NOT EXISTS source_watermarks (
    source text PRIMARY KEY,
    seq    bigint NOT NULL
);
