from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from billstream_localstack._proc import (
    LOOPBACK,
    free_port,
    log_size,
    log_tail,
    port_is_free,
    run_sync,
    write_private,
)
from billstream_localstack.postgres import dsn_for_database


def test_log_tail_reads_only_what_came_after_the_offset(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    log.write_text("old run\n")
    start = log_size(log)
    with log.open("a") as file:
        file.write("".join(f"line {n}\n" for n in range(100)))
    tail = log_tail(log, since=start, lines=3)
    assert tail == "line 97\nline 98\nline 99"
    assert "old run" not in log_tail(log, since=start)


def test_log_tail_of_missing_or_empty_log(tmp_path: Path) -> None:
    assert "no log" in log_tail(tmp_path / "missing.log")
    (tmp_path / "empty.log").touch()
    assert "empty log" in log_tail(tmp_path / "empty.log")


def test_port_is_free() -> None:
    with socket.socket() as server:
        server.bind((LOOPBACK, 0))
        server.listen()
        assert not port_is_free(server.getsockname()[1])
    assert port_is_free(free_port())


async def test_run_sync_works_inside_a_running_event_loop() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert run_sync(answer) == 42


def test_write_private(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    write_private(path, "token")
    assert path.read_text() == "token"
    assert path.stat().st_mode & 0o777 == 0o600


def test_dsn_for_database_keeps_credentials_and_query() -> None:
    dsn = "postgresql://app:pw@db.example:5433/postgres?sslmode=require"
    assert dsn_for_database(dsn, "billstream_invoicing") == (
        "postgresql://app:pw@db.example:5433/billstream_invoicing?sslmode=require"
    )
    assert dsn_for_database("postgresql://postgres@127.0.0.1:5432", "x") == (
        "postgresql://postgres@127.0.0.1:5432/x"
    )
