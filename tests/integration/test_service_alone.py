"""Each service starts alone from its own settings, serves /readyz, and stops cleanly on
SIGTERM (graceful shutdown, exit code 0)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from billstream_localstack.postgres import create_database, dsn_for_database
from billstream_runtime.routes import SERVICES
from billstream_testing.waiting import eventually

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("service", SERVICES)
async def test_service_starts_alone_and_stops_cleanly(service, pg_server_dsn, kafka_bootstrap,
                                                      tmp_path):
    database = f"alone_{service}_{os.getpid()}"
    await create_database(pg_server_dsn, database)
    port = _free_port()
    prefix = f"BILLSTREAM_{service.upper()}_"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        f"{prefix}DATABASE_URL": dsn_for_database(pg_server_dsn, database),
        f"{prefix}KAFKA_BOOTSTRAP": kafka_bootstrap,
        f"{prefix}HTTP_PORT": str(port),
        f"{prefix}ADMIN_TOKEN": "admin-test-token",
        f"{prefix}CONSUMER_GROUP_PREFIX": f"alone-{os.getpid()}",
    }
    log = (tmp_path / f"{service}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", f"billstream_{service}"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        async def ready():
            assert proc.poll() is None, (tmp_path / f"{service}.log").read_text()[-3000:]
            async with httpx.AsyncClient(trust_env=False) as client:
                try:
                    r = await client.get(f"http://127.0.0.1:{port}/readyz")
                except httpx.TransportError:
                    return False
                return r.status_code == 200

        await eventually(ready, timeout=60, interval=0.2, message=f"{service} ready")
        async with httpx.AsyncClient(trust_env=False) as client:
            metrics = await client.get(f"http://127.0.0.1:{port}/metrics")
            assert metrics.status_code == 200 and b"billstream_http_requests_total" in metrics.content
            health = await client.get(f"http://127.0.0.1:{port}/healthz")
            assert health.json() == {"status": "ok"}
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
        output = (tmp_path / f"{service}.log").read_text()
        assert code == 0, output[-3000:]
        assert "service_stopped" in output
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
