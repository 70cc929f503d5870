-- The envelope as it is published, encoded once when the event is appended: the relay sends
-- these bytes as they are (no JSON decode/encode per event on the way out). `data` stays for
-- queries and is optional: a high-volume store (ingestion's usage log) writes only the
-- envelope (SELECT convert_from(envelope, 'UTF8')::jsonb -> 'data' reads it). Rows written
-- before this migration have only `data`; the relay encodes those itself.
ALTER TABLE event_log ADD COLUMN IF NOT EXISTS envelope bytea;
ALTER TABLE event_log ALTER COLUMN data DROP NOT NULL;
DO $$ BEGIN
    ALTER TABLE event_log ADD CONSTRAINT event_log_has_payload
        CHECK (data IS NOT NULL OR envelope IS NOT NULL);
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
