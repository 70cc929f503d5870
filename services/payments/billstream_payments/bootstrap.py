"""The composition root of payments: settings, gateway adapter, consumers, task, routes."""

from __future__ import annotations

from pathlib import Path

from billstream_contracts.topics import INVOICING_EVENTS
from billstream_messaging import AUTH_TOPIC, EventConsumer, ServiceHost
from billstream_payments.domain import Gateway
from billstream_payments.endpoints import router
from billstream_payments.gateway import SandboxGateway
from billstream_payments.handlers import DIRECTORY_HANDLERS, INVOICE_HANDLERS
from billstream_payments.settings import PaymentsSettings, settings_from_env
from billstream_payments.tasks import collect_payments

MIGRATIONS = Path(__file__).parent / "migrations"


def make_gateway(settings: PaymentsSettings) -> Gateway:
    if settings.gateway == "sandbox":
        return SandboxGateway()
    raise ValueError(f"unknown gateway {settings.gateway!r}")


def build(settings: PaymentsSettings | None = None, gateway: Gateway | None = None
          ) -> ServiceHost:
    settings = settings or settings_from_env()
    host = ServiceHost(
        settings=settings, title="Billstream payments", migrations=MIGRATIONS,
        routers=[router], tasks=[collect_payments],
        # The directory is a pure projection: `rebuild directory` empties it and replays.
        read_models={"payments.directory": ["customers", "test_clocks", "api_keys"]},
        state={"gateway": gateway or make_gateway(settings)},
    )
    host.consumers += [
        EventConsumer(name="directory", topics=[AUTH_TOPIC], handlers=DIRECTORY_HANDLERS,
                      settings=settings, metrics=host.metrics, store=host.store),
        EventConsumer(name="invoices", topics=[INVOICING_EVENTS], handlers=INVOICE_HANDLERS,
                      settings=settings, metrics=host.metrics, store=host.store),
    ]
    return host
