-- Usage aggregates. `usage_records` is the read model of consumer metering.usage (one row per
-- accepted usage event, keyed by its usage_id so redelivery is a no-op); the summary tables
-- are metering's own state and survive a rebuild of the read models.
CREATE TABLE IF NOT EXISTS usage_records (
    usage_id     text PRIMARY KEY,
    tenant_id    text NOT NULL,
    environment  text NOT NULL,
    customer_ref text NOT NULL,          -- as the producer sent it: external_id or cus_ id
    customer_id  text,                   -- the cus_ id once known
    meter        text NOT NULL,
    quantity     numeric NOT NULL,
    value        numeric,                -- what the event adds to its meter (see domain)
    ts           timestamptz NOT NULL,
    summary_id   text,                   -- the period summary that billed it
    properties   jsonb                   -- kept only while the meter is unknown here
);
CREATE INDEX IF NOT EXISTS usage_records_by_ref
    ON usage_records (tenant_id, environment, customer_ref, meter, ts);
CREATE INDEX IF NOT EXISTS usage_records_by_customer
    ON usage_records (tenant_id, environment, customer_id, meter, ts)
    WHERE customer_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS usage_records_pending
    ON usage_records (tenant_id, environment, meter) WHERE properties IS NOT NULL;

-- One row per subscription period summarized: the guard that makes `usage.period_summarized`
-- once per period even if `subscription.period_ended` is applied again (a replay).
CREATE TABLE IF NOT EXISTS period_summaries (
    summary_id      text PRIMARY KEY,
    tenant_id       text NOT NULL,
    environment     text NOT NULL,
    subscription_id text NOT NULL,
    customer_id     text NOT NULL,
    period_start    timestamptz NOT NULL,
    period_end      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, environment, subscription_id, period_end)
);

-- Which summary billed which usage event; re-applied to usage_records when that read model is
-- rebuilt, so a rebuild never bills usage twice.
CREATE TABLE IF NOT EXISTS usage_summary_items (
    usage_id   text PRIMARY KEY,
    summary_id text NOT NULL REFERENCES period_summaries (summary_id)
);

-- Read models of consumer metering.catalog (billstream.subscription.events).
CREATE TABLE IF NOT EXISTS customers (
    tenant_id   text NOT NULL,
    environment text NOT NULL,
    customer_id text NOT NULL,
    external_id text,
    PRIMARY KEY (tenant_id, environment, customer_id)
);
CREATE INDEX IF NOT EXISTS customers_external ON customers (tenant_id, environment, external_id)
    WHERE external_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS meters (
    tenant_id   text NOT NULL,
    environment text NOT NULL,
    code        text NOT NULL,
    meter_id    text NOT NULL,
    aggregation text NOT NULL CHECK (aggregation IN ('sum', 'count', 'max')),
    field       text,
    PRIMARY KEY (tenant_id, environment, code)
);
