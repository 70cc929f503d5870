"""The composition root of ingestion: `build(settings) -> ServiceHost`."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import Counter

from billstream_contracts.topics import USAGE_ACCEPTED
from billstream_ingestion.admission import Admission
from billstream_ingestion.catalog import CatalogCache
from billstream_ingestion.endpoints import router
from billstream_ingestion.handlers import CATALOG_HANDLERS, CATALOG_READ_MODEL
from billstream_ingestion.raw_input import RawInput
from billstream_ingestion.settings import IngestionSettings, load
from billstream_ingestion.tasks import purge_keys
from billstream_messaging import AUTH_TOPIC, EventConsumer, EventStore, ServiceHost
from billstream_runtime import db

MIGRATIONS = Path(__file__).parent / "migrations"


def build(settings: IngestionSettings | None = None) -> ServiceHost:
    settings = settings or load()
    # the usage log is high volume: rows keep only the published envelope, compressed here
    # from `log_zstd_min_bytes` on (see EventStore)
    store = EventStore("ingestion", topic=USAGE_ACCEPTED, keep_data=False,
                       zstd_min_bytes=settings.log_zstd_min_bytes)
    host = ServiceHost(
        settings=settings, title="Billstream ingestion", migrations=MIGRATIONS,
        routers=[router], store=store, tasks=[purge_keys],
        read_models={f"{settings.service_name}.catalog": CATALOG_READ_MODEL},
        connection_setup=db.timestamptz_micros,  # usage keys' event_time as ints (KeyClaim)
    )
    host.consumers.append(EventConsumer(
        name="catalog", topics=[AUTH_TOPIC], handlers=CATALOG_HANDLERS, settings=settings,
        metrics=host.metrics, store=store,
    ))
    host.metrics.custom["usage_events"] = Counter(
        "billstream_usage_events_total", "Usage events ingested, by channel and outcome",
        ["channel", "outcome"], registry=host.metrics.registry,
    )
    # per process (each worker its own): what the read models said, while it stands
    host.app.state.catalog = (CatalogCache(settings.catalog_cache_entries)
                              if settings.catalog_cache_entries else None)
    admission = Admission(settings, pool=lambda: host.pool)
    host.app.state.admission = admission
    if settings.raw_input_enabled:
        async def raw_input(host: ServiceHost) -> None:
            """The Kafka input (billstream.usage.raw); restarted by the host if it fails."""
            runner = RawInput(host, admission)
            host.app.state.raw_input = runner
            await runner.run()

        host.tasks.append(raw_input)
    return host
