-- Per-source progress queries ("has this consumer applied every event of a source up to
-- sequence N?") read the inbox by source and sequence.
CREATE INDEX IF NOT EXISTS inbox_source_sequence ON inbox (consumer, source, sequence);
