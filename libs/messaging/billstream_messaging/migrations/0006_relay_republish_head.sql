-- The log head when the relay last started republishing everything (a broker that lost its
-- data). Backpressure measures the backlog of new events only: head - greatest(published_seq,
-- republish_head); a republish of old events must not shut intake off.
ALTER TABLE relay_state ADD COLUMN IF NOT EXISTS republish_head bigint NOT NULL DEFAULT 0;
