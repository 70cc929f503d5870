-- How `envelope` is stored. NULL: the envelope's JSON as published. 'zstd': a zstd frame of
-- the envelope without its head '{"sequence":<seq>,' (the relay puts the head back from `seq`:
-- billstream_messaging.store.published_envelope). A store opts in for envelopes from a size
-- on (EventStore(zstd_min_bytes=...)); ingestion's usage log does: PostgreSQL's own pglz
-- costs the server about 3 µs per usage stored, under the log's head lock, where zstd
-- costs the appending process about 0.3 µs and stores fewer bytes (bench/README.md). Such
-- rows are not readable with convert_from(envelope, 'UTF8') in SQL.
-- Adding a nullable column without a default does not rewrite the table.
ALTER TABLE event_log ADD COLUMN IF NOT EXISTS envelope_codec text;
