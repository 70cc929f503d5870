"""Child processes of the local stack: spawn them in their own session, stop them politely,
kill what is left, and explain failures with the tail of their log."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

import psutil

T = TypeVar("T")

LOOPBACK = "127.0.0.1"


class StartupError(RuntimeError):
    """A process of the local stack did not come up."""


def free_port() -> int:
    """A TCP port on the loopback interface that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True when a server could bind `port` on the loopback interface.

    SO_REUSEADDR mirrors what servers do, so a port in TIME_WAIT counts as free.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def log_size(path: Path) -> int:
    """The current size of a log file (0 when missing): where the next run's output starts."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def log_tail(path: Path, *, since: int = 0, lines: int = 40) -> str:
    """The last `lines` lines written to `path` after byte offset `since`."""
    try:
        with path.open("rb") as log:
            log.seek(since)
            text = log.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else f"(empty log at {path})"


def startup_error(what: str, reason: str, log_path: Path, *, since: int = 0) -> StartupError:
    """A StartupError that names the process, the reason, the log and the log's tail."""
    tail = log_tail(log_path, since=since)
    return StartupError(f"{what} {reason}. Log {log_path}, last lines:\n{tail}")


def write_private(path: Path, text: str) -> None:
    """Write a file that only its owner may read (it holds a secret)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    path.chmod(0o600)


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session (so a terminal's Ctrl-C only reaches us), appending its
    stdout and stderr to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            user=user,
            cwd=cwd,
            start_new_session=True,
        )


def signal_group(pid: int, signum: int) -> None:
    """Signal the process group led by `pid` (our children lead their own), or `pid` alone."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        with suppress(ProcessLookupError):
            os.kill(pid, signum)


def kill_group(pid: int) -> None:
    signal_group(pid, signal.SIGKILL)


def terminate(
    procs: Sequence[subprocess.Popen[bytes]],
    *,
    signum: int = signal.SIGTERM,
    timeout: float = 10.0,
) -> None:
    """Send `signum` to every child still running, give them `timeout` seconds together to
    exit, then SIGKILL the process groups of the survivors. Every child is reaped."""
    for proc in procs:
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                proc.send_signal(signum)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.wait()


def terminate_pid(pid: int, *, signum: int, timeout: float) -> None:
    """Like `terminate`, for a process that is not our child (left by an earlier run)."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signum)
        proc.wait(timeout=timeout)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        kill_group(pid)
        with suppress(psutil.NoSuchProcess):
            proc.wait(timeout=timeout)


def wait_for(
    condition: Callable[[], bool],
    *,
    timeout: float,
    failed: Callable[[], str | None] = lambda: None,
    interval: float = 0.1,
) -> str | None:
    """Poll `condition` until it holds (returns None) or `failed` returns a reason (returned).

    Returns "timed out after N s" when neither happens in time.
    """
    deadline = time.monotonic() + timeout
    while True:
        reason = failed()
        if reason is not None:
            return reason
        if condition():
            return None
        if time.monotonic() >= deadline:
            return f"timed out after {timeout:g} s"
        time.sleep(interval)


def exit_reason(proc: subprocess.Popen[bytes] | None) -> str | None:
    """'exited with code N' when the child has exited, else None."""
    if proc is None or proc.poll() is None:
        return None
    return f"exited with code {proc.returncode}"


def run_sync(make_coro: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from synchronous code, even inside a running event loop
    (then in a helper thread with its own loop), so that the sync API works from async tests."""

    async def main() -> T:
        return await make_coro()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, main()).result()
