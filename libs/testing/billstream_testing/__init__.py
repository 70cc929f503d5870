"""Test helpers: real PostgreSQL and Kafka-protocol broker fixtures, a webhook receiver,
and condition waiters (tests wait on conditions, never on fixed sleeps)."""
