"""pytest plugin: session-wide real PostgreSQL and Kafka-protocol broker.

Default: the embedded ones from pip wheels (the same launcher as `make run`).
`BILLSTREAM_TEST_DATABASE_URL` / `BILLSTREAM_TEST_KAFKA_BOOTSTRAP` point the tests at external
servers. `BILLSTREAM_TEST_CONTAINERS=1` uses testcontainers (Apache Kafka, PostgreSQL) when a
Docker engine is available.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-not-found]

        docker.from_env().ping()
        return True
    except Exception:  # noqa: BLE001 - no engine, no client: containers are not an option
        return False


def use_containers() -> bool:
    return os.environ.get("BILLSTREAM_TEST_CONTAINERS") == "1" and _docker_available()


@pytest.fixture(scope="session")
def pg_server_dsn(tmp_path_factory) -> Iterator[str]:
    """DSN of a PostgreSQL server (database `postgres`) the tests may create databases on."""
    external = os.environ.get("BILLSTREAM_TEST_DATABASE_URL")
    if external:
        yield external
        return
    if use_containers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
        return
    from billstream_localstack.postgres import EmbeddedPostgres

    root: Path = tmp_path_factory.mktemp("pg")
    server = EmbeddedPostgres(root / "data", log_path=root / "pg.log")
    server.start()
    try:
        yield server.dsn()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory) -> Iterator[str]:
    external = os.environ.get("BILLSTREAM_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    if use_containers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:3.8.0").with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
        return
    from billstream_localstack.broker import TansuBroker

    broker = TansuBroker(log_path=tmp_path_factory.mktemp("broker") / "tansu.log")
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
async def fresh_database(pg_server_dsn: str) -> str:
    """A new, empty database for one test: tests stay isolated without cleanup."""
    from billstream_localstack.postgres import create_database, dsn_for_database

    name = f"t_{uuid.uuid4().hex[:12]}"
    await create_database(pg_server_dsn, name)
    return dsn_for_database(pg_server_dsn, name)


def service_env(service: str, database_url: str, kafka_bootstrap: str, **extra: str) -> dict:
    """The environment of a service under test: its own database, its own consumer groups,
    fast retries and heartbeats, and quick group joins on the embedded broker. `extra` adds
    `BILLSTREAM_<SERVICE>_<NAME>` settings (`projection_wait_s="0.3"`)."""
    from billstream_localstack.stack import EMBEDDED_BROKER_ENV

    prefix = f"BILLSTREAM_{service.upper()}_"
    env = {
        prefix + "DATABASE_URL": database_url,
        "BILLSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        prefix + "CONSUMER_GROUP_PREFIX": unique("g"),
        prefix + "RELAY_HEARTBEAT_INTERVAL_S": "0.2",
        prefix + "CONSUMER_RETRY_BACKOFF_S": "0.01",
    }
    if not os.environ.get("BILLSTREAM_TEST_KAFKA_BOOTSTRAP") and not use_containers():
        env.update(EMBEDDED_BROKER_ENV)
    env.update({prefix + name.upper(): str(value) for name, value in extra.items()})
    return env


def unique(prefix: str) -> str:
    """A unique name (topic, group, tenant) so that tests never share state."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def migrations_before(folder: Path, first_new: str, tmp_path: Path) -> Path:
    """A copy of a migrations `folder` holding only the files named before `first_new` (say
    "0006"), under the same folder names, so that `db.migrate` records them as the real ones:
    for tests of an upgrade, run with it, then with `folder`."""
    import shutil

    before = tmp_path / folder.parent.name / folder.name
    before.mkdir(parents=True)
    for path in sorted(folder.glob("*.sql")):
        if path.name < first_new:
            shutil.copy(path, before / path.name)
    return before
