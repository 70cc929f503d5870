-- The dedup window. A key is kept until no resend of its event could be accepted any more:
-- events older than `now - dedup_window` are rejected, so once the event's own timestamp
-- (event_time) and its receipt (created_at) are both further back than the window, the key
-- can go (see repository.purge_expired_keys). event_id finds the usage.accepted event in the
-- log (a correction checks whether a period close already billed it); customer is the
-- reference as sent.
ALTER TABLE usage_keys ADD COLUMN IF NOT EXISTS event_id text;
ALTER TABLE usage_keys ADD COLUMN IF NOT EXISTS customer text;
ALTER TABLE usage_keys ADD COLUMN IF NOT EXISTS event_time timestamptz;
UPDATE usage_keys SET event_time = created_at WHERE event_time IS NULL;
ALTER TABLE usage_keys ALTER COLUMN event_time SET NOT NULL;
-- BRIN: nearly free to maintain on an append-mostly table, enough to find the expired range.
CREATE INDEX IF NOT EXISTS usage_keys_created_brin ON usage_keys USING brin (created_at);
