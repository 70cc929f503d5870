-- Stored envelopes are compressed by PostgreSQL (TOAST). Its default method, pglz, is slow: a
-- usage batch's envelope (1,000 usages, about 220 KB) costs about 3 ms of the server's CPU to
-- compress, some 3 µs per ingested event (bench/README.md). lz4 compresses as well for a
-- fraction of that. It needs PostgreSQL 14 or later built with lz4 (the postgres image and
-- most distributions' packages are; the embedded server is not): where it is missing this
-- leaves the default. It applies to rows written from now on (no rewrite), but it takes the
-- table's exclusive lock: behind a long transaction on the log (a dump, a replay) it gives up
-- after a few seconds rather than queue every reader and writer behind it, and the log keeps
-- pglz (`ALTER TABLE event_log ALTER COLUMN envelope SET COMPRESSION lz4` by hand later).
SET LOCAL lock_timeout = '5s';
DO $$
BEGIN
    EXECUTE 'ALTER TABLE event_log ALTER COLUMN envelope SET COMPRESSION lz4';
EXCEPTION
    WHEN feature_not_supported OR syntax_error OR invalid_parameter_value
         OR lock_not_available THEN
        RAISE NOTICE 'event_log.envelope keeps its compression: %', SQLERRM;
END
$$;
SET LOCAL lock_timeout = 0;
