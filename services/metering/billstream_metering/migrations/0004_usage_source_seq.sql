-- Where each usage event sits in ingestion's log. A period close sweeps only the usage before
-- it in that log (source_seq below the close's sequence): usage accepted after a close — even
-- if metering applied it before the close task ran — is billed by the next close, never by
-- this one. That makes which close bills an event a fact of the log, which ingestion uses to
-- refuse corrections of billed usage. Rows from before this column (NULL) are swept as before.
ALTER TABLE usage_records ADD COLUMN IF NOT EXISTS source_seq bigint;
