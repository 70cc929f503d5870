-- Shared by every service: the API keys it has learned from `api_key.*` events, and the
-- Idempotency-Key records of its POST endpoints.
CREATE TABLE IF NOT EXISTS api_keys (
    key_id      text PRIMARY KEY,
    tenant_id   text NOT NULL,
    environment text NOT NULL CHECK (environment IN ('test', 'live')),
    kind        text NOT NULL CHECK (kind IN ('secret', 'publishable')),
    key_hash    text NOT NULL UNIQUE,
    key_prefix  text NOT NULL,
    created_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);

CREATE TABLE IF NOT EXISTS idempotency_keys (
    tenant_id        text NOT NULL,
    environment      text NOT NULL,
    key              text NOT NULL,
    request_hash     text NOT NULL,
    status           text NOT NULL CHECK (status IN ('in_progress', 'done')),
    response_status  int,
    response_headers jsonb,
    response_body    bytea,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, environment, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at);
