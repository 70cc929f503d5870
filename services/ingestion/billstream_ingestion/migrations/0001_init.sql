-- Ingestion owns the idempotency keys of accepted usage: one row per (tenant, environment,
-- idempotency_key), inserted in the same transaction as the usage.accepted event, so a key is
-- taken exactly when its event is durable. The primary key is the dedup guarantee.
CREATE TABLE IF NOT EXISTS usage_keys (
    tenant_id       text NOT NULL,
    environment     text NOT NULL,
    idempotency_key text NOT NULL,
    payload_hash    text NOT NULL,
    usage_id        text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, environment, idempotency_key)
);

-- Read models (consumer ingestion.catalog, from billstream.subscription.events): what this
-- service needs to validate usage on its own.
CREATE TABLE IF NOT EXISTS customers (
    tenant_id     text NOT NULL,
    environment   text NOT NULL,
    customer_id   text NOT NULL,
    external_id   text,
    test_clock_id text,
    PRIMARY KEY (tenant_id, environment, customer_id)
);
CREATE INDEX IF NOT EXISTS customers_external ON customers (tenant_id, environment, external_id)
    WHERE external_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS meters (
    tenant_id   text NOT NULL,
    environment text NOT NULL,
    code        text NOT NULL,
    meter_id    text NOT NULL,
    PRIMARY KEY (tenant_id, environment, code)
);

CREATE TABLE IF NOT EXISTS test_clocks (
    test_clock_id text PRIMARY KEY,
    tenant_id     text NOT NULL,
    environment   text NOT NULL,
    frozen_time   timestamptz NOT NULL
);
