-- Who holds an `in_progress` key, and since when. On a route whose effect deduplicates itself
-- (idempotency.rerunnable), a key held longer than the lease is taken over by a retry: its
-- request died with its process. locked_at is when the holder reserved or took the key;
-- lease_id names the holder and fences it: should an old holder still be alive after a
-- takeover, its answer no longer overwrites the new holder's, nor can it release the key.
ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS locked_at timestamptz;
ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS lease_id text;
