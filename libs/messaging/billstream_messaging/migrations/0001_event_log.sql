-- The service's own immutable event log, which doubles as its outbox.
-- `seq` is gapless and commit-ordered: writers take the head row lock (event_log_head) as the
-- last step of their transaction, so a lower seq can never commit after a higher one and the
-- relay can publish "everything after the last published seq" without ever skipping a row.
CREATE TABLE IF NOT EXISTS event_log (
    seq            bigint PRIMARY KEY,
    id             text NOT NULL UNIQUE,
    topic          text NOT NULL,
    type           text NOT NULL,
    version        int NOT NULL,
    tenant_id      text NOT NULL,
    environment    text NOT NULL,
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL,
    correlation_id text,
    causation_id   text,
    trace_context  jsonb,
    data           jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS event_log_aggregate ON event_log (tenant_id, aggregate_id, seq);

CREATE TABLE IF NOT EXISTS event_log_head (
    id       int PRIMARY KEY CHECK (id = 1),
    last_seq bigint NOT NULL
);
INSERT INTO event_log_head (id, last_seq) VALUES (1, 0) ON CONFLICT DO NOTHING;

-- Append-only: the log is the truth.
CREATE OR REPLACE FUNCTION event_log_is_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'event_log is append-only (% refused)', TG_OP;
END
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS event_log_append_only ON event_log;
CREATE TRIGGER event_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON event_log
    FOR EACH STATEMENT EXECUTE FUNCTION event_log_is_append_only();

-- Where the relay stands. heartbeat_offset detects a broker that came back empty.
CREATE TABLE IF NOT EXISTS relay_state (
    id               int PRIMARY KEY CHECK (id = 1),
    published_seq    bigint NOT NULL DEFAULT 0,
    heartbeat_offset bigint NOT NULL DEFAULT -1,
    republish_count  int NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
INSERT INTO relay_state (id) VALUES (1) ON CONFLICT DO NOTHING;

-- Consumers: one row per event applied (or dead-lettered), written in the same transaction as
-- the read-model change, so redelivery is a no-op enforced by the primary key.
CREATE TABLE IF NOT EXISTS inbox (
    consumer     text NOT NULL,
    event_id     text NOT NULL,
    source       text NOT NULL,
    sequence     bigint NOT NULL,
    status       text NOT NULL CHECK (status IN ('applied', 'dead_lettered')),
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- Bumping a consumer's generation gives it a fresh consumer group that reads from the start:
-- that, with its read model and inbox emptied, is a rebuild by replay.
CREATE TABLE IF NOT EXISTS consumer_state (
    consumer   text PRIMARY KEY,
    generation int NOT NULL DEFAULT 1
);

CREATE TABLE IF NOT EXISTS dead_letters (
    id         bigserial PRIMARY KEY,
    consumer   text NOT NULL,
    topic      text NOT NULL,
    partition  int NOT NULL,
    "offset"   bigint NOT NULL,
    event_id   text,
    event_type text,
    reason     text NOT NULL,
    payload    bytea,
    created_at timestamptz NOT NULL DEFAULT now()
);
