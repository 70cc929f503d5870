-- Payments owns payment methods (gateway tokens) and payments. It projects customers and test
-- clocks from the subscription service's events (the `directory` consumer).

CREATE TABLE customers (
    customer_id   text PRIMARY KEY,
    tenant_id     text NOT NULL,
    environment   text NOT NULL CHECK (environment IN ('test', 'live')),
    test_clock_id text,
    created_at    timestamptz NOT NULL
);

CREATE TABLE test_clocks (
    test_clock_id text PRIMARY KEY,
    tenant_id     text NOT NULL,
    environment   text NOT NULL,
    frozen_time   timestamptz NOT NULL
);

CREATE TABLE payment_methods (
    id            text PRIMARY KEY,                 -- pm_<ULID>
    tenant_id     text NOT NULL,
    environment   text NOT NULL CHECK (environment IN ('test', 'live')),
    customer_id   text NOT NULL,
    gateway_token text NOT NULL,
    type          text NOT NULL CHECK (type IN ('card')),
    brand         text NOT NULL,
    last4         text NOT NULL,
    is_default    boolean NOT NULL,
    created_at    timestamptz NOT NULL
);
CREATE INDEX payment_methods_customer ON payment_methods (tenant_id, environment, customer_id, id DESC);
-- At most one default method per customer.
CREATE UNIQUE INDEX payment_methods_one_default ON payment_methods (customer_id) WHERE is_default;

CREATE TABLE payments (
    id                text PRIMARY KEY,             -- pay_<ULID>
    tenant_id         text NOT NULL,
    environment       text NOT NULL CHECK (environment IN ('test', 'live')),
    invoice_id        text NOT NULL,
    customer_id       text NOT NULL,
    amount            bigint NOT NULL CHECK (amount > 0),
    currency          text NOT NULL,
    status            text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    payment_method_id text,
    failure_code      text,
    failure_message   text,
    gateway_charge_id text,
    test_clock_id     text,
    created_at        timestamptz NOT NULL,         -- business time: the invoice's issued_at
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    settled_at        timestamptz,                  -- wall clock
    locked_until      timestamptz,                  -- the collector's lease on a pending payment
    -- One payment per invoice: a redelivered invoice.finalized can never charge twice.
    -- (Dunning retries will be attempts of this payment, not new payments.)
    CONSTRAINT payments_one_per_invoice UNIQUE (invoice_id)
);
CREATE INDEX payments_pending ON payments (id) WHERE status = 'pending';
CREATE INDEX payments_list ON payments (tenant_id, environment, id DESC);
CREATE INDEX payments_customer ON payments (tenant_id, environment, customer_id, id DESC);
