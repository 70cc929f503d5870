-- A pass claims closes one at a time: without these, each claim walked every waiting close
-- and, for the predecessor check, every earlier close (quadratic in the closes pending at a
-- month end). The last one serves meter_arrived.
CREATE INDEX IF NOT EXISTS pending_closes_claimable
    ON pending_closes (source, required_seq, event_id) WHERE waits_for_meters IS NULL;
CREATE INDEX IF NOT EXISTS pending_closes_subscription ON pending_closes
    (tenant_id, environment, (data -> 'subscription' ->> 'subscription_id'), required_seq);
CREATE INDEX IF NOT EXISTS pending_closes_waiting ON pending_closes (tenant_id, environment)
    WHERE waits_for_meters IS NOT NULL;
