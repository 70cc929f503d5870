"""Settings of the ingestion service (env `BILLSTREAM_INGESTION_X`, falling back to
`BILLSTREAM_X`)."""

from __future__ import annotations

from pydantic import Field

from billstream_contracts.topics import USAGE_RAW

from billstream_runtime.settings import ServiceSettings, load_settings


class IngestionSettings(ServiceSettings):
    service_name: str = "ingestion"
    # Two processes by default: one Python process saturates one core at about 20,000 events/s
    # (see bench/README.md); a second uses what PostgreSQL and the broker leave.
    workers: int = 2
    # How long one request waits, once, for a just-created meter to reach this service's
    # projection before rejecting its events as `unknown_meter`. Short: ingest is a hot path.
    projection_wait_s: float = 1.0
    max_batch_events: int = 1000
    max_body_bytes: int = 5 * 1024 * 1024
    # Customers and meters each process remembers while their scope's catalog is unchanged
    # (catalog.py; some 200 bytes each). 0: ask the read models on every request.
    catalog_cache_entries: int = Field(100_000, ge=0)
    max_properties_bytes: int = 8 * 1024
    # Deduplication window: an idempotency key is unique for at least this long, and events
    # timestamped before `now - window` are rejected (so a resend after the key expired can
    # never be counted again). At least 35 days: a monthly period plus late corrections.
    dedup_window_days: int = Field(35, ge=35)
    # Events timestamped further than this in the future are rejected.
    future_tolerance_s: int = Field(300, ge=0)
    # How often expired idempotency keys are purged, and how many per statement.
    key_purge_interval_s: float = 3600.0
    key_purge_batch: int = 10_000
    # Backpressure: answer 503 + Retry-After (HTTP) or pause the Kafka input when more than
    # this many bytes of accepted events wait for the relay to publish them (64 MiB as
    # stored: about a million usage events, compressed; seconds of the relay's work) ...
    max_relay_lag_bytes: int = 64 * 1024 * 1024
    # ... or when this many events are being ingested at once by this process.
    max_inflight_events: int = 16_000
    retry_after_s: int = 1
    # The relay reads at most this many bytes of the log per round (rows of usage batches are
    # up to 256 KiB; 16 MiB rounds cost some 40 MB of RSS and no throughput).
    relay_batch_bytes: int = 4 * 1024 * 1024
    # Accepted usage is logged and published as `usage.batch_accepted` events of at most this
    # much JSON each (keep it well under the broker's message size limit).
    accepted_batch_max_bytes: int = Field(256 * 1024, ge=16 * 1024, le=768 * 1024)
    # Envelopes in the usage log of at least this many bytes are stored compressed by zstd,
    # made by this process (event_log.envelope_codec; messaging migration 0009); 0 leaves
    # them to PostgreSQL's own compression, readable in SQL but about ten times the CPU, in
    # the server and under the log's head lock (bench/README.md).
    log_zstd_min_bytes: int = Field(8 * 1024, ge=0)
    # Kafka input (`billstream.usage.raw`): consume it in this process.
    raw_input_enabled: bool = True
    raw_topic: str = USAGE_RAW
    raw_max_records: int = 5_000
    # One record holds one event: a value larger than this is rejected (`event_too_large`).
    raw_max_record_bytes: int = 64 * 1024


def load() -> IngestionSettings:
    return load_settings("ingestion", IngestionSettings)
