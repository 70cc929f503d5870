"""LocalStack for real, with fake services (fake_service.py) in place of the real ones: the
processes, their environment, the gateway in front of them, the demo tenant and the CLI."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import psutil
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from billstream_contracts.topics import TOPICS
from billstream_localstack._proc import StartupError, port_is_free
from billstream_localstack.cli import main as cli_main
from billstream_localstack.demo_tenant import bootstrap_demo_tenant
from billstream_localstack.stack import LocalStack
from billstream_runtime.routes import SERVICES

pytestmark = pytest.mark.integration

FAKE_SERVICE = Path(__file__).with_name("fake_service.py")
ANY_PORTS = {service: 0 for service in SERVICES}


def fake_command(service: str) -> list[str]:
    return [sys.executable, str(FAKE_SERVICE), service]


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fake-state")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, state_dir: Path) -> Iterator[LocalStack]:
    stack = LocalStack(
        tmp_path_factory.mktemp("stack"),
        gateway_port=0,
        service_ports=ANY_PORTS,
        env_overrides={"FAKE_STATE_DIR": str(state_dir)},
        service_command=fake_command,
        log_level="DEBUG",
    )
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        yield client


def test_gateway_routes_to_the_service_processes(stack: LocalStack, http: httpx.Client) -> None:
    assert http.get(f"{stack.base_url}/healthz").status_code == 200
    for path, service in [
        ("/v1/usage/events", "ingestion"),
        ("/v1/entitlements/x", "metering"),
        ("/v1/customers?limit=2", "subscription"),
        ("/v1/invoices", "invoicing"),
        ("/v1/customers/cus_1/payment_methods", "payments"),
        ("/v1/webhook_endpoints", "webhook_dispatch"),
    ]:
        echoed = http.get(stack.base_url + path).json()
        assert echoed["service"] == service, path
    echoed = http.post(f"{stack.base_url}/v1/usage/events?x=1", content=b"[1, 2]").json()
    assert (echoed["method"], echoed["query"], echoed["body"]) == ("POST", "x=1", "[1, 2]")


def test_each_service_gets_its_environment(stack: LocalStack, http: httpx.Client) -> None:
    for service, url in stack.service_urls.items():
        env = http.get(f"{url}/echo").json()["env"]
        prefix = f"BILLSTREAM_{service.upper()}_"
        assert env[prefix + "DATABASE_URL"] == stack.database_url(service)
        parts = urlsplit(stack.database_url(service))
        assert parts.path == f"/billstream_{service}"
        if stack.postgres is not None:  # the embedded server: its unix socket
            assert parse_qs(parts.query)["host"] == [str(stack.postgres._socket_dir())]
        assert env[prefix + "HTTP_HOST"] == "127.0.0.1"
        assert env[prefix + "HTTP_PORT"] == str(stack.service_ports[service])
        assert env["BILLSTREAM_KAFKA_BOOTSTRAP"] == stack.kafka_bootstrap
        assert env["BILLSTREAM_ADMIN_TOKEN"] == stack.admin_token
        assert env["BILLSTREAM_LOG_LEVEL"] == "DEBUG"


async def test_databases_and_topics_exist(stack: LocalStack) -> None:
    for service in SERVICES:
        conn = await asyncpg.connect(stack.database_url(service))
        await conn.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    await admin.start()
    try:
        assert set(await admin.list_topics()) >= {topic.name for topic in TOPICS}
    finally:
        await admin.close()


def test_state_lives_under_root(stack: LocalStack) -> None:
    assert (stack.root / "admin_token").read_text().strip() == stack.admin_token
    assert (stack.root / "pgdata" / "PG_VERSION").exists()
    for name in [*SERVICES, "gateway", "postgres", "broker"]:
        assert (stack.root / "logs" / f"{name}.log").exists(), name
    assert "fake ingestion starting" in (stack.root / "logs" / "ingestion.log").read_text()


def test_merged_openapi_through_the_gateway(stack: LocalStack, http: httpx.Client) -> None:
    doc = http.get(f"{stack.base_url}/openapi.json").json()
    assert doc["info"]["title"] == "Billstream API"
    assert "/v1/invoices" in doc["paths"]
    assert "/readyz" not in doc["paths"]
    schemas = doc["components"]["schemas"]
    assert schemas["Error"] == {"type": "object"}
    assert schemas["Thing"]["title"] == "ingestion"
    assert schemas["InvoicingThing"]["title"] == "invoicing"
    assert "swagger-ui" in http.get(f"{stack.base_url}/docs").text


def test_kill_and_start_a_service(stack: LocalStack, http: httpx.Client) -> None:
    stack.kill_service("invoicing")
    assert stack.exited() == {"invoicing": -9}
    response = http.get(f"{stack.base_url}/v1/invoices")
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"

    stack.start_service("invoicing")
    assert stack.exited() == {}
    assert http.get(f"{stack.base_url}/v1/invoices").json()["service"] == "invoicing"


async def test_restart_broker_empty(stack: LocalStack, http: httpx.Client) -> None:
    bootstrap = stack.kafka_bootstrap
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        await producer.send_and_wait("localstack.test.lost", b"gone after the restart")
    finally:
        await producer.stop()

    stack.restart_broker_empty()

    assert stack.kafka_bootstrap == bootstrap
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        assert set(await admin.list_topics()) == {topic.name for topic in TOPICS}
    finally:
        await admin.close()
    for service in SERVICES:  # resumed after the pause
        echoed = http.get(f"{stack.service_urls[service]}/echo", timeout=2).json()
        assert echoed["service"] == service


def test_demo_tenant_is_created_then_reused(
    stack: LocalStack, state_dir: Path, tmp_path: Path, http: httpx.Client
) -> None:
    def bootstrap() -> dict[str, str]:
        return bootstrap_demo_tenant(
            stack.base_url,
            stack.admin_token,
            stack.service_urls,
            tmp_path,
            extra={"kafka_bootstrap": stack.kafka_bootstrap},
            timeout=30,
        )

    first = bootstrap()
    assert first["tenant_id"].startswith("ten_")
    assert first["test_secret_key"].startswith("sk_test_")
    assert first["live_publishable_key"].startswith("pk_live_")
    assert first["base_url"] == stack.base_url
    assert first["kafka_bootstrap"] == stack.kafka_bootstrap
    assert json.loads((tmp_path / "dev.json").read_text()) == first
    assert (tmp_path / "dev.json").stat().st_mode & 0o777 == 0o600
    for url in stack.service_urls.values():
        whoami = http.get(f"{url}/internal/whoami", headers=_bearer(first["test_secret_key"]))
        assert whoami.status_code == 200

    assert bootstrap() == first

    stack.kill_service("subscription")  # the fake forgets its tenants
    stack.start_service("subscription")
    third = bootstrap()
    assert third["tenant_id"] != first["tenant_id"]


def test_cli_admin_commands(
    stack: LocalStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = {"base_url": stack.base_url, "admin_token": stack.admin_token}
    (tmp_path / "dev.json").write_text(json.dumps(dev))

    assert cli_main(["admin", "create-tenant", "--name", "Acme", "--root", str(tmp_path)]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["name"] == "Acme"

    assert cli_main(["admin", "get-tenant", created["id"], "--root", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"id": created["id"], "name": "Acme"}

    assert cli_main(["admin", "get-tenant", "ten_missing", "--root", str(tmp_path)]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "resource_missing"

    wrong_token = ["--admin-token", "wrong", "--root", str(tmp_path)]
    assert cli_main(["admin", "get-tenant", created["id"], *wrong_token]) == 1


def test_failed_start_names_the_service_and_stops_everything(
    stack: LocalStack, tmp_path: Path
) -> None:
    """A stack on the first one's PostgreSQL and broker (external mode), whose services die."""

    def crashing(service: str) -> list[str]:
        code = "import sys; print('cannot start', sys.argv[1]); sys.exit(3)"
        return [sys.executable, "-c", code, service]

    failing = LocalStack(
        tmp_path,
        gateway_port=0,
        service_ports=ANY_PORTS,
        external_database_url=stack.server_database_url,
        external_kafka=stack.kafka_bootstrap,
        service_command=crashing,
    )
    assert failing.postgres is None and failing.broker is None
    with pytest.raises(StartupError) as failure:
        failing.start()
    message = str(failure.value)
    assert "ingestion (GET http://127.0.0.1:" in message
    assert "exited with code 3" in message
    assert "cannot start ingestion" in message
    assert failing.exited() == {}  # forgotten: all stopped
    assert port_is_free(failing.gateway_port)
    assert stack.postgres is not None and stack.postgres.running  # external: left alone


def test_fixed_port_in_use_is_refused_up_front(stack: LocalStack, tmp_path: Path) -> None:
    clash = LocalStack(
        tmp_path,
        gateway_port=stack.gateway_port,
        service_ports=ANY_PORTS,
        external_database_url=stack.server_database_url,
        external_kafka=stack.kafka_bootstrap,
        service_command=fake_command,
    )
    with pytest.raises(StartupError, match=rf"{stack.gateway_port} \(gateway\)"):
        clash.start()


def test_stop_leaves_nothing_running(tmp_path: Path, state_dir: Path) -> None:
    stack = LocalStack(
        tmp_path,
        gateway_port=0,
        service_ports=ANY_PORTS,
        env_overrides={"FAKE_STATE_DIR": str(state_dir)},
        service_command=fake_command,
    )
    before = set(psutil.Process().children())  # the module's stack
    with stack:
        assert stack.postgres is not None and stack.broker is not None
        ours = set(psutil.Process().children()) - before
        assert len(ours) == len(SERVICES) + 3  # services, gateway, postgres, broker
    assert set(psutil.Process().children()) == before
    assert not any(process.is_running() for process in ours)
    assert all(port_is_free(port) for port in [stack.gateway_port, *stack.service_ports.values()])


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
