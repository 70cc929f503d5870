"""The composition root of invoicing: settings, consumer, routes → a ServiceHost."""

from __future__ import annotations

from pathlib import Path

from billstream_contracts.topics import METERING_EVENTS, PAYMENTS_EVENTS
from billstream_invoicing.endpoints import router
from billstream_invoicing.handlers import BILLING_HANDLERS
from billstream_invoicing.settings import InvoicingSettings, settings_from_env
from billstream_messaging import API_KEY_HANDLERS, AUTH_TOPIC, EventConsumer, ServiceHost

MIGRATIONS = Path(__file__).parent / "migrations"


def build(settings: InvoicingSettings | None = None) -> ServiceHost:
    settings = settings or settings_from_env()
    host = ServiceHost(
        settings=settings, title="Billstream invoicing", migrations=MIGRATIONS,
        routers=[router],
        # The billing consumer writes owned state (numbered invoices, emitted events), not a
        # read model that replay could rebuild, so nothing is declared rebuildable.
        read_models={},
    )
    host.consumers.append(EventConsumer(
        name="billing",
        topics=[AUTH_TOPIC, METERING_EVENTS, PAYMENTS_EVENTS],
        handlers={**API_KEY_HANDLERS, **BILLING_HANDLERS},
        settings=settings, metrics=host.metrics, store=host.store,
    ))
    return host
