"""Publish contract events straight onto a topic, as another service's relay would, so a
service can be tested without the services it listens to."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from pydantic import field_validator

from billstream_contracts import Envelope, EventData
from billstream_runtime.ids import new_id
from billstream_testing.waiting import eventually

_seq = itertools.count(1)


def envelope(
    data: EventData | dict[str, Any],
    *,
    tenant_id: str,
    environment: str = "test",
    source: str = "subscription",
    aggregate_type: str = "test",
    aggregate_id: str | None = None,
    type: str | None = None,
    version: int = 1,
    occurred_at: datetime | None = None,
    event_id: str | None = None,
    sequence: int | None = None,
) -> Envelope:
    now = datetime.now(UTC)
    if isinstance(data, EventData):
        type, version, payload = data.event_type, data.version, data.model_dump(mode="json")
    else:
        payload = data
    assert type, "a dict payload needs a type"
    return Envelope(
        id=event_id or new_id("evt"), type=type, version=version, tenant_id=tenant_id,
        environment=environment, occurred_at=occurred_at or now, recorded_at=now, source=source,
        sequence=sequence or next(_seq), aggregate_type=aggregate_type,
        aggregate_id=aggregate_id or new_id("agg"), data=payload,
    )


def relay_headers(env: Envelope) -> list[tuple[str, bytes]]:
    """The headers a relay writes with this event, trace context aside
    (billstream_messaging.relay.record_headers; test_backbone checks they agree)."""
    return [("event_type", env.type.encode()), ("event_version", str(env.version).encode()),
            ("event_id", env.id.encode()), ("event_source", env.source.encode()),
            ("event_sequence", str(env.sequence).encode())]


class AnyCaseEnvironmentEnvelope(Envelope):
    """A later version's envelope, for tests of redrive: it reads an environment in any case,
    which this version's refuses (a record this version cannot read, then a fix)."""

    @field_validator("environment", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


async def publish(bootstrap: str, topic: str, *envelopes: Envelope) -> None:
    await publish_records(bootstrap, topic, *(
        (env.key.encode(), env.model_dump_json().encode(), relay_headers(env))
        for env in envelopes))


async def publish_records(bootstrap: str, topic: str,
                          *records: tuple[bytes | None, bytes, list[tuple[str, bytes]]]) -> None:
    """(key, value, headers) records, in order, each acknowledged by the broker."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


async def read_topic(
    bootstrap: str,
    topic: str,
    n: int,
    match: Callable[[ConsumerRecord], bool] = lambda _record: True,
    timeout: float = 30.0,
) -> list[ConsumerRecord]:
    """The first `n` records of `topic` (from its beginning, every partition) that `match`.
    Reads by assignment, with no consumer group, so nothing waits on a group join."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    found: list[ConsumerRecord] = []
    try:
        partitions = await eventually(
            lambda: _partitions(consumer, topic), timeout=timeout, message=f"topic {topic}"
        )
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning()

        async def enough() -> bool:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                found.extend(r for r in records if match(r))
            return len(found) >= n

        await eventually(enough, timeout=timeout, interval=0,
                         message=f"{n} matching records on {topic}")
    finally:
        await consumer.stop()
    return found[:n]


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int] | None:
    await consumer._client.force_metadata_update()  # noqa: SLF001 - fresh topic metadata
    return consumer.partitions_for_topic(topic)
