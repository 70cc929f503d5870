"""Fixtures of the metering integration tests (defined in metering_harness)."""

from metering_harness import metering  # noqa: F401
