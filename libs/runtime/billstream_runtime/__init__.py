"""Service runtime shared by every Billstream service: settings, logging, telemetry, metrics,
database pool and migrations, the HTTP app factory (errors, auth, idempotency) and the
service runner."""
