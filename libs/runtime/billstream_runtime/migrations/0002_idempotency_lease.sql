-- When the request holding an `in_progress` key started (or took it over), and a token naming
-- that holder. On a route whose effect deduplicates itself (idempotency.rerunnable), a key held
-- longer than the lease is taken over by a retry: its request died with its process. The
-- token fences the old holder: should it still be alive, its answer no longer overwrites the
-- new holder's, nor can it release the key the new holder has.
ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS locked_at timestamptz;
ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS lease_id text;
