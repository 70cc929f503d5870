"""docker-compose.yml: KRaft Kafka, one database per service, one container per service, nginx
as the only published entry point."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
from billstream_runtime.routes import SERVICES

from .support import (
    expected_topic_specs,
    CONTAINER_PORT,
    NGINX_CONF,
    POSTGRES_INIT,
    SHARED_ENV,
    compose_service_for_dockerfile,
    depends_on,
    dns_name,
    env_map,
    load_compose,
    published_ports,
    service_env,
    topic_specs,
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def _by_image(compose: dict[str, Any], prefix: str) -> list[str]:
    return [
        name
        for name, spec in compose["services"].items()
        if str(spec.get("image", "")).startswith(prefix) and "build" not in spec
    ]


@pytest.fixture(scope="module")
def kafka(compose: dict[str, Any]) -> str:
    """The broker: the apache/kafka container that is not a one-shot."""
    brokers = [
        name
        for name in _by_image(compose, "apache/kafka:")
        if "KAFKA_PROCESS_ROLES" in env_map(compose["services"][name].get("environment"))
    ]
    assert len(brokers) == 1, brokers
    return brokers[0]


@pytest.fixture(scope="module")
def postgres(compose: dict[str, Any]) -> str:
    (name,) = _by_image(compose, "postgres:")
    return name


@pytest.fixture(scope="module")
def proxy(compose: dict[str, Any]) -> str:
    (name,) = _by_image(compose, "nginx:")
    return name


def _container(compose: dict[str, Any], service: str) -> tuple[str, dict[str, Any]]:
    name = compose_service_for_dockerfile(compose, f"services/{service}/Dockerfile")
    assert name is not None, f"no container is built from services/{service}/Dockerfile"
    return name, compose["services"][name]


@pytest.mark.parametrize("service", SERVICES)
def test_service_container(
    compose: dict[str, Any], service: str, kafka: str, postgres: str
) -> None:
    name, spec = _container(compose, service)
    assert name == dns_name(service)
    assert spec["build"]["context"] in (".", "./")

    env = env_map(spec.get("environment"))
    db_var, host_var, port_var = service_env(service)
    for var in (db_var, host_var, port_var, *SHARED_ENV):
        assert env.get(var), f"{name}: {var} is not set"
    assert env[host_var] == "0.0.0.0"
    assert env[port_var] == str(CONTAINER_PORT)

    # Its own database on the compose PostgreSQL, and nobody else's.
    url = urlsplit(env[db_var])
    assert url.scheme in ("postgresql", "postgres")
    assert (url.hostname, url.port) == (postgres, 5432)
    assert url.path == f"/billstream_{service}"
    others = {service_env(s)[0] for s in SERVICES if s != service}
    assert not others & env.keys(), f"{name} gets another service's database URL"

    host, _, port = env["BILLSTREAM_KAFKA_BOOTSTRAP"].partition(":")
    assert host == kafka and port == "9092"

    deps = depends_on(spec)
    assert deps.get(postgres) == "service_healthy"
    assert "service_completed_successfully" in deps.values(), "start after the topics exist"

    healthcheck = spec.get("healthcheck") or {}
    assert healthcheck.get("test") and not healthcheck.get("disable")
    assert f"127.0.0.1:{CONTAINER_PORT}/readyz" in " ".join(healthcheck["test"])
    assert not spec.get("ports"), f"{name} must not publish ports: the proxy is the entry point"


def test_kafka_is_kraft_without_zookeeper(compose: dict[str, Any], kafka: str) -> None:
    for name, spec in compose["services"].items():
        assert "zookeeper" not in name.lower()
        assert "zookeeper" not in str(spec.get("image", "")).lower()
    env = env_map(compose["services"][kafka]["environment"])
    assert not any("ZOOKEEPER" in key for key in env)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["CLUSTER_ID"]
    node_id = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{node_id}@{kafka}:")

    # The listener the containers use is the one advertised to them.
    listeners = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller not in listeners
    inter_broker = env["KAFKA_INTER_BROKER_LISTENER_NAME"]
    assert listeners[inter_broker] == f"{kafka}:9092"
    declared = dict(
        item.split(":", 1) for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert {*listeners, controller} <= declared.keys()
    assert compose["services"][kafka].get("healthcheck", {}).get("test")


def test_kafka_init_creates_every_topic(compose: dict[str, Any], kafka: str) -> None:
    inits = [
        name
        for name in _by_image(compose, "apache/kafka:")
        if name != kafka and compose["services"][name].get("restart") == "no"
    ]
    assert len(inits) == 1, "one one-shot container creates the topics"
    spec = compose["services"][inits[0]]
    assert depends_on(spec) == {kafka: "service_healthy"}
    env = env_map(spec["environment"])
    assert topic_specs(env["BILLSTREAM_TOPICS"]) == expected_topic_specs()
    assert "retention.ms=" in (" ".join(spec["command"]) if isinstance(spec["command"], list)
                               else spec["command"])
    script = " ".join(spec["command"]) if isinstance(spec["command"], list) else spec["command"]
    assert "kafka-topics.sh" in script and "--create" in script and "--if-not-exists" in script
    assert "BILLSTREAM_TOPICS" in script and "--partitions" in script
    # Every service waits for it.
    for service in SERVICES:
        _, container = _container(compose, service)
        assert depends_on(container).get(inits[0]) == "service_completed_successfully"


def test_postgres_creates_every_service_database(compose: dict[str, Any], postgres: str) -> None:
    spec = compose["services"][postgres]
    assert str(spec["image"]).startswith("postgres:16")
    mounts = [str(v) for v in spec.get("volumes", [])]
    assert any(
        m.startswith("./deploy/compose/postgres-init.sql:/docker-entrypoint-initdb.d/")
        for m in mounts
    ), mounts
    sql = POSTGRES_INIT.read_text()
    for service in SERVICES:
        url = urlsplit(
            env_map(_container(compose, service)[1]["environment"])[service_env(service)[0]]
        )
        database = url.path.lstrip("/")
        # byte-order collation (db.create_database_sql): the image's default is en_US.utf8
        assert re.search(rf"CREATE DATABASE {database} OWNER {url.username}\s+TEMPLATE template0"
                         r" ENCODING 'UTF8' LOCALE_PROVIDER libc LC_COLLATE 'C';", sql), database
        assert f"CREATE ROLE {url.username} LOGIN PASSWORD '{url.password}';" in sql
    assert "pg_isready" in " ".join(spec["healthcheck"]["test"])


def test_proxy_is_the_only_published_entry_point(compose: dict[str, Any], proxy: str) -> None:
    publishing = {name for name, spec in compose["services"].items() if spec.get("ports")}
    assert publishing == {proxy}
    spec = compose["services"][proxy]
    assert spec["image"] == "nginx:1.27-alpine"
    ((host, container),) = published_ports(spec)
    assert re.search(r"8080\}?$", host), host  # 8080, or ${BILLSTREAM_PORT:-8080}
    assert re.search(rf"^\s*listen\s+{container};", NGINX_CONF.read_text(), re.MULTILINE)
    assert "./deploy/compose/nginx.conf:/etc/nginx/nginx.conf:ro" in spec["volumes"]
    deps = depends_on(spec)
    for service in SERVICES:
        assert deps.get(dns_name(service)) == "service_healthy"


def test_gateway_serves_the_merged_openapi(compose: dict[str, Any], proxy: str) -> None:
    name = compose_service_for_dockerfile(compose, "deploy/gateway.Dockerfile")
    assert name == "gateway"
    env = env_map(compose["services"][name]["environment"])
    assert env["BILLSTREAM_GATEWAY_PORT"] == str(CONTAINER_PORT)
    upstreams = json.loads(env["BILLSTREAM_GATEWAY_UPSTREAMS"])
    assert list(upstreams) == list(SERVICES)
    for service, base_url in upstreams.items():
        assert base_url == f"http://{_container(compose, service)[0]}:{CONTAINER_PORT}"
    assert name in depends_on(compose["services"][proxy])
