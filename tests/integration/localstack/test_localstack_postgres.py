"""EmbeddedPostgres for real: initdb, TCP, restarts, crashes, leftovers of earlier runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
from billstream_localstack._proc import LOOPBACK, StartupError
from billstream_localstack.postgres import EmbeddedPostgres

pytestmark = pytest.mark.integration


@pytest.fixture
def servers() -> Iterator[list[EmbeddedPostgres]]:
    """Servers a test starts; stopped whatever happens."""
    started: list[EmbeddedPostgres] = []
    yield started
    for server in started:
        server.stop()


def _server(servers: list[EmbeddedPostgres], data_dir: Path, port: int = 0) -> EmbeddedPostgres:
    server = EmbeddedPostgres(data_dir, port=port)
    servers.append(server)
    return server


async def _insert(dsn: str, value: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS notes (body text)")
        await conn.execute("INSERT INTO notes VALUES ($1)", value)
    finally:
        await conn.close()


async def _notes(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [row["body"] for row in await conn.fetch("SELECT body FROM notes ORDER BY body")]
    finally:
        await conn.close()


async def test_data_survives_a_stop_and_a_start_on_the_same_port(
    servers: list[EmbeddedPostgres], tmp_path: Path
) -> None:
    first = _server(servers, tmp_path / "pgdata")
    first.start()
    assert first.running
    assert first.dsn("x") == f"postgresql://postgres@127.0.0.1:{first.port}/x"
    assert first.create_database("billstream_test") is True
    assert first.create_database("billstream_test") is False
    await _insert(first.dsn("billstream_test"), "kept")
    port = first.port
    first.stop()
    assert not first.running

    second = _server(servers, tmp_path / "pgdata")
    second.start()
    assert second.port == port
    assert await _notes(second.dsn("billstream_test")) == ["kept"]


async def test_settings_for_a_dev_box(servers: list[EmbeddedPostgres], tmp_path: Path) -> None:
    server = _server(servers, tmp_path / "pgdata")
    server.start()
    conn = await asyncpg.connect(server.dsn())
    try:
        assert await conn.fetchval("SHOW fsync") == "on"
        assert await conn.fetchval("SHOW max_connections") == "300"
        assert await conn.fetchval("SHOW shared_buffers") == "256MB"
        assert await conn.fetchval("SHOW max_wal_size") == "4GB"
        assert await conn.fetchval("SHOW wal_init_zero") == "off"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"  # commits stay durable
        assert (
            await conn.fetchval("SELECT current_setting('server_version_num')::int / 10000") == 16
        )
    finally:
        await conn.close()


async def test_recovers_after_a_crash_with_a_stale_postmaster_pid(
    servers: list[EmbeddedPostgres], tmp_path: Path
) -> None:
    """After SIGKILL, postmaster.pid names a dead process. Here it names a live one, as after
    pid reuse: first a process that is not PostgreSQL at all (which PostgreSQL itself would
    refuse to start over), then another server's postmaster, which must be left alone."""
    other = _server(servers, tmp_path / "other")
    other.start()
    server = _server(servers, tmp_path / "pgdata")
    pid_file = tmp_path / "pgdata" / "postmaster.pid"
    for impostor in (os.getpid(), _postmaster_pid(tmp_path / "other")):
        server.start()
        await _insert(server.dsn(), f"committed before crash {impostor}")
        server.kill()
        assert not server.running
        lines = pid_file.read_text().splitlines()
        pid_file.write_text("\n".join([str(impostor), *lines[1:]]) + "\n")

    server.start()
    assert len(await _notes(server.dsn())) == 2
    assert other.running


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


async def test_adopts_the_healthy_server_an_earlier_run_left_behind(
    servers: list[EmbeddedPostgres], tmp_path: Path
) -> None:
    data_dir = tmp_path / "pgdata"
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from billstream_localstack.postgres import EmbeddedPostgres\n"
        "server = EmbeddedPostgres(Path(sys.argv[1]))\n"
        "server.start()\n"
        "print(server.port, flush=True)\n"
        "os._exit(0)  # die without stopping it\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(data_dir)], capture_output=True, text=True, check=True
    )
    orphan_port = int(run.stdout)
    orphan_pid = _postmaster_pid(data_dir)

    server = _server(servers, data_dir)
    server.start()
    assert server.port == orphan_port
    assert server.running
    await _insert(server.dsn(), "served by the adopted server")
    server.stop()
    assert not psutil.pid_exists(orphan_pid)


async def _over_a_unix_socket(dsn: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:  # the server's address is NULL on a unix-socket connection
        return await conn.fetchval("SELECT inet_server_addr() IS NULL")
    finally:
        await conn.close()


async def test_local_processes_reach_it_over_its_unix_socket(
    servers: list[EmbeddedPostgres], tmp_path: Path
) -> None:
    server = _server(servers, tmp_path / "pgdata")
    server.start()
    server.create_database("billstream_test")
    assert await _over_a_unix_socket(server.local_dsn("billstream_test"))
    assert not await _over_a_unix_socket(server.dsn("billstream_test"))  # TCP, for people
    await _insert(server.local_dsn("billstream_test"), "by socket")
    assert await _notes(server.dsn("billstream_test")) == ["by socket"]


async def test_long_data_dir_path_gets_a_short_socket_dir(
    servers: list[EmbeddedPostgres], tmp_path: Path
) -> None:
    deep = tmp_path / ("a-rather-long-directory-name-" * 4) / ".billstream" / "pgdata"
    assert len(str(deep)) > 110
    server = _server(servers, deep)
    server.start()
    assert server.create_database("deep") is True
    assert await _over_a_unix_socket(server.local_dsn("deep"))


def test_start_failure_names_the_cause_with_the_log_tail(
    servers: list[EmbeddedPostgres], tmp_path: Path
) -> None:
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, 0))
        squatter.listen()
        server = _server(servers, tmp_path / "pgdata", port=squatter.getsockname()[1])
        with pytest.raises(StartupError) as failure:
            server.start()
    message = str(failure.value)
    assert "PostgreSQL on port" in message
    assert "could not bind" in message or "could not create any TCP/IP sockets" in message
    assert str(tmp_path / "pgdata.log") in message
    assert not server.running


def test_a_socket_dir_someone_else_could_control_is_refused(tmp_path: Path) -> None:
    from billstream_localstack.postgres import check_private_dir

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    check_private_dir(private, {os.getuid()})  # ours and private: fine
    with pytest.raises(StartupError, match="not a private directory"):
        check_private_dir(private, {os.getuid() + 4242})  # made by someone else
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(StartupError, match="not a private directory"):
        check_private_dir(open_dir, {os.getuid()})
    link = tmp_path / "link"
    link.symlink_to(private)
    with pytest.raises(StartupError, match="not a private directory"):
        check_private_dir(link, {os.getuid()})
