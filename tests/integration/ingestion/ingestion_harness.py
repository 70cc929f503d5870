"""Ingestion under test: its real `build()` against PostgreSQL and the broker, a tenant of its
own, and the subscription events it projects published straight onto the topic."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import orjson
from aiokafka import AIOKafkaProducer
import pytest

from billstream_contracts.events import (
    ApiKeyCreated,
    CustomerCreated,
    MeterCreated,
    TestClockAdvanced,
    TestClockCreated,
)
from billstream_contracts.topics import (
    SUBSCRIPTION_EVENTS, TOPICS, USAGE_RAW, USAGE_REJECTED, TopicSpec,
)
from billstream_ingestion.bootstrap import build
from billstream_ingestion.settings import IngestionSettings
from billstream_messaging import ServiceHost, published_envelope
from billstream_messaging.topics import ensure_topics
from billstream_runtime.auth import hash_key
from billstream_runtime.ids import new_id
from billstream_runtime.settings import load_settings
from billstream_testing.events import envelope, publish, read_topic
from billstream_testing.fixtures import service_env, unique
from billstream_testing.waiting import eventually


@dataclass
class Ingestion:
    host: ServiceHost
    bootstrap: str
    tenant_id: str
    key: str

    def client(self, key: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.host.app, raise_app_exceptions=False),
            base_url="http://ingestion", headers={"Authorization": f"Bearer {key or self.key}"},
            timeout=60,
        )

    async def publish(self, *datas, environment: str = "test") -> None:
        await publish(self.bootstrap, SUBSCRIPTION_EVENTS, *[
            envelope(d, tenant_id=self.tenant_id, environment=environment) for d in datas])

    async def add_key(self, kind: str = "secret", environment: str = "test") -> str:
        prefix = {"secret": "sk", "publishable": "pk"}[kind]
        key = f"{prefix}_{environment}_{unique('k').replace('-', '')}"
        key_id = new_id("key")
        await self.publish(ApiKeyCreated(
            key_id=key_id, environment=environment, kind=kind, key_hash=hash_key(key),
            key_prefix=key[:12], created_at=datetime.now(UTC)), environment=environment)
        await self.wait_for_row("SELECT 1 FROM api_keys WHERE key_id = $1", key_id)
        return key

    async def create_meter(self, code: str, environment: str = "test") -> None:
        await self.publish(MeterCreated(meter_id=new_id("mtr"), code=code, aggregation="sum",
                                        created_at=datetime.now(UTC)), environment=environment)
        await self.wait_for_row(
            "SELECT 1 FROM meters WHERE tenant_id = $1 AND code = $2", self.tenant_id, code)

    async def create_customer(self, external_id: str | None,
                              test_clock_id: str | None = None) -> str:
        customer_id = new_id("cus")
        await self.publish(CustomerCreated(customer_id=customer_id, external_id=external_id,
                                           test_clock_id=test_clock_id,
                                           created_at=datetime.now(UTC)))
        await self.wait_for_row("SELECT 1 FROM customers WHERE customer_id = $1", customer_id)
        return customer_id

    async def create_clock(self, frozen_time: datetime) -> str:
        clock_id = new_id("clock")
        await self.publish(TestClockCreated(test_clock_id=clock_id, frozen_time=frozen_time))
        await self.wait_for_row("SELECT 1 FROM test_clocks WHERE test_clock_id = $1", clock_id)
        return clock_id

    async def advance_clock(self, clock_id: str, previous: datetime, to: datetime) -> None:
        await self.publish(TestClockAdvanced(test_clock_id=clock_id, previous_time=previous,
                                             frozen_time=to))
        await self.wait_for_row(
            "SELECT 1 FROM test_clocks WHERE test_clock_id = $1 AND frozen_time = $2",
            clock_id, to)

    @property
    def raw_topic(self) -> str:
        return self.host.settings.raw_topic

    async def produce_raw(self, *records: tuple[bytes | None, bytes | None, list]) -> None:
        """Write (key, value, headers) records to the Kafka input, as a foreign producer."""
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                    enable_idempotence=False)
        await producer.start()
        try:
            for key, value, headers in records:
                await producer.send_and_wait(self.raw_topic, value=value, key=key,
                                             headers=headers)
        finally:
            await producer.stop()

    async def rejections(self, n: int, timeout: float = 30.0) -> list[dict]:
        """The first n records on billstream.usage.rejected that came from this test's topic."""
        topic = self.raw_topic.encode()
        records = await read_topic(self.bootstrap, USAGE_REJECTED, n,
                                   match=lambda r: topic in r.value, timeout=timeout)
        return [{**orjson.loads(r.value), "_headers": dict(r.headers), "_key": r.key}
                for r in records]

    async def wait_for_row(self, sql: str, *args) -> None:
        await eventually(lambda: self.host.pool.fetchval(sql, *args), message=sql)

    async def log_rows(self) -> list[dict]:
        """This tenant's rows of ingestion's log, `data` decoded from the stored envelope (the
        usage log keeps no other copy: EventStore keep_data=False)."""
        rows = await self.host.pool.fetch(
            "SELECT * FROM event_log WHERE tenant_id = $1 ORDER BY seq", self.tenant_id)
        return [{**dict(r), "data": orjson.loads(published_envelope(
            r["seq"], r["envelope"], r["envelope_codec"]))["data"]} for r in rows]

    async def accepted_events(self) -> list[dict]:
        """The log in order, each usage of a `usage.batch_accepted` as an entry of its own:
        the row's columns (type, seq, id … of the batch) with `data` = that usage."""
        out = []
        for row in await self.log_rows():
            if row["type"] == "usage.batch_accepted":
                out += [{**row, "data": usage} for usage in row["data"]["usages"]]
            else:
                out.append(row)
        return out


RAW_PARTITIONS = next(t.partitions for t in TOPICS if t.name == USAGE_RAW)


def ingestion_settings(dsn: str, bootstrap: str, **extra: str) -> IngestionSettings:
    env = service_env("ingestion", dsn, bootstrap,
                      **{"projection_wait_s": "0.3", "db_pool_max": "20", **extra})
    return load_settings("ingestion", IngestionSettings, environ=env)


@pytest.fixture
async def ingestion(fresh_database, kafka_bootstrap):
    # each test's Kafka input reads its own topic: the broker is shared by the whole session
    raw_topic = f"test.usage.raw.{unique('t')}"
    # partitioned like billstream.usage.raw (polls span partitions, as in production)
    await ensure_topics(kafka_bootstrap, [TopicSpec(raw_topic, RAW_PARTITIONS)])
    host = build(ingestion_settings(fresh_database, kafka_bootstrap, raw_topic=raw_topic))
    await host.start(serve_http=False)
    try:
        svc = Ingestion(host, kafka_bootstrap, unique("ten"), "")
        svc.key = await svc.add_key()
        yield svc
    finally:
        await host.stop()
