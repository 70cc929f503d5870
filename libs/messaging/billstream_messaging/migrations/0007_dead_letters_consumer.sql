-- A consumer's dead letters, found without reading every consumer's (redrive; metering looks
-- for the ones holding period closes on every pass).
CREATE INDEX IF NOT EXISTS dead_letters_consumer ON dead_letters (consumer, event_id, id);
