"""Event store (transactional append), outbox relay, consumer runtime with inbox and dead
letters, replay, and the ServiceHost that runs a service with them."""

from billstream_messaging.consumer import (
    EventConsumer,
    EventContext,
    Handler,
    Redriven,
    dead_letter_payloads,
    unapplied_dead_letters,
)
from billstream_messaging.host import API_KEY_HANDLERS, AUTH_TOPIC, ServiceHost, run_cli
from billstream_messaging.store import Cause, EventStore, NewEvent, published_envelope

__all__ = [
    "API_KEY_HANDLERS",
    "AUTH_TOPIC",
    "Cause",
    "EventConsumer",
    "EventContext",
    "EventStore",
    "Handler",
    "NewEvent",
    "Redriven",
    "ServiceHost",
    "dead_letter_payloads",
    "published_envelope",
    "run_cli",
    "unapplied_dead_letters",
]
