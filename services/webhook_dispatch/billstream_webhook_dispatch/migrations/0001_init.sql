-- webhook_dispatch: merchant endpoints, the public event log, deliveries and their attempts.

CREATE TABLE webhook_endpoints (
    id             text PRIMARY KEY,
    tenant_id      text NOT NULL,
    environment    text NOT NULL CHECK (environment IN ('test', 'live')),
    url            text NOT NULL,
    enabled_events text[] NOT NULL,
    description    text,
    secret         text NOT NULL,  -- whsec_...: needed in clear to sign; shown only at creation
    status         text NOT NULL DEFAULT 'enabled' CHECK (status IN ('enabled', 'disabled')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    disabled_at    timestamptz
);
CREATE INDEX webhook_endpoints_scope ON webhook_endpoints (tenant_id, environment, id DESC);
CREATE INDEX webhook_endpoints_enabled ON webhook_endpoints (tenant_id, environment)
    WHERE status = 'enabled';

-- The public event log: every public event of the tenant's environments, keyed by event id.
-- `body` is the public event JSON exactly as webhooks carry it.
CREATE TABLE events (
    id          text PRIMARY KEY,
    tenant_id   text NOT NULL,
    environment text NOT NULL CHECK (environment IN ('test', 'live')),
    type        text NOT NULL,
    version     int NOT NULL,
    source      text NOT NULL,
    occurred_at timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL,
    body        bytea NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_scope ON events (tenant_id, environment, id DESC);
CREATE INDEX events_scope_type ON events (tenant_id, environment, type, id DESC);
CREATE INDEX events_scope_recorded ON events (tenant_id, environment, recorded_at);

-- One delivery per (endpoint, event): the unique key makes a redelivered event a no-op.
-- `payload` is the body to send (a copy of events.body), signed afresh on every attempt.
-- No foreign key to `events`: the event log is a read model that a rebuild may empty.
CREATE TABLE deliveries (
    id                 text PRIMARY KEY,
    tenant_id          text NOT NULL,
    environment        text NOT NULL CHECK (environment IN ('test', 'live')),
    endpoint_id        text NOT NULL REFERENCES webhook_endpoints (id),
    event_id           text NOT NULL,
    event_type         text NOT NULL,
    payload            bytea NOT NULL,
    status             text NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'sending', 'delivered', 'failed', 'canceled')),
    attempts           int NOT NULL DEFAULT 0,  -- all attempts ever made
    cycle_attempts     int NOT NULL DEFAULT 0,  -- attempts since last (re)scheduled
    next_attempt_at    timestamptz,
    locked_until       timestamptz,             -- lease of the worker sending it
    current_attempt_id text,                    -- the claim: only its result may settle it
    last_status_code   int,
    last_error         text,
    last_attempt_at    timestamptz,
    delivered_at       timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (endpoint_id, event_id)
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_leased ON deliveries (locked_until) WHERE status = 'sending';
CREATE INDEX deliveries_scope ON deliveries (tenant_id, environment, id DESC);
CREATE INDEX deliveries_event ON deliveries (event_id);

CREATE TABLE delivery_attempts (
    id            text PRIMARY KEY,
    delivery_id   text NOT NULL REFERENCES deliveries (id),
    tenant_id     text NOT NULL,
    environment   text NOT NULL,
    number        int NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    status_code   int,
    error         text,
    duration_ms   int,
    response_body text,
    UNIQUE (delivery_id, number)
);
