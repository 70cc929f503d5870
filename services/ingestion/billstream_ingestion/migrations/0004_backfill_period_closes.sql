-- Period closes appended before period_closes existed (their rows still carry `data`): known
-- to the correction check and to the replay guard like the later ones.
INSERT INTO period_closes (event_id, seq, tenant_id, environment, subscription_id, customer_id,
                           external_id, period_end)
SELECT id, seq, tenant_id, environment,
       data -> 'subscription' ->> 'subscription_id',
       data -> 'subscription' ->> 'customer_id',
       data -> 'subscription' ->> 'customer_external_id',
       (data ->> 'period_end')::timestamptz
  FROM event_log
 WHERE type = 'usage.period_closed' AND data IS NOT NULL
ON CONFLICT DO NOTHING;
