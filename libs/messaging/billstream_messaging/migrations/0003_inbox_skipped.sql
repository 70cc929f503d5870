-- Events of a type a consumer has no handler for are recorded as 'skipped': a per-source
-- progress query then sees no hole, and a later version of the consumer that handles the type
-- still applies them when they are redelivered or replayed ('skipped' is upgraded to 'applied').
ALTER TABLE inbox DROP CONSTRAINT IF EXISTS inbox_status_check;
ALTER TABLE inbox ADD CONSTRAINT inbox_status_check
    CHECK (status IN ('applied', 'dead_lettered', 'skipped'));
