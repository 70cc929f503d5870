-- A token naming the holder of an `in_progress` key, set when it is reserved or taken over
-- (see 0002). It fences the old holder: should it still be alive after a takeover, its answer
-- no longer overwrites the new holder's, nor can it release the key the new holder has.
ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS lease_id text;
