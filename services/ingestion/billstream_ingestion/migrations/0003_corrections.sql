-- Corrections (void / amend) of accepted usage, by idempotency key. Each is also appended to
-- the log as a compensating event (usage.voided / usage.amended); this table is the key's
-- history, read to know its current state (the latest row wins; `id` orders them, as
-- corrections of one key are serialized by a row lock on usage_keys).
CREATE TABLE IF NOT EXISTS usage_corrections (
    id              bigserial PRIMARY KEY,
    correction_id   text NOT NULL UNIQUE,
    tenant_id       text NOT NULL,
    environment     text NOT NULL,
    idempotency_key text NOT NULL,
    usage_id        text NOT NULL,
    action          text NOT NULL CHECK (action IN ('void', 'amend')),
    quantity        text,
    properties      jsonb,
    reason          text,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS usage_corrections_key
    ON usage_corrections (tenant_id, environment, idempotency_key, id);

-- The period closes this service appended (usage.period_closed), with their log sequence: a
-- usage event is billed by the first close after it in the log whose period ends after its
-- timestamp (metering's sweep); once such a close exists, the event can no longer be
-- corrected.
CREATE TABLE IF NOT EXISTS period_closes (
    event_id        text PRIMARY KEY,
    seq             bigint NOT NULL,
    tenant_id       text NOT NULL,
    environment     text NOT NULL,
    subscription_id text NOT NULL,
    customer_id     text NOT NULL,
    external_id     text,
    period_end      timestamptz NOT NULL,
    UNIQUE (tenant_id, environment, subscription_id, period_end)
);
CREATE INDEX IF NOT EXISTS period_closes_customer ON period_closes (tenant_id, environment, customer_id);
CREATE INDEX IF NOT EXISTS period_closes_external ON period_closes (tenant_id, environment, external_id)
    WHERE external_id IS NOT NULL;
