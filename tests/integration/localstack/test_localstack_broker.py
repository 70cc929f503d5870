"""TansuBroker for real: topics from the catalogue, produce/consume, restart empty."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from billstream_contracts.topics import TOPICS, TopicSpec
from billstream_localstack.broker import TansuBroker, TopicMismatchError, ensure_topics

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[TansuBroker]:
    broker = TansuBroker(log_path=tmp_path / "tansu.log")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def _partition_counts(bootstrap: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = await admin.list_topics()
        described = await admin.describe_topics(names) if names else []
        return {topic["topic"]: len(topic["partitions"]) for topic in described}
    finally:
        await admin.close()


async def test_ensure_topics_creates_the_catalogue_idempotently(broker: TansuBroker) -> None:
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    await ensure_topics(broker.bootstrap)
    await ensure_topics(broker.bootstrap)
    assert await _partition_counts(broker.bootstrap) == {t.name: t.partitions for t in TOPICS}


async def test_produce_and_consume(broker: TansuBroker) -> None:
    topic = TopicSpec("localstack.test.roundtrip", 2)
    await ensure_topics(broker.bootstrap, [topic])
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for n in range(10):
            await producer.send_and_wait(topic.name, f"v{n}".encode(), key=f"k{n % 3}".encode())
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic.name,
        bootstrap_servers=broker.bootstrap,
        group_id="localstack-test",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    received: list[bytes] = []
    try:
        while len(received) < 10:
            batches = await consumer.getmany(timeout_ms=10_000)
            assert batches, f"no more messages after {len(received)}"
            received += [msg.value for msgs in batches.values() for msg in msgs if msg.value]
    finally:
        await consumer.stop()
    assert sorted(received) == sorted(f"v{n}".encode() for n in range(10))


async def test_restart_comes_back_empty_on_the_same_port(broker: TansuBroker) -> None:
    await ensure_topics(broker.bootstrap)
    port = broker.port
    broker.restart()
    assert broker.port == port
    assert broker.running
    assert await _partition_counts(broker.bootstrap) == {}
    await ensure_topics(broker.bootstrap)
    assert len(await _partition_counts(broker.bootstrap)) == len(TOPICS)


async def test_a_topic_auto_created_by_a_producer_is_reported(broker: TansuBroker) -> None:
    """Tansu creates an unknown topic on produce with its own partition count: a client that
    produces before ensure_topics leaves a topic that ensure_topics cannot fix."""
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        await producer.send_and_wait("localstack.test.early", b"too early")
    finally:
        await producer.stop()
    with pytest.raises(TopicMismatchError, match=r"localstack\.test\.early has \d+ partitions"):
        await ensure_topics(broker.bootstrap, [TopicSpec("localstack.test.early", 1)], strict=True)


def test_kill_and_start_again(broker: TansuBroker) -> None:
    broker.kill()
    assert not broker.running
    broker.start()
    assert broker.running
