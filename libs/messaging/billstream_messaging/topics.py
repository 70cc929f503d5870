"""Creating the backbone's topics (idempotent). Services call it at start; the local stack
calls it after starting or restarting the broker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError

from billstream_contracts.topics import TOPICS, TopicSpec

_TOPIC_EXISTS = 36


async def ensure_topics(
    bootstrap: str, specs: Iterable[TopicSpec] = TOPICS, timeout_s: float = 30.0,
    replication_factor: int = 1,
) -> None:
    """Create every topic in `specs` that does not exist yet, retrying while the broker starts."""
    specs = list(specs)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [s for s in specs if s.name not in existing]
            if missing:
                response = await admin.create_topics(
                    [NewTopic(s.name, s.partitions, replication_factor) for s in missing]
                )
                for topic, code, *_ in getattr(response, "topic_errors", []):
                    if code not in (0, _TOPIC_EXISTS):
                        raise KafkaError(f"creating topic {topic} failed with error {code}")
            return
        except (KafkaConnectionError, KafkaError, OSError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)
        finally:
            try:
                await admin.close()
            except Exception:  # noqa: BLE001 - closing a half-started client
                pass
