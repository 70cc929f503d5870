"""Typed settings with a per-service prefix.

Every field `x` of a service's settings is read from `BILLSTREAM_<SERVICE>_X`, falling back to
the shared `BILLSTREAM_X`, then to the field default. So one environment can configure six
services at once (`BILLSTREAM_KAFKA_BOOTSTRAP`) while each keeps its own database
(`BILLSTREAM_INVOICING_DATABASE_URL`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

S = TypeVar("S", bound="ServiceSettings")


class ServiceSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    service_name: str
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    kafka_bootstrap: str = "127.0.0.1:9092"
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    # Processes serving this service (pre-forked, sharing the HTTP socket; see
    # billstream_messaging.host.serve_workers). Each is a full replica.
    workers: int = 1
    # Python's garbage collector in a serving process: a collection per this many new
    # container objects (Python's default, 700, cost ingestion a quarter of its CPU); what is
    # alive at start is frozen. 0 keeps Python's defaults. See messaging.host.tune_gc.
    gc_threshold: int = Field(50_000, ge=0)
    admin_token: str = ""
    log_level: str = "INFO"
    log_json: bool = True
    otel_exporter_otlp_endpoint: str = ""
    db_pool_min: int = 2
    db_pool_max: int = 10
    # outbox relay
    relay_batch_size: int = 1000  # rows per publish round …
    relay_batch_bytes: int = 16 * 1024 * 1024  # … and at most this many stored bytes (one
    # row more when a single row is larger)
    relay_poll_interval_s: float = 1.0
    relay_heartbeat_interval_s: float = 2.0
    # consumers
    consumer_max_records: int = 500
    consumer_max_attempts: int = 5
    consumer_retry_backoff_s: float = 0.2
    consumer_group_prefix: str = "billstream"
    # Kafka group membership. Apache Kafka refuses session timeouts under its
    # group.min.session.timeout.ms (6 s by default); the embedded broker answers a JoinGroup
    # after half the session timeout, so the local stack uses 2 s to start in about 1 s.
    consumer_session_timeout_ms: int = 10_000
    consumer_heartbeat_interval_ms: int = 3_000
    # Whether consumers send LeaveGroup (on stop, and on the other occasions aiokafka would;
    # see billstream_messaging.groups): keep it with Apache Kafka; the local stack turns it
    # off for the embedded broker (Tansu 0.6.0), which can lose a group for good when its
    # leader leaves while the group re-forms.
    consumer_leave_group: bool = True
    # Idempotency-Key: on routes whose effect deduplicates itself (usage ingestion), a key
    # whose request has held it this long is taken over by a retry (its request died)
    idempotency_lease_s: float = Field(60.0, gt=0)
    # read-your-writes: how long an API call waits for a projection to catch up
    projection_wait_s: float = 5.0

    @property
    def env_prefix(self) -> str:
        return f"BILLSTREAM_{self.service_name.upper()}_"


def load_settings(
    service: str, cls: type[S] = ServiceSettings, environ: Mapping[str, str] | None = None
) -> S:
    env = os.environ if environ is None else environ
    prefix = f"BILLSTREAM_{service.upper()}_"
    values: dict[str, Any] = {"service_name": service}
    for name in cls.model_fields:
        if name == "service_name":
            continue
        for key in (prefix + name.upper(), "BILLSTREAM_" + name.upper()):
            if key in env:
                values[name] = env[key]
                break
    return cls.model_validate(values)
