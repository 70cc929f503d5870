"""Creating the backbone's topics (idempotent). Services call it at start and a relay after it
finds the broker lost its data; the local stack calls it after (re)starting the broker.

Some brokers (the local one among them) create an unknown topic with their own partition count
as soon as a client asks for its metadata, so this must run before anyone produces. A topic that
exists with another partition count is an error for the local stack (`strict=True`) and a
warning for a service (an operator may have resized it on purpose).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from billstream_contracts.topics import TOPICS, TopicSpec

_TOPIC_ALREADY_EXISTS = 36
log = structlog.get_logger("billstream.topics")


class TopicMismatchError(RuntimeError):
    """An existing topic has another partition count than the catalogue says."""


async def ensure_topics(
    bootstrap: str,
    topics: Iterable[TopicSpec] = TOPICS,
    *,
    timeout: float = 30.0,
    replication_factor: int = 1,
    strict: bool = False,
) -> None:
    """Create the topics that are missing, with their partition counts.

    Idempotent. Retries while the broker is still starting, for up to `timeout` seconds.
    """
    specs = list(topics)
    wanted = {spec.name: spec.partitions for spec in specs}
    admin = await _connected_admin(bootstrap, timeout)
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(spec.name, spec.partitions, replication_factor, topic_configs=(
                {"retention.ms": str(spec.retention_ms)} if spec.retention_ms is not None else {}
            ))
            for spec in specs if spec.name not in existing
        ]
        if missing:
            response = await admin.create_topics(missing)
            _raise_for_topic_errors(response.topic_errors)
        wrong = await _partition_mismatches(admin, wanted)
        if wrong and strict:
            raise TopicMismatchError("; ".join(wrong))
        for problem in wrong:
            log.warning("topic_partition_mismatch", problem=problem)
    finally:
        await admin.close()


async def _connected_admin(bootstrap: str, timeout: float) -> AIOKafkaAdminClient:
    deadline = time.monotonic() + timeout
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            return admin
        except (KafkaError, OSError):
            await admin.close()
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.2)


def _raise_for_topic_errors(topic_errors: list[tuple[str, int, str | None]]) -> None:
    failed = [
        f"{name}: error {code} {message or ''}".strip()
        for name, code, message in topic_errors
        if code not in (0, _TOPIC_ALREADY_EXISTS)
    ]
    if failed:
        raise KafkaError("could not create topics: " + "; ".join(failed))


async def _partition_mismatches(admin: AIOKafkaAdminClient, wanted: dict[str, int]) -> list[str]:
    described = await admin.describe_topics(list(wanted))
    return [
        f"{topic['topic']} has {len(topic['partitions'])} partitions, want {wanted[topic['topic']]}"
        for topic in described
        if len(topic["partitions"]) != wanted[topic["topic"]]
    ]
