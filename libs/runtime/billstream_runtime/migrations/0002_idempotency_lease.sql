-- When the request holding an `in_progress` key started (or took it over). On a route whose
-- effect deduplicates itself (idempotency.rerunnable), a key held longer than the lease is
-- taken over by a retry: its request died with its process.
ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS locked_at timestamptz;
