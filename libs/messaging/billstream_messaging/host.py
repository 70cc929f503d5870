"""ServiceHost: runs one service — migrations, HTTP API, outbox relay, consumers, background
tasks — and gives it its command line (`serve`, `migrate`, `rebuild`).

A service's `bootstrap.py` (its one composition root) builds a ServiceHost from its settings,
routers, consumers and tasks; tests call the same bootstrap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import shutil
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

import asyncpg
import structlog
import uvicorn
from fastapi import APIRouter, FastAPI
from faststream.kafka import KafkaBroker

from billstream_contracts.topics import SUBSCRIPTION_EVENTS
from billstream_messaging import records
from billstream_messaging.consumer import EventConsumer, EventContext, Redriven
from billstream_messaging.groups import leave_group_on_stop
from billstream_messaging.relay import OutboxRelay
from billstream_messaging.replay import rebuild
from billstream_messaging.store import EventStore
from billstream_messaging.topics import ensure_topics
from billstream_runtime import db
from billstream_runtime.auth import Authenticator, project_api_key_event
from billstream_runtime.http import create_app
from billstream_runtime.logging import configure_logging
from billstream_runtime.metrics import (
    Metrics,
    enable_multiprocess,
    fresh_multiprocess_dir,
    process_gone,
)
from billstream_runtime.settings import ServiceSettings
from billstream_runtime.telemetry import configure_tracing

RUNTIME_MIGRATIONS = Path(__import__("billstream_runtime").__file__).parent / "migrations"
MESSAGING_MIGRATIONS = Path(__file__).parent / "migrations"

Task = Callable[["ServiceHost"], Awaitable[None]]


async def _on_api_key(ctx: EventContext) -> None:
    await project_api_key_event(ctx.conn, ctx.envelope.tenant_id, ctx.envelope.type,
                                ctx.envelope.data)


#: Handlers every service that does not own API keys merges into a consumer of
#: `billstream.subscription.events`, so that it can authenticate requests on its own.
API_KEY_HANDLERS = {"api_key.created": _on_api_key, "api_key.revoked": _on_api_key}
AUTH_TOPIC = SUBSCRIPTION_EVENTS


class ServiceHost:
    def __init__(
        self,
        *,
        settings: ServiceSettings,
        title: str,
        migrations: Path,
        routers: Iterable[APIRouter] = (),
        consumers: Iterable[EventConsumer] = (),
        tasks: Iterable[Task] = (),
        read_models: Mapping[str, Iterable[str]] | None = None,
        store: EventStore | None = None,
        state: Mapping[str, object] | None = None,
        connection_setup: db.ConnectionSetup | None = None,
    ) -> None:
        records.install()  # a record whose header names are not UTF-8 must not stop a consumer
        self.settings = settings
        self.connection_setup = connection_setup  # run on each new database connection
        self.name = settings.service_name
        self.store = store or EventStore(self.name)
        self.metrics = Metrics(self.name)
        self.consumers = list(consumers)
        self.tasks = list(tasks)
        self.read_models = {k: list(v) for k, v in (read_models or {}).items()}
        self.migrations = [RUNTIME_MIGRATIONS, MESSAGING_MIGRATIONS, migrations]
        self.app: FastAPI = create_app(service=self.name, title=title, routers=routers)
        self.app.state.settings = settings
        self.app.state.metrics = self.metrics
        self.app.state.store = self.store
        self.app.state.host = self
        for key, value in (state or {}).items():
            setattr(self.app.state, key, value)
        self.pool: asyncpg.Pool | None = None
        self.broker: KafkaBroker | None = None
        self.relay: OutboxRelay | None = None
        self._server: uvicorn.Server | None = None
        self._running: list[asyncio.Task] = []
        self._stopped = asyncio.Event()
        self.log = structlog.get_logger("billstream.host").bind(service=self.name)

    # -- lifecycle ---------------------------------------------------------------------------
    async def open_database(self) -> asyncpg.Pool:
        self.pool = await self._connect()
        return self.pool

    async def _connect(self) -> asyncpg.Pool:
        """A pool on the service's database, migrated (for the commands that run beside a
        service, too: they never take the host's own pool)."""
        await db.wait_for_database(self.settings.database_url)
        pool = await db.create_pool(
            self.settings.database_url, self.settings.db_pool_min, self.settings.db_pool_max,
            setup=self.connection_setup,
        )
        applied = await db.migrate(pool, *self.migrations)
        if applied:
            self.log.info("migrated", applied=applied)
        note = await db.collation_note(pool)
        if note is not None:
            self.log.warning("database_collation_slow", note=note)
        return pool

    async def start(self, *, serve_http: bool = True,
                    sockets: list[socket.socket] | None = None) -> None:
        configure_tracing(self.name, self.settings.otel_exporter_otlp_endpoint)
        leave_group_on_stop(self.settings.consumer_leave_group)
        pool = await self.open_database()
        self.app.state.pool = pool
        self.app.state.authenticator = Authenticator(pool)
        self.app.state.ready_checks = [self._db_ready, self._relay_ready, self._broker_ready]
        await ensure_topics(self.settings.kafka_bootstrap)
        self.broker = KafkaBroker(
            self.settings.kafka_bootstrap, graceful_timeout=15.0, logger=None,
            client_id=f"billstream-{self.name}",
        )
        for consumer in self.consumers:
            await consumer.attach(self.broker, pool)
        await self.broker.start()
        self.relay = OutboxRelay(store=self.store, pool=pool, settings=self.settings,
                                 metrics=self.metrics)
        await self.relay.start()
        for task in self.tasks:
            self._running.append(asyncio.create_task(self._guard(task), name=task.__name__))
        if serve_http:
            config = uvicorn.Config(
                self.app, host=self.settings.http_host, port=self.settings.http_port,
                log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=10,
                http=_http_protocol(),
            )
            self._server = uvicorn.Server(config)
            self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
            self._running.append(asyncio.create_task(self._server.serve(sockets=sockets),
                                                     name="http"))
            while not self._server.started:
                if self._running[-1].done():
                    self._running[-1].result()
                await asyncio.sleep(0.02)
        self.log.info("service_started", port=self.settings.http_port,
                      consumers=[c.group_id for c in self.consumers])

    async def stop(self) -> None:
        """Graceful: stop taking requests, drain in-flight consumer batches, stop the relay."""
        if self._server:
            self._server.should_exit = True
        if self.broker:
            await self.broker.stop()
        if self.relay:
            await self.relay.stop()
        for task in self._running:
            if task.get_name() != "http":
                task.cancel()
        # A cancellation can be lost (Python 3.11's wait_for may swallow one that lands as its
        # inner await completes, and a task may turn it into an exception): cancel again
        # until every task has ended, rather than wait forever for one.
        pending = {t for t in self._running if not t.done()}
        while pending:
            _done, pending = await asyncio.wait(pending, timeout=5.0)
            if pending:
                self.log.warning("tasks_still_running",
                                 tasks=sorted(t.get_name() for t in pending))
                for task in pending:
                    task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        if self.pool:
            await self.pool.close()
        self._stopped.set()
        self.log.info("service_stopped")

    async def _guard(self, task: Task) -> None:
        """Run a background task, restarting it after failures."""
        backoff = 0.2
        while True:
            try:
                await task(self)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep background work alive
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise asyncio.CancelledError() from exc  # stopping: never restart
                self.log.warning("task_failed", task=task.__name__, error=repr(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _db_ready(self) -> bool:
        assert self.pool is not None
        return await self.pool.fetchval("SELECT true")

    def _relay_ready(self) -> bool:
        return self.relay is not None and self.relay.ready()

    def _broker_ready(self) -> bool:
        return self.broker is not None and self.broker.running

    # -- command line ------------------------------------------------------------------------
    async def serve_forever(self, sockets: list[socket.socket] | None = None,
                            children: list[int] | None = None) -> int:
        """Serve until SIGINT/SIGTERM; with `children` (pre-forked workers), also stop — and
        return 1 — when one of them dies, so that whatever supervises the service restarts it
        whole rather than leave it running short of a worker."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        failed = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watcher = None
        if children:
            async def watch() -> None:  # (SIGCHLD belongs to the event loop: poll instead)
                nonlocal failed
                while children:
                    for pid in list(children):
                        done, status = os.waitpid(pid, os.WNOHANG)
                        if done:
                            children.remove(pid)
                            if not stop.is_set():  # not part of a stop: a worker died
                                self.log.error("worker_exited", pid=pid, status=status)
                                failed = True
                                stop.set()
                    await asyncio.sleep(0.5)

            watcher = asyncio.create_task(watch(), name="workers")
        await self.start(sockets=sockets)
        await stop.wait()
        for pid in children or ():  # the workers drain at the same time as this process
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if watcher:
            watcher.cancel()
        await self.stop()
        return 1 if failed else 0

    async def migrate_only(self) -> None:
        pool = await self._connect()
        await pool.close()

    def _full_name(self, consumer: str) -> str:
        """`usage` or `metering.usage` -> `metering.usage`."""
        return consumer if consumer.startswith(f"{self.name}.") else f"{self.name}.{consumer}"

    async def redrive(self, consumer: str) -> Redriven:
        """Apply the consumer's dead-lettered events again (EventConsumer.redrive), from this
        process, beside a running service: events its handlers append are the relay's to
        publish like any other."""
        full = self._full_name(consumer)
        chosen = [c for c in self.consumers if c.name == full]
        if not chosen:
            raise SystemExit(f"unknown consumer {consumer!r}; known: "
                             f"{', '.join(c.name for c in self.consumers) or '-'}")
        pool = await self._connect()
        # no subscribers: it only publishes what fails again to the dead-letter topic
        broker = KafkaBroker(self.settings.kafka_bootstrap, logger=None,
                             client_id=f"billstream-{self.name}-redrive")
        try:
            await broker.start()
            return await chosen[0].redrive(pool, broker)
        finally:
            await broker.stop()
            await pool.close()

    async def rebuild(self, consumer: str) -> int:
        full = self._full_name(consumer)
        if full not in self.read_models:
            raise SystemExit(
                f"unknown read model {consumer!r}; known: {', '.join(self.read_models) or '-'}"
            )
        pool = await self._connect()
        try:
            return await rebuild(pool, full, self.read_models[full])
        finally:
            await pool.close()


def _http_protocol() -> str:
    """httptools (C) parses HTTP several times faster than h11 (pure Python): it matters for
    1,000-event usage batches. h11 when httptools is not installed."""
    try:
        import httptools  # noqa: F401
    except ImportError:  # pragma: no cover
        return "h11"
    return "httptools"


def _run(main: Awaitable[object]):
    """Run a service's main coroutine on uvloop when it is installed (a faster event loop
    under asyncpg, aiokafka and uvicorn), else on asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - e.g. Windows
        return asyncio.run(main)  # type: ignore[arg-type]
    return uvloop.run(main)  # type: ignore[arg-type]


def tune_gc(threshold: int) -> None:
    """Python's cyclic garbage collector for a serving process. With the default thresholds
    (a young collection per 700 new container objects, a full one every 100 young ones), a
    batch of 1,000 usage events (several dicts, lists and dataclasses each) triggered dozens
    of collections and a full one over every live object every few batches: a quarter of
    ingestion's CPU (bench/README.md). What is alive once the service is built is frozen
    (never scanned again), and a young collection runs per `threshold` new objects, a full
    one every 200 young ones (every ten million or so allocations: seconds under load), so
    cyclic garbage does not linger for minutes. Garbage without cycles is freed by reference
    counting as always; 0 keeps Python's defaults."""
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(threshold, 20, 10)


def serve_workers(host: ServiceHost) -> int:
    """`serve` with `settings.workers` processes: migrate once, bind the HTTP socket, fork
    the other workers; every worker is a whole replica (API, consumers in the same groups,
    tasks; one relay leads by advisory lock) sharing the listening socket, so the kernel
    spreads connections. One Python process runs on one core: a hot path such as usage
    ingestion needs several to use the machine."""
    settings = host.settings
    if settings.workers <= 1:
        tune_gc(settings.gc_threshold)
        return _run(host.serve_forever())
    asyncio.run(host.migrate_only())  # before any fork, on a loop that is closed after
    tune_gc(settings.gc_threshold)  # before the fork: the frozen objects stay shared pages
    sock = socket.socket(socket.AF_INET6 if ":" in settings.http_host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.http_host, settings.http_port))
    sock.listen(2048)
    sock.set_inheritable(True)
    children: list[int] = []
    parent = os.getpid()
    for worker in range(1, settings.workers):
        pid = os.fork()
        if pid == 0:  # a worker: serve until told to stop, or until the parent is gone
            _die_with_parent()
            if os.getppid() != parent:  # the parent died before the line above took effect
                os._exit(1)
            host.log = host.log.bind(worker=worker)
            code = 1
            try:
                code = _run(host.serve_forever(sockets=[sock]))
            finally:
                os._exit(code)
        children.append(pid)
    try:
        code = _run(host.serve_forever(sockets=[sock], children=children))
    finally:
        for pid in children:  # a clean stop reaches the workers too (same signal, or this)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            process_gone(pid)
    return code


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (even by SIGKILL), so no orphaned
    worker keeps the port."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def run_cli(build: Callable[[], ServiceHost], argv: list[str] | None = None) -> None:
    """The service's command line: `serve` (default), `migrate`, `rebuild CONSUMER`,
    `redrive CONSUMER`."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run migrations, then the API, relay and consumers")
    sub.add_parser("migrate", help="apply pending migrations and exit")
    rb = sub.add_parser("rebuild", help="drop a read model; it is rebuilt by replay at start")
    rb.add_argument("consumer")
    rd = sub.add_parser("redrive", help="apply a consumer's dead-lettered events again")
    rd.add_argument("consumer")
    args = parser.parse_args(argv)
    metrics_dir = None
    owner = os.getpid()  # (forked workers end with os._exit: only this process cleans up)
    if args.command in (None, "serve"):
        # workers share the port: /metrics of any of them sums them all (see metrics.py)
        metrics_dir = fresh_multiprocess_dir()
        enable_multiprocess(metrics_dir)
    try:
        _run_command(build, args)
    finally:
        if metrics_dir is not None and os.getpid() == owner:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_command(build: Callable[[], ServiceHost], args: argparse.Namespace) -> None:
    host = build()
    configure_logging(host.name, host.settings.log_level, host.settings.log_json)
    if args.command == "migrate":
        _run(host.migrate_only())
    elif args.command == "rebuild":
        generation = _run(host.rebuild(args.consumer))
        print(f"{args.consumer}: read model emptied; generation {generation} replays at start")
    elif args.command == "redrive":
        done = _run(host.redrive(args.consumer))
        print(f"{args.consumer}: {done.applied} applied, "
              f"{done.dead_lettered_again} dead-lettered again")
        if done.dead_lettered_again:
            raise SystemExit(1)
    else:
        raise SystemExit(serve_workers(host))
