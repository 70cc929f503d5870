-- Stored envelopes are compressed by PostgreSQL (TOAST). Its default method, pglz, is slow: a
-- usage batch's envelope (1,000 usages, about 220 KB) costs about 3 ms of the server's CPU to
-- compress, some 3 µs per ingested event (bench/README.md). lz4 compresses as well for a
-- fraction of that. It needs PostgreSQL 14 or later built with lz4 (the postgres image and
-- most distributions' packages are; the embedded server is not): where it is missing this
-- leaves the default. It applies to rows written from now on.
DO $$
BEGIN
    EXECUTE 'ALTER TABLE event_log ALTER COLUMN envelope SET COMPRESSION lz4';
EXCEPTION
    WHEN feature_not_supported OR syntax_error OR invalid_parameter_value THEN
        RAISE NOTICE 'event_log.envelope keeps the default compression: %', SQLERRM;
END
$$;
