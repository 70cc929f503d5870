"""The composition root of the subscription service."""

from __future__ import annotations

from pathlib import Path

from billstream_contracts.topics import INVOICING_EVENTS
from billstream_messaging import EventConsumer, ServiceHost
from billstream_subscription.endpoints import routers
from billstream_subscription.handlers import HANDLERS
from billstream_subscription.settings import SubscriptionSettings, get_settings
from billstream_subscription.tasks import renew_subscriptions

MIGRATIONS = Path(__file__).parent / "migrations"


def build(settings: SubscriptionSettings | None = None) -> ServiceHost:
    settings = settings or get_settings()
    host = ServiceHost(
        settings=settings,
        title="Billstream subscription API",
        migrations=MIGRATIONS,
        routers=routers,
        tasks=[renew_subscriptions],
        # The `billing` consumer only updates this service's own aggregates (subscriptions),
        # which are not rebuildable projections: there is no read model to rebuild. It also
        # does not consume api_key.* events: this service writes `api_keys` itself.
        read_models={},
    )
    host.consumers.append(EventConsumer(
        name="billing", topics=[INVOICING_EVENTS], handlers=HANDLERS, settings=settings,
        metrics=host.metrics, store=host.store,
    ))
    return host
