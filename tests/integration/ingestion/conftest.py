"""Fixtures of the ingestion integration tests (defined in ingestion_harness)."""

from ingestion_harness import ingestion  # noqa: F401
