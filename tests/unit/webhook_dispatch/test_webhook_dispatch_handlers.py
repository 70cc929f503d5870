"""The `events` consumer's handlers, without I/O: which types are handled and what a public
type in a non-public version does (nothing)."""

from __future__ import annotations

from billstream_contracts import all_event_types
from billstream_contracts.topics import PUBLIC_TOPICS, SUBSCRIPTION_EVENTS
from billstream_messaging import API_KEY_HANDLERS, EventContext
from billstream_testing.events import envelope
from billstream_webhook_dispatch.bootstrap import build
from billstream_webhook_dispatch.handlers import public_event_handlers
from billstream_webhook_dispatch.settings import settings_from_env


class ExplodingConnection:
    """A connection that must not be used."""

    def __getattr__(self, name):
        raise AssertionError(f"the handler touched the database ({name})")


def test_a_handler_per_public_type_only():
    handlers = public_event_handlers()
    public = {t for (t, _v), m in all_event_types().items() if m.public}
    assert set(handlers) == public
    assert not set(handlers) & {"api_key.created", "api_key.revoked", "tenant.created",
                                "usage.accepted"}


async def test_unknown_version_of_a_public_type_is_skipped_without_io():
    env = envelope({"invoice": {}}, type="invoice.paid", version=99, tenant_id="ten_1")
    handler = public_event_handlers()["invoice.paid"]
    await handler(EventContext(ExplodingConnection(), env, None, None))  # type: ignore[arg-type]


def test_bootstrap_consumes_every_public_topic_and_projects_keys():
    host = build(settings_from_env({}))
    [consumer] = host.consumers
    assert consumer.name == "webhook_dispatch.events"
    assert set(consumer.topics) == set(PUBLIC_TOPICS) and SUBSCRIPTION_EVENTS in consumer.topics
    for key_type in API_KEY_HANDLERS:
        assert consumer.handlers[key_type] is API_KEY_HANDLERS[key_type]
    assert host.read_models == {"webhook_dispatch.events": ["events"]}
