-- Invoicing owns invoices, their lines and invoice numbers.

CREATE TABLE invoices (
    id              text PRIMARY KEY,               -- inv_<ULID>
    tenant_id       text NOT NULL,
    environment     text NOT NULL CHECK (environment IN ('test', 'live')),
    number          text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('subscription_create', 'subscription_cycle')),
    customer_id     text NOT NULL,
    subscription_id text NOT NULL,
    status          text NOT NULL
                    CHECK (status IN ('draft', 'open', 'paid', 'void', 'uncollectible')),
    currency        text NOT NULL,
    subtotal        bigint NOT NULL,
    total           bigint NOT NULL,
    amount_due      bigint NOT NULL,
    amount_paid     bigint NOT NULL DEFAULT 0,
    period_start    timestamptz NOT NULL,
    period_end      timestamptz NOT NULL,
    issued_at       timestamptz NOT NULL,           -- business time (a test clock's in test mode)
    paid_at         timestamptz,
    payment_id      text,
    test_clock_id   text,
    created_at      timestamptz NOT NULL,           -- business time, as issued_at
    -- Redelivery (or a republished event with a new id) can never bill a period twice.
    CONSTRAINT invoices_once_per_period UNIQUE (subscription_id, period_start, kind),
    CONSTRAINT invoices_number_unique UNIQUE (tenant_id, environment, number)
);
CREATE INDEX invoices_customer ON invoices (tenant_id, environment, customer_id, id DESC);
CREATE INDEX invoices_subscription ON invoices (tenant_id, environment, subscription_id, id DESC);
CREATE INDEX invoices_list ON invoices (tenant_id, environment, id DESC);

CREATE TABLE invoice_lines (
    id           text PRIMARY KEY,                   -- il_<ULID>
    invoice_id   text NOT NULL REFERENCES invoices (id),
    position     int NOT NULL,
    type         text NOT NULL CHECK (type IN ('fixed', 'usage')),
    description  text NOT NULL,
    charge_id    text NOT NULL,
    quantity     numeric NOT NULL,
    unit_price   numeric NOT NULL,
    amount       bigint NOT NULL,
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL,
    UNIQUE (invoice_id, position)
);

-- Gapless numbers: the counter row is incremented in the transaction that creates the invoice,
-- so a rolled-back invoice gives its number back and numbers never skip.
CREATE TABLE invoice_number_counters (
    tenant_id   text NOT NULL,
    environment text NOT NULL,
    last_number bigint NOT NULL,
    PRIMARY KEY (tenant_id, environment)
);

-- Payment outcomes applied to invoices, one row per payment outcome: a payment event seen
-- again (even under another event id) is a no-op by this key.
CREATE TABLE invoice_payment_outcomes (
    payment_id   text NOT NULL,
    outcome      text NOT NULL CHECK (outcome IN ('succeeded', 'failed')),
    invoice_id   text NOT NULL,
    amount       bigint NOT NULL,
    failure_code text,
    occurred_at  timestamptz NOT NULL,
    PRIMARY KEY (payment_id, outcome)
);
