-- Nothing reads the log by aggregate (the relay reads by seq, consumers dedupe by id), and the
-- index cost every append a third B-tree insert: on the usage path that is ~15% of the write.
DROP INDEX IF EXISTS event_log_aggregate;
