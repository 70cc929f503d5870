"""The whole platform on one machine, one process per service, for `make run`, the end-to-end
and fault tests and the benchmarks.

PostgreSQL and the Kafka-protocol broker are embedded unless external ones are given; each
service gets its own database (`billstream_<service>`) and HTTP port; the gateway is the one
base URL in front of them.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx
from billstream_runtime.routes import DEFAULT_PORTS, GATEWAY_PORT, SERVICES

from billstream_localstack._proc import (
    LOOPBACK,
    StartupError,
    exit_reason,
    free_port,
    kill_group,
    log_size,
    port_is_free,
    run_sync,
    signal_group,
    spawn,
    startup_error,
    terminate,
    wait_for,
    write_private,
)
from billstream_localstack.broker import TansuBroker, ensure_topics
from billstream_localstack.postgres import EmbeddedPostgres, create_database, dsn_for_database

#: Builds the command line that runs one service.
ServiceCommand = Callable[[str], Sequence[str]]

GATEWAY = "gateway"


#: Consumer settings for the embedded broker, which answers a JoinGroup after half the
#: session timeout: 2 s lets a service's consumers join in about 1 s instead of 5. Stopping
#: consumers do not send LeaveGroup: the broker (Tansu 0.6.0) can lose a group for good when
#: its leader leaves while the group re-forms (billstream_messaging.groups); an expired
#: session is handled well, and takes 2 s.
EMBEDDED_BROKER_ENV = {
    "BILLSTREAM_CONSUMER_SESSION_TIMEOUT_MS": "2000",
    "BILLSTREAM_CONSUMER_HEARTBEAT_INTERVAL_MS": "500",
    "BILLSTREAM_CONSUMER_LEAVE_GROUP": "false",
}


def service_module_command(service: str) -> list[str]:
    """`python -m billstream_<service>` with this interpreter."""
    return [sys.executable, "-m", f"billstream_{service}"]


def database_name(service: str) -> str:
    return f"billstream_{service}"


@dataclass
class _Child:
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_start: int  # where this run's output starts in the log
    ready_url: str


class LocalStack:
    """PostgreSQL, the broker, the six services and the gateway as separate processes.

    Ports set to 0 are replaced by free ones when the stack is created. Use it as a context
    manager or call `start()` and `stop()`; processes are also stopped at interpreter exit.
    """

    def __init__(
        self,
        root: Path,
        *,
        gateway_port: int = GATEWAY_PORT,
        service_ports: Mapping[str, int] | None = None,
        external_database_url: str | None = None,
        external_kafka: str | None = None,
        admin_token: str | None = None,
        env_overrides: Mapping[str, str] | None = None,
        service_command: ServiceCommand = service_module_command,
        log_level: str = "INFO",
        startup_timeout: float = 120.0,
    ) -> None:
        self.root = Path(root).absolute()
        self.logs_dir = self.root / "logs"
        ports = _resolve_ports({GATEWAY: gateway_port, **DEFAULT_PORTS, **(service_ports or {})})
        self.gateway_port = ports[GATEWAY]
        self.service_ports = {service: ports[service] for service in SERVICES}
        self.admin_token = admin_token or self._persisted_admin_token()
        self.postgres = (
            None
            if external_database_url
            else EmbeddedPostgres(self.root / "pgdata", log_path=self.logs_dir / "postgres.log")
        )
        self.broker = None if external_kafka else TansuBroker(log_path=self.logs_dir / "broker.log")
        self._external_database_url = external_database_url
        self._external_kafka = external_kafka
        self._env_overrides = dict(env_overrides or {})
        self._service_command = service_command
        self._log_level = log_level
        self._startup_timeout = startup_timeout
        self._children: dict[str, _Child] = {}

    # -- addresses -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The one public base URL (the gateway)."""
        return f"http://{LOOPBACK}:{self.gateway_port}"

    @property
    def service_urls(self) -> dict[str, str]:
        """Each service's own base URL, bypassing the gateway."""
        return {s: f"http://{LOOPBACK}:{port}" for s, port in self.service_ports.items()}

    @property
    def kafka_bootstrap(self) -> str:
        if self._external_kafka:
            return self._external_kafka
        assert self.broker is not None
        return self.broker.bootstrap

    @property
    def server_database_url(self) -> str:
        """The PostgreSQL server's DSN, on its maintenance database, as the services use it
        (the embedded server's unix socket: see EmbeddedPostgres.local_dsn)."""
        if self._external_database_url:
            return self._external_database_url
        assert self.postgres is not None
        return self.postgres.local_dsn()

    @property
    def public_database_url(self) -> str:
        """The same server over TCP, for people and their tools (psql, a GUI)."""
        if self._external_database_url:
            return self._external_database_url
        assert self.postgres is not None
        return self.postgres.dsn()

    def database_url(self, service: str) -> str:
        """The DSN of the service's own database."""
        return dsn_for_database(self.server_database_url, database_name(service))

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start everything and wait until every service is ready. On failure everything that
        was started is stopped again and a StartupError names the culprit with its log tail."""
        if self._children:
            raise RuntimeError("this LocalStack is already started")
        atexit.register(self.stop)
        try:
            self._check_ports_free()
            self._start_backing_services()
            for service in SERVICES:
                self._spawn_service(service)
            self._spawn_gateway()
            self._wait_ready(list(self._children), self._startup_timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM the services and the gateway together, SIGKILL what is left after a grace
        period, then stop the broker and PostgreSQL. Safe to call more than once."""
        terminate([child.proc for child in self._children.values()], timeout=10.0)
        self._children.clear()
        if self.broker is not None:
            self.broker.stop()
        if self.postgres is not None:
            self.postgres.stop()
        atexit.unregister(self.stop)

    def kill_service(self, name: str) -> None:
        """SIGKILL a service (or the gateway), as in a crash."""
        child = self._children[name]
        kill_group(child.proc.pid)
        child.proc.wait()

    def start_service(self, name: str) -> None:
        """Start a service (or the gateway) that was killed, and wait until it is ready."""
        if name in self._children and self._children[name].proc.poll() is None:
            return
        if name == GATEWAY:
            self._spawn_gateway()
        else:
            self._spawn_service(name)
        self._wait_ready([name], self._startup_timeout)

    def restart_broker_empty(self) -> None:
        """Restart the embedded broker on the same port, losing every topic and message, then
        create the topics again.

        The services are paused (SIGSTOP) meanwhile: Tansu creates a missing topic, with its
        own partition count, on any client's metadata request, so a service reconnecting
        first would leave a topic with the wrong partitions. They find the broker empty when
        they resume a fraction of a second later.
        """
        if self.broker is None:
            raise RuntimeError("the broker is external; only the embedded one can be restarted")
        with self._services_paused():
            self.broker.restart()
            run_sync(lambda: ensure_topics(self.kafka_bootstrap, strict=True))

    def exited(self) -> dict[str, int]:
        """The processes that have exited since they were started, with their exit codes."""
        return {
            name: code
            for name, child in self._children.items()
            if (code := child.proc.poll()) is not None
        }

    @contextlib.contextmanager
    def _services_paused(self) -> Iterator[None]:
        pids = [
            child.proc.pid
            for name, child in self._children.items()
            if name != GATEWAY and child.proc.poll() is None
        ]
        for pid in pids:
            signal_group(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                signal_group(pid, signal.SIGCONT)

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- start-up steps ------------------------------------------------------------------------

    def _persisted_admin_token(self) -> str:
        """The admin token kept in `root/admin_token`, created on first use."""
        path = self.root / "admin_token"
        if path.exists():
            return path.read_text().strip()
        token = secrets.token_urlsafe(32)
        write_private(path, token + "\n")
        return token

    def _check_ports_free(self) -> None:
        ports = {GATEWAY: self.gateway_port, **self.service_ports}
        busy = [f"{port} ({name})" for name, port in ports.items() if not port_is_free(port)]
        if busy:
            raise StartupError(
                f"port(s) already in use: {', '.join(busy)}. Is another Billstream running?"
            )

    def _start_backing_services(self) -> None:
        if self.postgres is not None:
            self.postgres.start()
        if self.broker is not None:
            self.broker.start()
        run_sync(self._create_topics_and_databases)

    async def _create_topics_and_databases(self) -> None:
        await ensure_topics(self.kafka_bootstrap, strict=True)
        for service in SERVICES:
            await create_database(self.server_database_url, database_name(service))

    def _spawn_service(self, service: str) -> None:
        port = self.service_ports[service]
        prefix = f"BILLSTREAM_{service.upper()}_"
        env = {
            prefix + "DATABASE_URL": self.database_url(service),
            prefix + "HTTP_HOST": LOOPBACK,
            prefix + "HTTP_PORT": str(port),
        }
        ready_url = f"http://{LOOPBACK}:{port}/readyz"
        self._spawn(service, self._service_command(service), env, ready_url)

    def _spawn_gateway(self) -> None:
        argv = [sys.executable, "-m", "billstream_localstack.gateway"]
        env = {
            "BILLSTREAM_GATEWAY_UPSTREAMS": json.dumps(self.service_urls),
            "BILLSTREAM_GATEWAY_PORT": str(self.gateway_port),
        }
        self._spawn(GATEWAY, argv, env, f"{self.base_url}/healthz")

    def _spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str], ready: str) -> None:
        log_path = self.logs_dir / f"{name}.log"
        start = log_size(log_path)
        proc = spawn(argv, log_path=log_path, env={**self._shared_env(), **env})
        self._children[name] = _Child(proc, log_path, start, ready)

    def _shared_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "BILLSTREAM_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "BILLSTREAM_ADMIN_TOKEN": self.admin_token,
            "BILLSTREAM_LOG_LEVEL": self._log_level,
            "BILLSTREAM_PUBLIC_BASE_URL": self.base_url,
            # a development stack delivers webhooks to receivers on this machine
            "BILLSTREAM_WEBHOOK_DISPATCH_ALLOW_PRIVATE_DESTINATIONS": "true",
            **(EMBEDDED_BROKER_ENV if self.broker is not None else {}),
            **self._env_overrides,
        }

    def _wait_ready(self, names: Sequence[str], timeout: float) -> None:
        """Wait until each named process answers 200 on its ready URL, sharing one deadline."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            for name in names:
                self._wait_one_ready(name, client, deadline)

    def _wait_one_ready(self, name: str, client: httpx.Client, deadline: float) -> None:
        child = self._children[name]
        reason = wait_for(
            lambda: _answers_200(client, child.ready_url),
            timeout=max(deadline - time.monotonic(), 0.0),
            failed=lambda: exit_reason(child.proc),
            interval=0.2,
        )
        if reason is not None:
            what = f"{name} (GET {child.ready_url})"
            raise startup_error(what, reason, child.log_path, since=child.log_start)


def _resolve_ports(ports: Mapping[str, int]) -> dict[str, int]:
    """The ports with every 0 replaced by a distinct free port."""
    taken = {port for port in ports.values() if port}
    resolved = {}
    for name, port in ports.items():
        resolved[name] = port or _free_port_not_in(taken)
        taken.add(resolved[name])
    return resolved


def _free_port_not_in(taken: set[int]) -> int:
    while (port := free_port()) in taken:
        pass
    return port


def _answers_200(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False
