"""Topic names of the event backbone and their partition counts.

One output topic per service, keyed by ``tenant:aggregate`` so that one aggregate's events
stay in order. High-volume usage has its own topics.
"""

from __future__ import annotations

from dataclasses import dataclass

USAGE_RAW = "billstream.usage.raw"  # external producers write usage here (see docs/ingestion)
USAGE_ACCEPTED = "billstream.usage.accepted"  # ingestion's accepted-usage log
USAGE_REJECTED = "billstream.usage.rejected"  # Kafka-path rejections, with the reason
DEAD_LETTER = "billstream.dlq"  # messages a consumer gave up on, with the reason
HEARTBEAT = "billstream._heartbeat"  # relays detect a broker that lost its data


def service_topic(service: str) -> str:
    """The output topic of a service: ``billstream.<service>.events``."""
    return f"billstream.{service}.events"


SUBSCRIPTION_EVENTS = service_topic("subscription")
METERING_EVENTS = service_topic("metering")
INVOICING_EVENTS = service_topic("invoicing")
PAYMENTS_EVENTS = service_topic("payments")
WEBHOOK_DISPATCH_EVENTS = service_topic("webhook_dispatch")


#: Keep every record: a consumer group rebuilt by replay (or a new one) reads the whole log.
FOREVER = -1


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int | None = None  # None: the broker's default (7 days on Apache Kafka)


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(USAGE_RAW, 8),
    TopicSpec(USAGE_ACCEPTED, 8, FOREVER),
    TopicSpec(USAGE_REJECTED, 4),
    TopicSpec(SUBSCRIPTION_EVENTS, 4, FOREVER),
    TopicSpec(METERING_EVENTS, 4, FOREVER),
    TopicSpec(INVOICING_EVENTS, 4, FOREVER),
    TopicSpec(PAYMENTS_EVENTS, 4, FOREVER),
    TopicSpec(WEBHOOK_DISPATCH_EVENTS, 4, FOREVER),
    TopicSpec(DEAD_LETTER, 1),
    TopicSpec(HEARTBEAT, 1),
)

#: Topics whose events are public: stored in the public event log and sent to webhooks.
PUBLIC_TOPICS: tuple[str, ...] = (
    SUBSCRIPTION_EVENTS,
    METERING_EVENTS,
    INVOICING_EVENTS,
    PAYMENTS_EVENTS,
)
