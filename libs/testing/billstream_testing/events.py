"""Publish contract events straight onto a topic, as another service's relay would, so a
service can be tested without the services it listens to."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

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


async def publish(bootstrap: str, topic: str, *envelopes: Envelope) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for env in envelopes:
            await producer.send_and_wait(
                topic, env.model_dump_json().encode(), key=env.key.encode(),
                headers=[("event_type", env.type.encode())],
            )
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
