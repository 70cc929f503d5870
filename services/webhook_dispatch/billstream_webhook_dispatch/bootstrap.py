"""The composition root of webhook_dispatch: settings, the `events` consumer, the delivery
worker, routes → a ServiceHost."""

from __future__ import annotations

from pathlib import Path

from billstream_contracts.topics import PUBLIC_TOPICS
from billstream_messaging import API_KEY_HANDLERS, AUTH_TOPIC, EventConsumer, ServiceHost
from billstream_webhook_dispatch.endpoints import router
from billstream_webhook_dispatch.handlers import public_event_handlers
from billstream_webhook_dispatch.service import dispatch_metrics
from billstream_webhook_dispatch.settings import WebhookDispatchSettings, settings_from_env
from billstream_webhook_dispatch.tasks import WebhookSender, deliver_webhooks

MIGRATIONS = Path(__file__).parent / "migrations"


def build(
    settings: WebhookDispatchSettings | None = None, *, sender: WebhookSender | None = None
) -> ServiceHost:
    """`sender` replaces the HTTP client of the delivery worker (default: httpx)."""
    settings = settings or settings_from_env()
    assert AUTH_TOPIC in PUBLIC_TOPICS
    host = ServiceHost(
        settings=settings, title="Billstream webhook dispatch", migrations=MIGRATIONS,
        routers=[router], tasks=[deliver_webhooks],
        # The public event log is a projection: a rebuild empties it and replays. Deliveries
        # are owned state and survive; replayed events find theirs (unique endpoint+event).
        read_models={"webhook_dispatch.events": ["events"]},
        state={"webhook_sender": sender},
    )
    host.consumers.append(EventConsumer(
        name="events",
        topics=PUBLIC_TOPICS,
        handlers={**public_event_handlers(dispatch_metrics(host.metrics)), **API_KEY_HANDLERS},
        settings=settings, metrics=host.metrics, store=host.store,
    ))
    return host
