"""The composition root of metering: `build(settings) -> ServiceHost`."""

from __future__ import annotations

from pathlib import Path

from billstream_contracts.topics import USAGE_ACCEPTED
from billstream_messaging import AUTH_TOPIC, EventConsumer, EventStore, ServiceHost
from billstream_metering.endpoints import router
from billstream_metering.handlers import (
    CATALOG_HANDLERS,
    CATALOG_READ_MODEL,
    USAGE_HANDLERS,
    USAGE_READ_MODEL,
)
from billstream_metering.settings import MeteringSettings, load
from billstream_metering.tasks import close_periods

MIGRATIONS = Path(__file__).parent / "migrations"


def build(settings: MeteringSettings | None = None) -> ServiceHost:
    settings = settings or load()
    store = EventStore("metering")  # billstream.metering.events
    name = settings.service_name
    host = ServiceHost(
        settings=settings, title="Billstream metering", migrations=MIGRATIONS,
        routers=[router], store=store, tasks=[close_periods],
        read_models={f"{name}.usage": USAGE_READ_MODEL, f"{name}.catalog": CATALOG_READ_MODEL},
    )
    for consumer_name, topic, handlers in (("usage", USAGE_ACCEPTED, USAGE_HANDLERS),
                                           ("catalog", AUTH_TOPIC, CATALOG_HANDLERS)):
        host.consumers.append(EventConsumer(
            name=consumer_name, topics=[topic], handlers=handlers, settings=settings,
            metrics=host.metrics, store=store,
        ))
    return host
