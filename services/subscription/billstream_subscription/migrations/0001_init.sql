-- The subscription service's aggregates. `api_keys` (shared, from libs/runtime) is written
-- directly here: this service owns the keys and publishes api_key.* for everyone else.

CREATE TABLE tenants (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    created_at timestamptz NOT NULL
);

CREATE TABLE test_clocks (
    id          text PRIMARY KEY,
    tenant_id   text NOT NULL,
    environment text NOT NULL CHECK (environment = 'test'),
    name        text,
    frozen_time timestamptz NOT NULL,
    status      text NOT NULL DEFAULT 'ready' CHECK (status IN ('ready')),
    created_at  timestamptz NOT NULL
);
CREATE INDEX test_clocks_scope ON test_clocks (tenant_id, environment, id);

CREATE TABLE customers (
    id            text PRIMARY KEY,
    tenant_id     text NOT NULL,
    environment   text NOT NULL CHECK (environment IN ('test', 'live')),
    external_id   text,
    name          text,
    email         text,
    currency      text,
    test_clock_id text REFERENCES test_clocks (id),
    metadata      jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL,
    -- NULLs are distinct: customers without an external id never collide
    CONSTRAINT customers_external_id UNIQUE (tenant_id, environment, external_id)
);
CREATE INDEX customers_scope ON customers (tenant_id, environment, id);
CREATE INDEX customers_clock ON customers (test_clock_id) WHERE test_clock_id IS NOT NULL;

CREATE TABLE meters (
    id          text PRIMARY KEY,
    tenant_id   text NOT NULL,
    environment text NOT NULL CHECK (environment IN ('test', 'live')),
    code        text NOT NULL,
    name        text,
    aggregation text NOT NULL CHECK (aggregation IN ('sum', 'count', 'max')),
    field       text,
    created_at  timestamptz NOT NULL,
    CONSTRAINT meters_code UNIQUE (tenant_id, environment, code)
);

-- A plan is immutable once created; its charges live with it.
CREATE TABLE plans (
    id               text PRIMARY KEY,
    tenant_id        text NOT NULL,
    environment      text NOT NULL CHECK (environment IN ('test', 'live')),
    code             text NOT NULL,
    name             text NOT NULL,
    currency         text NOT NULL,
    billing_interval text NOT NULL CHECK (billing_interval IN ('day', 'week', 'month', 'year')),
    interval_count   int NOT NULL CHECK (interval_count >= 1),
    charges          jsonb NOT NULL,
    created_at       timestamptz NOT NULL,
    CONSTRAINT plans_code UNIQUE (tenant_id, environment, code)
);

-- period_index counts the periods that have ended; each boundary is computed from
-- started_at (the anchor), and current_period_* are stored for queries.
CREATE TABLE subscriptions (
    id                   text PRIMARY KEY,
    tenant_id            text NOT NULL,
    environment          text NOT NULL CHECK (environment IN ('test', 'live')),
    customer_id          text NOT NULL REFERENCES customers (id),
    plan_id              text NOT NULL REFERENCES plans (id),
    status               text NOT NULL CHECK (status IN ('active', 'past_due', 'canceled')),
    started_at           timestamptz NOT NULL,
    period_index         int NOT NULL DEFAULT 0,
    current_period_start timestamptz NOT NULL,
    current_period_end   timestamptz NOT NULL,
    test_clock_id        text REFERENCES test_clocks (id),
    created_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_scope ON subscriptions (tenant_id, environment, id);
CREATE INDEX subscriptions_customer ON subscriptions (customer_id, id);
CREATE INDEX subscriptions_clock ON subscriptions (test_clock_id, current_period_end)
    WHERE test_clock_id IS NOT NULL;
-- the wall-clock renewal task's queue
CREATE INDEX subscriptions_due ON subscriptions (current_period_end)
    WHERE test_clock_id IS NULL AND status IN ('active', 'past_due');
