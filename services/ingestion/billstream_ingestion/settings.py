"""Settings of the ingestion service (env `BILLSTREAM_INGESTION_X`, falling back to
`BILLSTREAM_X`)."""

from __future__ import annotations

from billstream_runtime.settings import ServiceSettings, load_settings


class IngestionSettings(ServiceSettings):
    service_name: str = "ingestion"
    # How long one request waits, once, for a just-created meter to reach this service's
    # projection before rejecting its events as `unknown_meter`. Short: ingest is a hot path.
    projection_wait_s: float = 1.0
    max_batch_events: int = 1000
    max_body_bytes: int = 5 * 1024 * 1024
    max_properties_bytes: int = 8 * 1024


def load() -> IngestionSettings:
    return load_settings("ingestion", IngestionSettings)
