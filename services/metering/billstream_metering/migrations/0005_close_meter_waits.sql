-- A close whose plan names a meter metering does not know yet waits for its meter.created
-- (see service.close_due_periods): the codes it waits for, set when the close is found
-- waiting and cleared by learn_meter when one of them arrives, so a pass over the closes
-- skips the waiting ones with one condition instead of looking at each again.
ALTER TABLE pending_closes ADD COLUMN IF NOT EXISTS waits_for_meters text[];
