-- A close whose plan names a meter metering does not know yet waits for its meter.created
-- (see service.close_due_periods): the codes it waits for, set when the close is found
-- waiting and cleared by learn_meter when one of them arrives, so a pass over the closes
-- skips the waiting ones with one condition instead of looking at each again.
ALTER TABLE pending_closes ADD COLUMN IF NOT EXISTS waits_for_meters text[];
-- A pass claims closes one at a time: without these, each claim walked every waiting close
-- and, for the predecessor check, every earlier close (quadratic in the closes pending at a
-- month end).
CREATE INDEX IF NOT EXISTS pending_closes_claimable ON pending_closes (source, required_seq)
    WHERE waits_for_meters IS NULL;
CREATE INDEX IF NOT EXISTS pending_closes_subscription ON pending_closes
    (tenant_id, environment, (data -> 'subscription' ->> 'subscription_id'), required_seq);
CREATE INDEX IF NOT EXISTS pending_closes_waiting ON pending_closes (tenant_id, environment)
    WHERE waits_for_meters IS NOT NULL;
