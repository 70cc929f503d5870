-- Usage corrections: `usage.voided` and `usage.amended` on ingestion's log, applied by consumer
-- metering.usage (see service.correct_usage and domain.correction_outcome).
--
-- The accepted row stays in usage_records and is corrected in place; every correction is also
-- kept in usage_corrections (the history), so the original stays visible:
--   voided_at          a void's business time (its envelope's occurred_at). A voided row counts
--                      nowhere (GET /v1/usage, sum/count/max, the sweep) and keeps its original
--                      quantity. It is excluded from sweeps, not marked summarized (summary_id
--                      stays NULL), and a void is final (nothing un-voids it), so it is never
--                      billed.
--   original_quantity  the quantity as accepted, set by the first amend (NULL: never amended).
--                      quantity, value and properties are then the amended ones (value by the
--                      meter's rule; properties kept only while the meter is unknown, as for an
--                      accepted event).
--   correction_id, correction_seq
--                      the last correction applied and its sequence in the source's log: an
--                      amend with a lower sequence than the one applied is superseded, so the
--                      corrections of one event win in log order whatever order they arrive in.
--
-- usage_corrections: one row per correction (correction_id; redelivery is a no-op), with what
-- it carried, the quantity it replaced, and its status:
--   pending     its usage row has not arrived here yet; applied when it does (insert path) or
--               by the close task's reconciliation (two partitions racing);
--   applied     the row carries it;
--   superseded  a later correction of the event (higher sequence), or a void, already decided;
--   billed      the row had already been billed by a period summary: not applied (a logged
--               warning), so a billed period never changes. Ingestion only corrects unbilled
--               usage, so this is defensive.
-- It is part of the usage consumer's read model: emptied by `rebuild usage` and refilled by
-- replay with the same outcomes (see usage_summary_items.correction_seq).
--
-- usage_summary_items.correction_seq: the sequence of the last correction the billed row
-- carried when it was swept (NULL: none). metering's own state like the rest of that table: a
-- replayed correction of a billed row is applied iff its sequence is at most that one, so a
-- rebuild re-applies exactly the corrections that were billed and refuses the others again.
ALTER TABLE usage_records ADD COLUMN IF NOT EXISTS voided_at timestamptz;
ALTER TABLE usage_records ADD COLUMN IF NOT EXISTS original_quantity numeric;
ALTER TABLE usage_records ADD COLUMN IF NOT EXISTS correction_id text;
ALTER TABLE usage_records ADD COLUMN IF NOT EXISTS correction_seq bigint;

ALTER TABLE usage_summary_items ADD COLUMN IF NOT EXISTS correction_seq bigint;

CREATE TABLE IF NOT EXISTS usage_corrections (
    correction_id     text PRIMARY KEY,
    event_id          text NOT NULL,        -- the envelope that carried it
    tenant_id         text NOT NULL,
    environment       text NOT NULL,
    usage_id          text NOT NULL,
    kind              text NOT NULL CHECK (kind IN ('void', 'amend')),
    source            text NOT NULL,
    sequence          bigint NOT NULL,      -- its position in the source's log
    occurred_at       timestamptz NOT NULL,
    quantity          numeric,              -- amend: the new quantity
    properties        jsonb,                -- amend: the new properties
    reason            text,
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'applied', 'superseded', 'billed')),
    previous_quantity numeric,              -- the row's quantity when this was decided
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS usage_corrections_by_usage ON usage_corrections (usage_id, sequence);
CREATE INDEX IF NOT EXISTS usage_corrections_pending
    ON usage_corrections (usage_id) WHERE status = 'pending';
