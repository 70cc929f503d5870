"""Ingestion throughput, latency and memory, next to the same run's ceilings.

Only two services run, each as its own OS process with its own database: ingestion (measured)
and subscription (which creates the tenant, its secret key, the meter `api_calls` and the 1,000
customers the load names, `bench-cust-0000` …; BENCH_KNOWN_CUSTOMERS=0 leaves them uncreated,
so that every event is for a customer not known yet).
Load comes from `bench/ingest_load.py`, another OS process. The bench process only measures:
it samples the ingestion process's RSS every 100 ms, the CPU time of every process involved,
the relay position in ingestion's database, and (for latency) consumes
`billstream.usage.accepted`.

Figures (units in the names):

- `http_batches`: closed loop, `connections` connections each posting the next pre-built body
  of 1,000 unique events as soon as the previous answer came. `acked_events_per_s`: events
  answered 200/accepted per second (every answer is checked: 200, every event `accepted`);
  `published_events_per_s`: events per second until the relay had published the last one to
  `billstream.usage.accepted` (relay_state.published_seq reached the log head); request
  latency p50/p99. Then the same bodies again (`dedup_*`): every event must be `duplicate`
  and `usage_keys` must not grow.
- `latency_at_20k`: open loop offering BENCH_LATENCY_RATE events/s (default 20,000) in batches
  of BENCH_LATENCY_BATCH for BENCH_LATENCY_SECONDS; per event, the time from the batch's
  scheduled send to the moment the bench consumed the record on `billstream.usage.accepted`
  carrying its idempotency key (a `usage.batch_accepted` carries a batch).
- `kafka_input`: events preloaded onto `billstream.usage.raw` while ingestion is stopped,
  then ingestion started; events/s from ready until all are durable (the log head sampled
  every 50 ms reached its final position, known once the input's consumer group committed
  every record; usage_keys is checked exactly afterwards) and until
  all are on `usage.accepted`. `sustained_events_per_s`: the rate between the samples at
  which 10% and 90% of the events were durable (without the consumer group forming after
  ready, `first_durable_after_ready_s`, and the last polls), and the same for publishing
  (`sustained_published_events_per_s`); the target ("100,000 events/s sustained") is judged
  on the lower of the two, and the rate from ready is reported next to it. "not available"
  while ingestion has no consumer of the topic.
- `memory`: the ingestion process's RSS, peak and steady (median of the phase's second half);
  with several workers the largest one's, all of them together (`peak_total_mb`), and
  their PSS together (`peak_total_pss_mb`: pages the forked workers share counted once).
- `cpu_<phase>`: CPU used by each process during the phase, percent of one core (the machine
  has `machine_cores`; `machine_busy_pct` is of all cores together). `other_processes_pct` is
  what the rest of the machine used meanwhile: when it is high the throughput figures are
  low, and `events_per_ingestion_cpu_s` (events per CPU second of the ingestion process) is
  the figure to compare between runs. `wal_bytes_per_event`: PostgreSQL's WAL written during
  the phase (the server's WAL insert position, before and after) per event.
- `ratios`: throughput over the same run's ceilings (HTTP/Kafka events/s against PostgreSQL
  COPY and unnest-insert rows/s and the broker's produce/consume msgs/s), and against the
  targets (HTTP 50,000 acknowledged events/s, Kafka 100,000 events/s, p99 500 ms at the
  offered rate, ingestion RSS 300 MB) with `*_target_met`. Ceilings come from the same run
  (ctx.results) or, with BENCH_ONLY=ingestion, from an earlier bench/results/ceilings.json
  (named in `ceilings_from`).

Correctness is checked, and a failure raises (the run exits non-zero): every answer 200 with
every event accepted (then duplicate), the log and usage_keys grow by exactly the events sent
(and not at all when resent), every latency event reaches usage.accepted. A 503 from the
service's backpressure is retried after Retry-After and counted (`busy_answers_retried`), as
is a lost connection (`transport_errors_retried`; the resent events may answer `duplicate`).

Environment: BENCH_INGEST_EVENTS / BENCH_INGEST_SECONDS (the HTTP run stops at whichever
comes first; default 1,000,000 events / 30 s), BENCH_INGEST_CONNECTIONS (16: producers are a
fleet; with 6 a request waits more than it works, see bench/README.md),
BENCH_LATENCY_RATE / _BATCH / _SECONDS (20000 / 1000 / 20), BENCH_KAFKA_EVENTS (500,000),
BENCH_EVENT_PROPERTIES (0: properties per event, up to 5; bench/ingest_load.py),
BENCH_PROFILE=1 (ingestion under py-spy, else cProfile: results in
bench/results/ingestion.prof and .txt; figures taken under a profiler are not comparable).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import orjson
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from billstream_contracts.topics import USAGE_ACCEPTED, USAGE_RAW, USAGE_REJECTED
from billstream_localstack._proc import (
    LOOPBACK,
    exit_reason,
    free_port,
    log_tail,
    spawn,
    startup_error,
    terminate,
    wait_for,
)
from billstream_localstack.demo_tenant import bootstrap_demo_tenant
from billstream_localstack.postgres import create_database, dsn_for_database
from billstream_localstack.stack import EMBEDDED_BROKER_ENV
from billstream_messaging.store import published_envelope
from billstream_messaging.topics import ensure_topics

from bench.ingest_load import EVENT_PROPERTIES, event_key, percentile, with_properties

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"

N_EVENTS = int(os.environ.get("BENCH_INGEST_EVENTS", "1000000"))
HTTP_SECONDS = float(os.environ.get("BENCH_INGEST_SECONDS", "30"))
CONNECTIONS = int(os.environ.get("BENCH_INGEST_CONNECTIONS", "16"))
BATCH = 1000
CUSTOMERS = 1000
# 1: the customers the load names (bench-cust-0000 …) are created first, as a merchant's
# would be; 0: none is, and all usage is for customers not known yet (the figures before
# 2026-11-21 23:00 were taken that way)
KNOWN_CUSTOMERS = os.environ.get("BENCH_KNOWN_CUSTOMERS", "1") == "1"
LATENCY_RATE = int(os.environ.get("BENCH_LATENCY_RATE", "20000"))
LATENCY_BATCH = int(os.environ.get("BENCH_LATENCY_BATCH", "1000"))
LATENCY_SECONDS = float(os.environ.get("BENCH_LATENCY_SECONDS", "20"))
KAFKA_EVENTS = int(os.environ.get("BENCH_KAFKA_EVENTS", "500000"))
PROFILE = os.environ.get("BENCH_PROFILE") == "1"

TARGET_HTTP_EVENTS_PER_S = 50_000
TARGET_KAFKA_EVENTS_PER_S = 100_000
TARGET_P99_MS = 500
TARGET_RSS_MB = 300

# How long the Kafka input may take to show its first durable event before it counts as absent.
KAFKA_INPUT_GRACE_S = 30.0
# Any wait for progress fails after this long without progress.
STALL_S = 120.0


class BenchFailure(RuntimeError):
    """A correctness check failed: the figures would be meaningless."""


# ------------------------------------------------------------------------------ processes


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    pid: int  # the service itself (differs from proc.pid under py-spy)
    url: str
    database_url: str
    log_path: Path
    log_start: int = 0


@dataclass
class Platform:
    """Ingestion and subscription as OS processes, each with its own new database."""

    ctx: object
    workdir: Path
    stamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S") +
                       uuid.uuid4().hex[:6])
    admin_token: str = field(default_factory=lambda: uuid.uuid4().hex)
    services: dict[str, Service] = field(default_factory=dict)
    databases: list[str] = field(default_factory=list)
    profile_runs: int = 0

    @property
    def ingestion(self) -> Service:
        return self.services["ingestion"]

    @property
    def subscription(self) -> Service:
        return self.services["subscription"]

    def env(self, service: str, database_url: str, port: int) -> dict[str, str]:
        prefix = f"BILLSTREAM_{service.upper()}_"
        embedded_broker = not os.environ.get("BILLSTREAM_KAFKA_BOOTSTRAP")
        return {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "BILLSTREAM_KAFKA_BOOTSTRAP": self.ctx.kafka_bootstrap,
            "BILLSTREAM_ADMIN_TOKEN": self.admin_token,
            "BILLSTREAM_LOG_LEVEL": "WARNING",
            # own consumer groups, so a reused external broker's offsets do not matter
            "BILLSTREAM_CONSUMER_GROUP_PREFIX": f"bench{self.stamp}",
            **(EMBEDDED_BROKER_ENV if embedded_broker else {}),
            # ingestion logs little at INFO (no per-request lines): its Kafka input's partition
            # assignments and the relay's leadership, shown if the input takes nothing
            **({prefix + "LOG_LEVEL": "INFO"} if service == "ingestion" else {}),
            prefix + "DATABASE_URL": database_url,
            prefix + "HTTP_HOST": LOOPBACK,
            prefix + "HTTP_PORT": str(port),
        }

    async def start(self) -> None:
        await ensure_topics(self.ctx.kafka_bootstrap)
        for service in ("subscription", "ingestion"):
            name = f"bench_{service}_{self.stamp}"
            await create_database(self.ctx.server_dsn, name)
            self.databases.append(name)
            self.spawn(service, dsn_for_database(self.ctx.server_dsn, name))
        for service in self.services.values():
            await asyncio.to_thread(self.wait_ready, service)

    def spawn(self, service: str, database_url: str, port: int | None = None) -> Service:
        port = port or free_port()
        log_path = self.workdir / f"{service}.log"
        start = log_path.stat().st_size if log_path.exists() else 0
        argv = [sys.executable, "-m", f"billstream_{service}", "serve"]
        if service == "ingestion" and PROFILE:
            argv = self.profiled_argv()
        proc = spawn(argv, log_path=log_path, env=self.env(service, database_url, port), cwd=ROOT)
        pid = proc.pid
        if argv[0].endswith("py-spy"):
            pid = _child_pid(proc)
        svc = Service(service, proc, pid, f"http://{LOOPBACK}:{port}", database_url, log_path,
                      start)
        self.services[service] = svc
        return svc

    def profiled_argv(self) -> list[str]:
        self.profile_runs += 1
        suffix = "" if self.profile_runs == 1 else f"-{self.profile_runs}"
        pyspy = shutil.which("py-spy")
        if pyspy:
            return [pyspy, "record", "-o", str(RESULTS / f"ingestion{suffix}.svg"), "--",
                    sys.executable, "-m", "billstream_ingestion", "serve"]
        return [sys.executable, "-m", "bench.serve_profiled",
                str(RESULTS / f"ingestion{suffix}.prof")]

    def wait_ready(self, svc: Service, timeout: float = 120.0) -> None:
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            def ready() -> bool:
                try:
                    return client.get(f"{svc.url}/readyz").status_code == 200
                except httpx.HTTPError:
                    return False

            reason = wait_for(ready, timeout=timeout, failed=lambda: exit_reason(svc.proc),
                              interval=0.1)
        if reason is not None:
            raise startup_error(f"{svc.name} (GET {svc.url}/readyz)", reason, svc.log_path,
                                since=svc.log_start)

    def stop_service(self, svc: Service, timeout: float = 30.0) -> None:
        if svc.pid != svc.proc.pid:  # py-spy: stop the service, py-spy then writes its output
            with contextlib.suppress(ProcessLookupError):
                os.kill(svc.pid, signal.SIGTERM)
        terminate([svc.proc], timeout=timeout)

    def exited(self) -> dict[str, str]:
        return {name: reason for name, svc in self.services.items()
                if (reason := exit_reason(svc.proc))}

    async def stop(self) -> None:
        procs = [svc.proc for svc in self.services.values()]
        for svc in self.services.values():
            if svc.pid != svc.proc.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(svc.pid, signal.SIGTERM)
        # not in a thread: a cancelled run (Ctrl-C) must still wait for them
        terminate(procs, timeout=30.0)
        for name in self.databases:
            try:
                conn = await asyncpg.connect(self.ctx.server_dsn)
                try:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                finally:
                    await conn.close()
            except (OSError, asyncpg.PostgresError) as exc:
                print(f"bench: could not drop database {name}: {exc}", flush=True)


def _child_pid(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = psutil.Process(proc.pid).children()
        if children:
            return children[0].pid
        time.sleep(0.05)
    return proc.pid


class LoadGenerator:
    """bench/ingest_load.py in its own process, driven one command per line."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @classmethod
    async def start(cls, config: dict, log_path: Path) -> tuple[LoadGenerator, dict]:
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.ingest_load", json.dumps(config), cwd=ROOT,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                limit=64 * 1024 * 1024, start_new_session=True)
        gen = cls(proc, log_path)
        ready = await gen._answer(timeout=300)
        if not ready.get("ready"):
            await gen.close()
            raise BenchFailure(f"load generator not ready: {ready}")
        return gen, ready

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def command(self, command: dict, timeout: float = 1800) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(command) + b"\n")
        await self.proc.stdin.drain()
        return await self._answer(timeout)

    async def _answer(self, timeout: float) -> dict:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            await self.proc.wait()
            raise BenchFailure(f"load generator exited with code {self.proc.returncode}:\n"
                               + log_tail(self.log_path))
        return orjson.loads(line)

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# ------------------------------------------------------------------------------ measuring


def with_workers(pid: int | None) -> list[int]:
    """A service's process and its pre-forked workers (BILLSTREAM_INGESTION_WORKERS)."""
    if not pid:
        return []
    return [pid] + descendants(pid)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc/PID/task/*/children: one small read per thread.
    psutil's children() reads the stat file of every process on the machine; sampled ten
    times a second that was a few percent of a core taken from what the bench measures."""
    if not _CHILDREN_FILES:  # a kernel built without them
        try:
            return [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:  # gone
            continue
        for tid in tasks:
            try:
                children = [int(c) for c in
                            Path(f"/proc/{parent}/task/{tid}/children").read_text().split()]
            except OSError:  # the thread or the process is gone
                continue
            out += children
            todo += children
    return out


_CHILDREN_FILES = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()


class RssSampler:
    """VmRSS of the ingestion process(es) every 100 ms (it follows `pid` across a restart).
    With several workers, `peak_mb` is the largest single process, `peak_total_mb` all.

    The workers are forked after start-up, so the pages they still share (the interpreter,
    the imported code, what start-up froze) count in each one's RSS; `peak_total_pss_mb` is
    the service's own footprint: every process's PSS (a shared page counts 1/n in each of
    the n processes sharing it), read every 500 ms (`smaps_rollup` walks the page tables)."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.samples: list[tuple[float, float]] = []  # (monotonic, MB of the largest process)
        self.totals: list[tuple[float, float]] = []  # (monotonic, MB of all of them)
        self.pss_totals: list[tuple[float, float]] = []  # (monotonic, PSS MB of all of them)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        tick = 0
        while True:
            if self.pid:
                pids = with_workers(self.pid)
                sizes = [mb for pid in pids if (mb := _proc_kb(pid, "status", "VmRSS"))]
                if sizes:
                    now = time.monotonic()
                    self.samples.append((now, max(sizes)))
                    self.totals.append((now, sum(sizes)))
                if tick % 5 == 0:
                    pss = [mb for pid in pids if (mb := _proc_kb(pid, "smaps_rollup", "Pss"))]
                    if pss:
                        self.pss_totals.append((time.monotonic(), sum(pss)))
                tick += 1
            await asyncio.sleep(0.1)

    def window(self, start: float, end: float) -> dict:
        values = [mb for t, mb in self.samples if start <= t <= end]
        if not values:
            return {}
        second_half = values[len(values) // 2:]
        totals = [mb for t, mb in self.totals if start <= t <= end]
        pss = [mb for t, mb in self.pss_totals if start <= t <= end]
        out = {"peak_mb": round(max(values), 1),
               "steady_mb": round(statistics.median(second_half), 1),
               "peak_total_mb": round(max(totals), 1)}
        if pss:
            out["peak_total_pss_mb"] = round(max(pss), 1)
        return out


def _proc_kb(pid: int, name: str, field: str) -> float | None:
    """A `field: N kB` line of /proc/PID/NAME, in MB; None once the process is gone (a
    zombie has no VmRSS)."""
    try:
        text = Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


class CpuMeter:
    """CPU time used by groups of processes over a phase, in percent of one core."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.group_of: dict[int, str] = {}
        self.used_s: dict[str, float] = {}  # CPU seconds by group, once stopped
        self._task: asyncio.Task | None = None

    def _sample(self, started: float | None = None) -> None:
        for group, pids in self.groups.items():
            for pid in pids():
                try:
                    proc = psutil.Process(pid)
                    times = proc.cpu_times()
                    used = times.user + times.system
                    if pid not in self.first:
                        # a process born during the phase used all its CPU time in it
                        born_inside = started is None and proc.create_time() > self.wall0
                        self.first[pid] = 0.0 if born_inside else used
                    self.last[pid] = used
                    self.group_of[pid] = group
                except psutil.Error:
                    continue

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            await asyncio.to_thread(self._sample)

    def start(self) -> None:
        self.wall0 = time.time()
        self.t0 = time.monotonic()
        self.machine0 = psutil.cpu_times()
        self._sample(started=self.t0)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._sample()
        wall = time.monotonic() - self.t0
        machine1 = psutil.cpu_times()
        busy = (sum(machine1) - machine1.idle - getattr(machine1, "iowait", 0)) - (
            sum(self.machine0) - self.machine0.idle - getattr(self.machine0, "iowait", 0))
        out = {}
        ours = 0.0
        for group in self.groups:
            used = sum(self.last[p] - self.first[p] for p, g in self.group_of.items()
                       if g == group)
            ours += used
            self.used_s[group] = used
            out[f"{group}_pct"] = round(100 * used / wall, 1)
        out["machine_busy_pct"] = round(100 * busy / wall, 1)
        # Anything else running on the machine meanwhile (tests, builds) disturbs the figures.
        out["other_processes_pct"] = round(max(0.0, 100 * (busy - ours) / wall), 1)
        if out["other_processes_pct"] > 20:
            out["warning"] = (f"other processes used {out['other_processes_pct']}% CPU during "
                              "this phase: the figures are lower than on a quiet machine")
        out["machine_cores"] = psutil.cpu_count()
        return out


def postgres_pids(postmaster: int | None) -> Callable[[], list[int]]:
    def pids() -> list[int]:
        if postmaster is None or not psutil.pid_exists(postmaster):
            return []
        return [postmaster] + descendants(postmaster)
    return pids


def broker_pid(bootstrap: str) -> int | None:
    """The process listening on the broker's port, when it runs on this machine."""
    host, _, port = bootstrap.rpartition(":")
    if host not in (LOOPBACK, "localhost"):
        return None
    with contextlib.suppress(psutil.Error, ValueError):
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == int(port) and conn.pid:
                return conn.pid
    return None


#: The log rows that hold usage (a `usage.batch_accepted` many, an older `usage.accepted` one).
_USAGE_ROWS = "type IN ('usage.batch_accepted', 'usage.accepted')"


def usages_in_row(row) -> int:
    """The usage events in a log row (its envelope may be stored compressed: counted in
    Python, after the measured window)."""
    if row["type"] != "usage.batch_accepted":
        return 1
    envelope = published_envelope(row["seq"], row["envelope"], row["envelope_codec"])
    return len(orjson.loads(envelope)["data"]["usages"])


class IngestionDb:
    def __init__(self, pool: asyncpg.Pool, tenant_id: str) -> None:
        self.pool = pool
        self.tenant_id = tenant_id

    async def positions(self) -> tuple[int, int]:
        """(log head, relay published position)."""
        row = await self.pool.fetchrow(
            "SELECT (SELECT last_seq FROM event_log_head) AS head,"
            " (SELECT published_seq FROM relay_state) AS published")
        return row["head"], row["published"]

    async def logged_usages(self, after_seq: int, upto_seq: int | None = None) -> int:
        """Usage events in the log rows after `after_seq` (up to `upto_seq`; a
        `usage.batch_accepted` holds many, an older `usage.accepted` one)."""
        rows = await self.pool.fetch(
            "SELECT seq, type, envelope, envelope_codec FROM event_log"
            f" WHERE seq > $1 AND seq <= $2 AND {_USAGE_ROWS}", after_seq,
            upto_seq if upto_seq is not None else 2**62)
        return sum(usages_in_row(r) for r in rows)

    async def sustained_rate(self, samples: list[tuple[float, int, int]], head0: int,
                             events: int) -> dict:
        """From (monotonic, head, published) samples of a run that made `events` durable
        after log position `head0`: when the first became durable, and the rate between the
        first samples showing 10% and 90% of them durable."""
        rows = await self.pool.fetch(
            "SELECT seq, type, envelope, envelope_codec FROM event_log"
            f" WHERE seq > $1 AND {_USAGE_ROWS} ORDER BY seq", head0)
        seqs, totals, total = [], [], 0
        for r in rows:
            total += usages_in_row(r)
            seqs.append(r["seq"])
            totals.append(total)

        def durable(head: int) -> int:
            i = bisect.bisect_right(seqs, head)
            return totals[i - 1] if i else 0

        def rate(points: list[tuple[float, int]]) -> int | None:
            t10, n10 = next((t, n) for t, n in points if n >= events * 0.1)
            t90, n90 = next((t, n) for t, n in points if n >= events * 0.9)
            return round((n90 - n10) / (t90 - t10)) if t90 > t10 else None

        points = [(t, durable(head)) for t, head, _ in samples]
        return {"first_s": next(t for t, n in points if n > 0), "rate": rate(points),
                "published_rate": rate([(t, durable(published))
                                        for t, _, published in samples])}

    async def wal_bytes(self) -> int:
        """The server's WAL insert position, in bytes: what the whole server has written (the
        subscription service's share is nothing next to ingestion's). Exact at once, unlike
        pg_stat_wal, whose backends report at most once a second."""
        return int(await self.pool.fetchval(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint"))

    async def usage_keys(self) -> int:
        return await self.pool.fetchval(
            "SELECT count(*) FROM usage_keys WHERE tenant_id = $1", self.tenant_id)

    async def wait_until(self, reached: Callable[[int, int], bool], what: str,
                         interval: float = 0.05, grace: float = STALL_S) -> float:
        """Poll the positions until `reached(head, published)`; the monotonic time it was seen.
        Fails after `grace` seconds without any movement."""
        last, moved = None, time.monotonic()
        while True:
            head, published = await self.positions()
            now = time.monotonic()
            if reached(head, published):
                return now
            if (head, published) != last:
                last, moved = (head, published), now
            elif now - moved > grace:
                raise BenchFailure(f"{what}: no progress for {grace:.0f} s "
                                   f"(head {head}, published {published})")
            await asyncio.sleep(interval)


class PositionTracker:
    """Samples (head, published) every 50 ms, so that the moment a position was reached is
    known even when the target is only known afterwards."""

    def __init__(self, db: IngestionDb) -> None:
        self.db = db
        self.samples: list[tuple[float, int, int]] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            head, published = await self.db.positions()
            self.samples.append((time.monotonic(), head, published))
            await asyncio.sleep(0.05)

    async def first(self, reached: Callable[[int, int], bool], what: str) -> float:
        """The first sample time at which `reached(head, published)` held; waits for it
        (failing after STALL_S without progress)."""
        moved, last = time.monotonic(), None
        while True:
            for t, head, published in self.samples:
                if reached(head, published):
                    return t
            if self.samples and self.samples[-1][1:] != last:
                last, moved = self.samples[-1][1:], time.monotonic()
            elif time.monotonic() - moved > STALL_S:
                raise BenchFailure(f"{what}: no progress for {STALL_S:.0f} s ({last})")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# ------------------------------------------------------------------------------ setup


async def create_tenant_and_meter(platform: Platform) -> dict:
    """A tenant, its test secret key and meter `api_calls` (sum) through subscription's admin
    and public API, and the load's customers (KNOWN_CUSTOMERS); returns once ingestion
    accepts an event for that meter."""
    sub, ing = platform.subscription, platform.ingestion
    dev = await asyncio.to_thread(
        bootstrap_demo_tenant, sub.url, platform.admin_token,
        {"subscription": sub.url, "ingestion": ing.url}, platform.workdir)
    key = dev["test_secret_key"]
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(headers=headers, timeout=30.0, trust_env=False) as client:
        response = await client.post(f"{sub.url}/v1/meters",
                                     json={"code": "api_calls", "aggregation": "sum"},
                                     headers={"Idempotency-Key": uuid.uuid4().hex})
        if response.status_code not in (200, 201):
            raise BenchFailure(f"could not create the meter: {response.status_code} "
                               f"{response.text[:300]}")
        deadline = time.monotonic() + 120
        attempt = 0
        while True:
            attempt += 1
            response = await client.post(f"{ing.url}/v1/usage/events", json={
                "idempotency_key": f"bench-probe-{platform.stamp}-{attempt}",
                "customer": "bench-cust-0000", "meter": "api_calls", "quantity": "1"})
            if response.status_code == 200 and response.json()["accepted"] == 1:
                break
            if time.monotonic() > deadline:
                raise BenchFailure("ingestion never accepted an event for meter api_calls: "
                                   f"{response.status_code} {response.text[:300]}")
            await asyncio.sleep(0.2)
        if KNOWN_CUSTOMERS:
            await create_customers(client, sub.url, CUSTOMERS)
    return {"tenant_id": dev["tenant_id"], "key": key}


async def create_customers(client: httpx.AsyncClient, url: str, n: int) -> None:
    """Customers bench-cust-0000 … with those external ids, 16 requests at a time."""
    names = iter(f"bench-cust-{c:04d}" for c in range(n))

    async def worker() -> None:
        for name in names:
            response = await client.post(f"{url}/v1/customers", json={"external_id": name},
                                         headers={"Idempotency-Key": f"bench-{name}"})
            if response.status_code not in (200, 201):
                raise BenchFailure(f"could not create customer {name}: "
                                   f"{response.status_code} {response.text[:300]}")

    await asyncio.gather(*(worker() for _ in range(16)))


def load_ceilings(ctx) -> tuple[dict | None, str]:
    record = getattr(ctx, "results", {}).get("ceilings")
    if record:
        return record["figures"], f"this run ({record['at']})"
    path = RESULTS / "ceilings.json"
    if path.exists():
        record = json.loads(path.read_text())
        return record["figures"], f"an earlier run ({record['at']}): bench/results/ceilings.json"
    return None, "none (run with BENCH_ONLY=ceilings,ingestion)"


# ------------------------------------------------------------------------------ phases


@dataclass
class Bench:
    ctx: object
    platform: Platform
    db: IngestionDb
    tenant: dict
    rss: RssSampler
    postmaster: int | None
    broker: int | None
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)

    def cpu_meter(self, generator_pid: int | None) -> CpuMeter:
        return CpuMeter({
            "ingestion": lambda: with_workers(self.platform.ingestion.pid),
            "postgres": postgres_pids(self.postmaster),
            "broker": lambda: [self.broker] if self.broker else [],
            "generator": lambda: [generator_pid] if generator_pid else [],
            "subscription": lambda: [self.platform.subscription.pid],
            "bench": lambda: [os.getpid()],
        })

    def generator_config(self, prefix: str, events: int, batch: int, connections: int,
                         **extra) -> dict:
        return {"url": self.platform.ingestion.url, "key": self.tenant["key"],
                "prefix": prefix, "events": events, "batch": batch,
                "connections": connections, "customers": CUSTOMERS, "seed": 7, **extra}

    async def http_batches(self) -> tuple[dict, dict]:
        prefix = f"h{self.platform.stamp}"
        config = self.generator_config(prefix, N_EVENTS, BATCH, CONNECTIONS)
        gen, ready = await LoadGenerator.start(config, self.platform.workdir / "load-http.log")
        try:
            await self.db.wait_until(lambda h, p: p >= h, "relay catch-up before the run")
            head0, _ = await self.db.positions()
            keys0 = await self.db.usage_keys()
            wal0 = await self.db.wal_bytes()
            tracker = PositionTracker(self.db)
            tracker.start()
            cpu = self.cpu_meter(gen.pid)
            cpu.start()
            try:
                run = await gen.command({"run": "closed", "expect": "accepted",
                                         "max_s": HTTP_SECONDS})
                cpu_figures = await cpu.stop()
                if run["errors"]:
                    raise BenchFailure(f"HTTP batches not all accepted: {run['errors'][:5]}")
                events = run["events"]
                # every answer came: every event is durable, the log head is final
                target, _ = await self.db.positions()
                t_published = await tracker.first(lambda h, p: p >= target,
                                                  "relay publishing the HTTP events")
            finally:
                await tracker.stop()
            self.windows["http_batches"] = (run["started"], run["ended"])
            wal1 = await self.db.wal_bytes()
            head1, _ = await self.db.positions()
            keys1 = await self.db.usage_keys()
            logged = await self.db.logged_usages(head0)
            if logged != events or keys1 != keys0 + events:
                raise BenchFailure(f"after {events} accepted events the log holds {logged} "
                                   f"more and usage_keys grew by {keys1 - keys0}")

            dedup = await gen.command({"run": "closed", "expect": "duplicate",
                                       "batches": run["batches"]})
            if dedup["errors"]:
                raise BenchFailure(f"resent batches not all duplicates: {dedup['errors'][:5]}")
            self.windows["http_dedup"] = (dedup["started"], dedup["ended"])
            head2, _ = await self.db.positions()
            keys2 = await self.db.usage_keys()
            if head2 != head1 or keys2 != keys1:
                raise BenchFailure(f"resending accepted events grew the log by {head2 - head1} "
                                   f"and usage_keys by {keys2 - keys1}")
        finally:
            await gen.close()
        took = run["ended"] - run["started"]
        dedup_took = dedup["ended"] - dedup["started"]
        return {
            "events": events,
            "run": f"until {N_EVENTS:,} events or {HTTP_SECONDS:g} s, whichever came first",
            "events_per_request": BATCH,
            "connections": CONNECTIONS,
            "customers": CUSTOMERS,
            "customers_known": KNOWN_CUSTOMERS,
            "acked_seconds": round(took, 2),
            "acked_events_per_s": round(events / took),
            "request_p50_ms": round(run["p50_s"] * 1000, 1),
            "request_p99_ms": round(run["p99_s"] * 1000, 1),
            "request_max_ms": round(run["max_s"] * 1000, 1),
            "busy_answers_retried": run["busy_answers"],
            "transport_errors_retried": run["transport_retries"],
            "published_seconds": round(t_published - run["started"], 2),
            "published_events_per_s": round(events / (t_published - run["started"])),
            # CPU-normalized: what one fully used core of ingestion (postgres) turns into,
            # far less sensitive to other load on the machine than events/s
            "events_per_ingestion_cpu_s": round(events / cpu.used_s["ingestion"]),
            "events_per_postgres_cpu_s": round(events / cpu.used_s["postgres"]),
            "wal_bytes_per_event": round((wal1 - wal0) / events),
            "dedup_events_per_s": round(events / dedup_took),
            "dedup_request_p50_ms": round(dedup["p50_s"] * 1000, 1),
            "dedup_request_p99_ms": round(dedup["p99_s"] * 1000, 1),
            "dedup_busy_answers_retried": dedup["busy_answers"],
            "dedup_transport_errors_retried": dedup["transport_retries"],
            "checked": "every answer 200; all accepted, then all duplicate; usage_keys +N "
                       "then +0",
            "generator_prepare_s": ready["prepare_s"],
        }, cpu_figures

    async def latency_at_rate(self) -> tuple[dict, dict]:
        prefix = f"l{self.platform.stamp}"
        events = int(LATENCY_RATE * LATENCY_SECONDS) // LATENCY_BATCH * LATENCY_BATCH
        config = self.generator_config(prefix, events, LATENCY_BATCH, 512, rate=LATENCY_RATE)
        gen, _ = await LoadGenerator.start(config, self.platform.workdir / "load-latency.log")
        consumer = AIOKafkaConsumer(bootstrap_servers=self.ctx.kafka_bootstrap, group_id=None,
                                    enable_auto_commit=False,
                                    max_partition_fetch_bytes=4 * 1024 * 1024)
        try:
            await consumer.start()
            partitions = [TopicPartition(USAGE_ACCEPTED, p)
                          for p in sorted(await _partitions(consumer, USAGE_ACCEPTED))]
            consumer.assign(partitions)
            await self.db.wait_until(lambda h, p: p >= h, "relay catch-up before the run")
            head0, _ = await self.db.positions()
            keys0 = await self.db.usage_keys()
            await consumer.seek_to_end(*partitions)
            for tp in partitions:
                await consumer.position(tp)
            pattern = re.compile(rb'idempotency_key\\?"\s*:\s*\\?"' + re.escape(prefix.encode())
                                 + rb"-(\d+)")
            seen: dict[int, float] = {}
            sending = [True]

            async def consume() -> None:
                """Until every key was seen, or nothing new came for STALL_S after the
                generator finished."""
                progress = time.monotonic()
                while len(seen) < events:
                    batch = await consumer.getmany(timeout_ms=100, max_records=20_000)
                    now = time.monotonic()
                    for records in batch.values():
                        for record in records:
                            for match in pattern.finditer(record.value):
                                if int(match.group(1)) not in seen:
                                    seen[int(match.group(1))] = now
                                    progress = now
                    if sending[0]:
                        progress = now
                    elif now - progress > STALL_S:
                        return

            consuming = asyncio.create_task(consume())
            cpu = self.cpu_meter(gen.pid)
            cpu.start()
            run = await gen.command({"run": "open"})
            if run["errors"]:
                consuming.cancel()
                raise BenchFailure(f"latency run: events not accepted: {run['errors'][:5]}")
            sending[0] = False
            await consuming
            cpu_figures = await cpu.stop()
        finally:
            await consumer.stop()
            await gen.close()
        if len(seen) != events:
            raise BenchFailure(f"latency run: {events - len(seen)} accepted events not seen on "
                               f"{USAGE_ACCEPTED} ({STALL_S:.0f} s without a new one)")
        keys1 = await self.db.usage_keys()
        logged = await self.db.logged_usages(head0)
        if logged != events or keys1 != keys0 + events:
            raise BenchFailure(f"latency run: {events} events grew the log by {logged} "
                               f"and usage_keys by {keys1 - keys0}")
        self.windows["latency_at_20k"] = (run["started"], run["ended"])
        sends = run["sends"]
        latencies = sorted(seen[i] - sends[i // LATENCY_BATCH] for i in range(events))
        offered_s = sends[-1] - sends[0] + run["interval_s"]
        return {
            "offered_events_per_s": LATENCY_RATE,
            "achieved_offered_events_per_s": round(events / offered_s),
            "generator_max_late_ms": round(run["max_late_s"] * 1000, 1),
            "batch": f"{LATENCY_RATE // LATENCY_BATCH} batches of {LATENCY_BATCH} per second",
            "seconds": LATENCY_SECONDS,
            "events": events,
            "measured": "scheduled send -> record consumed from billstream.usage.accepted",
            "p50_ms": round(percentile(latencies, 50) * 1000, 1),
            "p95_ms": round(percentile(latencies, 95) * 1000, 1),
            "p99_ms": round(percentile(latencies, 99) * 1000, 1),
            "max_ms": round(latencies[-1] * 1000, 1),
            "ack_p50_ms": round(run["ack_p50_s"] * 1000, 1),
            "ack_p99_ms": round(run["ack_p99_s"] * 1000, 1),
            "busy_answers_retried": run["busy_answers"],
            "transport_errors_retried": run["transport_retries"],
            "all_consumed_after_s": round(max(seen.values()) - run["started"], 2),
        }, cpu_figures

    async def kafka_input(self) -> tuple[dict, dict]:
        absent = _kafka_input_absent()
        if absent:
            return {"status": f"not available: {absent}"}, {}
        ing = self.platform.ingestion
        # Stop ingestion, preload the topic, start it again: the window is ingestion alone.
        self.rss.pid = None
        await asyncio.to_thread(self.platform.stop_service, ing)
        head0, _ = await self.db.positions()
        keys0 = await self.db.usage_keys()
        wal0 = await self.db.wal_bytes()
        rejected0 = await _topic_size(self.ctx.kafka_bootstrap, USAGE_REJECTED)
        preload_s = await preload_raw(self.ctx.kafka_bootstrap, f"k{self.platform.stamp}",
                                      KAFKA_EVENTS, self.tenant["key"])
        ends = await _end_offsets(self.ctx.kafka_bootstrap, USAGE_RAW)
        spawned = time.monotonic()
        ing = self.platform.spawn("ingestion", ing.database_url,
                                  port=int(ing.url.rsplit(":", 1)[1]))
        self.rss.pid = ing.pid
        await asyncio.to_thread(self.platform.wait_ready, ing)
        ready = time.monotonic()
        cpu = self.cpu_meter(None)
        cpu.start()
        head_at_ready, _ = await self.db.positions()
        # The log head is sampled every 50 ms from ready on; once the input's consumer group
        # has committed every preloaded record (it commits a poll's offsets after its
        # PostgreSQL commit), the final head is known, and the first sample at it is the
        # moment the last event became durable. usage_keys is counted once, at the end:
        # counting a table of a million rows every half second took a third of a core from
        # the system measured.
        tracker = PositionTracker(self.db)
        tracker.start()
        try:
            await self.db.wait_until(lambda h, p: h > head0, "first Kafka input event",
                                     interval=0.1, grace=KAFKA_INPUT_GRACE_S)
        except BenchFailure:
            await tracker.stop()
            await cpu.stop()
            tail = ing.log_path.read_text(errors="replace").splitlines()[-15:]
            print("bench: ingestion: the Kafka input took nothing; ingestion's log ends:\n  "
                  + "\n  ".join(tail), flush=True)
            rejected = await _topic_size(self.ctx.kafka_bootstrap, USAGE_REJECTED) - rejected0
            return {"status": f"not available: services/ingestion mentions {USAGE_RAW} but "
                              f"none of {KAFKA_EVENTS:,} preloaded events became durable within "
                              f"{KAFKA_INPUT_GRACE_S:.0f} s of ready ({rejected} records on "
                              f"{USAGE_REJECTED})"}, {}
        try:
            await _wait_committed(self.ctx.kafka_bootstrap,
                                  f"bench{self.platform.stamp}.ingestion.raw", ends)
            target, _ = await self.db.positions()
            t_durable = await tracker.first(lambda h, p: h >= target,
                                            "Kafka input events becoming durable")
            t_published = await tracker.first(lambda h, p: p >= target,
                                              "relay publishing the Kafka input events")
        finally:
            await tracker.stop()
        cpu_figures = await cpu.stop()
        wal1 = await self.db.wal_bytes()
        keys = await self.db.usage_keys()
        logged = await self.db.logged_usages(head0)
        if logged != KAFKA_EVENTS or keys != keys0 + KAFKA_EVENTS:
            raise BenchFailure(f"Kafka input of {KAFKA_EVENTS} events logged {logged} usages "
                               f"and grew usage_keys by {keys - keys0}")
        self.windows["kafka_input"] = (ready, t_published)
        sustained = await self.db.sustained_rate(tracker.samples, head0, KAFKA_EVENTS)
        return {
            "events": KAFKA_EVENTS,
            "input": "preloaded onto billstream.usage.raw while ingestion was stopped, then "
                     "ingestion started; timed from ready",
            "preload_events_per_s": round(KAFKA_EVENTS / preload_s),
            "startup_s": round(ready - spawned, 2),
            "durable_seconds": round(t_durable - ready, 2),
            "durable_events_per_s": round(KAFKA_EVENTS / (t_durable - ready)),
            # the rate once running: from 10% to 90% of the events durable (what the time
            # from ready adds: the consumer group forming, the first fetches, the last poll)
            "first_durable_after_ready_s": round(sustained["first_s"] - ready, 2),
            "sustained_events_per_s": sustained["rate"],
            "sustained_published_events_per_s": sustained["published_rate"],
            "published_seconds": round(t_published - ready, 2),
            "published_events_per_s": round(KAFKA_EVENTS / (t_published - ready)),
            "events_per_ingestion_cpu_s": round(KAFKA_EVENTS / cpu.used_s["ingestion"]),
            "events_per_postgres_cpu_s": round(KAFKA_EVENTS / cpu.used_s["postgres"]),
            "wal_bytes_per_event": round((wal1 - wal0) / KAFKA_EVENTS),
            "durable_when_ready": await self.db.logged_usages(head0, head_at_ready),
        }, cpu_figures


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()  # a group-less consumer knows no topics
    return consumer.partitions_for_topic(topic) or set()


def _kafka_input_absent() -> str | None:
    """Why the Kafka input cannot be measured, or None when ingestion seems to consume it."""
    import billstream_ingestion

    package = Path(billstream_ingestion.__file__).parent
    for path in package.rglob("*.py"):
        text = path.read_text(errors="replace")
        if "USAGE_RAW" in text or "usage.raw" in text:
            return None
    return (f"no consumer of {USAGE_RAW} in services/ingestion yet (nothing under "
            f"{package.relative_to(ROOT) if package.is_relative_to(ROOT) else package} "
            "mentions it)")


async def _end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await _partitions(consumer, topic)]
        return await consumer.end_offsets(tps)
    finally:
        await consumer.stop()


async def _wait_committed(bootstrap: str, group: str, ends: dict[TopicPartition, int]) -> None:
    """Until `group` has committed offsets at `ends` on every partition (polled twice a
    second by a member that never subscribes, so never joins); fails after STALL_S without
    progress."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        last, moved = -1, time.monotonic()
        while True:
            done = {tp: await consumer.committed(tp) or 0 for tp in ends}
            if all(done[tp] >= end for tp, end in ends.items()):
                return
            total = sum(done.values())
            if total != last:
                last, moved = total, time.monotonic()
            elif time.monotonic() - moved > STALL_S:
                raise BenchFailure(f"Kafka input: {group} committed {total} of "
                                   f"{sum(ends.values())} records and stopped")
            await asyncio.sleep(0.5)
    finally:
        await consumer.stop()


async def _topic_size(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await _partitions(consumer, topic)]
        if not tps:
            return 0
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        return sum(ends[tp] - starts[tp] for tp in tps)
    finally:
        await consumer.stop()


async def preload_raw(bootstrap: str, prefix: str, n: int, api_key: str) -> float:
    """n native events onto billstream.usage.raw with the producer's batch API: one JSON
    event per record, key = the customer's external id, header billstream-api-key."""
    import random
    from datetime import UTC, datetime

    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    rng = random.Random(11)
    headers = [("billstream-api-key", api_key.encode())]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                max_batch_size=512 * 1024, enable_idempotence=False)
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(USAGE_RAW))
        partitioner = DefaultPartitioner()
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {p: [] for p in partitions}
        for i in range(n):
            customer = f"bench-cust-{rng.randrange(CUSTOMERS):04d}".encode()
            value = orjson.dumps(with_properties({
                "idempotency_key": event_key(prefix, i), "customer": customer.decode(),
                "meter": "api_calls", "quantity": "1", "timestamp": now}, i))
            by_partition[partitioner(customer, partitions, partitions)].append((customer, value))
        started = time.monotonic()
        futures = []
        for partition, records in by_partition.items():
            index = 0
            while index < len(records):
                batch = producer.create_batch()
                while index < len(records) and batch.append(
                        key=records[index][0], value=records[index][1], timestamp=None,
                        headers=headers) is not None:
                    index += 1
                batch.close()
                futures.append(await producer.send_batch(batch, USAGE_RAW, partition=partition))
                if len(futures) >= 64:
                    await asyncio.gather(*futures)
                    futures.clear()
        await asyncio.gather(*futures)
        return time.monotonic() - started
    finally:
        await producer.stop()


def ratios(ceilings: dict | None, source: str, http: dict, latency: dict, kafka: dict,
           memory: dict) -> dict:
    out: dict = {"ceilings_from": source}

    def ratio(name: str, value: float | None, ceiling: float | None) -> None:
        if value is not None and ceiling:
            out[name] = round(value / ceiling, 3)

    if ceilings:
        pg, broker = ceilings.get("postgres", {}), ceilings.get("broker", {})
        ratio("http_acked_vs_postgres_copy", http["acked_events_per_s"],
              pg.get("copy_rows_per_s"))
        ratio("http_acked_vs_postgres_unnest_insert", http["acked_events_per_s"],
              pg.get("unnest_insert_on_conflict_rows_per_s"))
        ratio("http_published_vs_broker_produce_batch", http["published_events_per_s"],
              broker.get("produce_batch_api_msgs_per_s"))
        ratio("http_published_vs_broker_produce_send", http["published_events_per_s"],
              broker.get("produce_msgs_per_s"))
        ratio("kafka_durable_vs_broker_consume", kafka.get("durable_events_per_s"),
              broker.get("consume_msgs_per_s"))
        ratio("kafka_durable_vs_postgres_copy", kafka.get("durable_events_per_s"),
              pg.get("copy_rows_per_s"))
        ratio("kafka_published_vs_broker_produce_batch", kafka.get("published_events_per_s"),
              broker.get("produce_batch_api_msgs_per_s"))
    out["http_acked_vs_target_50k"] = round(http["acked_events_per_s"]
                                            / TARGET_HTTP_EVENTS_PER_S, 3)
    out["http_target_met"] = http["acked_events_per_s"] >= TARGET_HTTP_EVENTS_PER_S
    if "durable_events_per_s" in kafka:
        from_ready = min(kafka["durable_events_per_s"], kafka["published_events_per_s"])
        out["kafka_from_ready_vs_target_100k"] = round(from_ready / TARGET_KAFKA_EVENTS_PER_S, 3)
        # the target is a sustained rate: durable and published, between 10% and 90% of the
        # preloaded events (from ready, the consumer group's forming counts too)
        sustained = [kafka.get("sustained_events_per_s"),
                     kafka.get("sustained_published_events_per_s")]
        if all(sustained):
            rate = min(sustained)
            out["kafka_sustained_vs_target_100k"] = round(rate / TARGET_KAFKA_EVENTS_PER_S, 3)
            out["kafka_target_met"] = rate >= TARGET_KAFKA_EVENTS_PER_S
        else:
            out["kafka_target_met"] = "not measured (too few samples for a sustained rate)"
    else:
        out["kafka_target_met"] = "not measured"
    out["latency_p99_vs_target_500ms"] = round(latency["p99_ms"] / TARGET_P99_MS, 3)
    out["latency_target_met"] = (latency["p99_ms"] <= TARGET_P99_MS
                                 and latency["achieved_offered_events_per_s"]
                                 >= 0.95 * LATENCY_RATE)
    out["rss_peak_vs_target_300mb"] = round(memory["peak_mb"] / TARGET_RSS_MB, 3)
    out["rss_target_met"] = memory["peak_mb"] <= TARGET_RSS_MB
    if "peak_total_pss_mb" in memory:  # every worker together, shared pages counted once
        out["service_pss_vs_target_300mb"] = round(memory["peak_total_pss_mb"]
                                                   / TARGET_RSS_MB, 3)
    return out


def _progress(phase: str, figures: dict, cpu: dict) -> None:
    """Each phase's figures as soon as it ends, so a later failure does not lose them."""
    print(f"bench: ingestion: {phase}: {json.dumps(figures)}", flush=True)
    if cpu:
        print(f"bench: ingestion: {phase} CPU %: {json.dumps(cpu)}", flush=True)


async def run(ctx) -> dict:
    RESULTS.mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="billstream-bench-ingestion-"))
    platform = Platform(ctx, workdir)
    rss = RssSampler()
    pool = None
    ok = False
    try:
        started = time.monotonic()
        await platform.start()
        tenant = await create_tenant_and_meter(platform)
        pool = await asyncpg.create_pool(platform.ingestion.database_url, min_size=1,
                                         max_size=2)
        conn_pid = await pool.fetchval("SELECT pg_backend_pid()")
        postmaster = None
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(conn_pid).parent()
            postmaster = parent.pid if parent else None
        if KNOWN_CUSTOMERS:  # the load's customers have reached ingestion's read model
            deadline = time.monotonic() + 120
            while await pool.fetchval("SELECT count(*) FROM customers WHERE tenant_id = $1",
                                      tenant["tenant_id"]) < CUSTOMERS:
                if time.monotonic() > deadline:
                    raise BenchFailure("ingestion never knew the bench's customers")
                await asyncio.sleep(0.2)
        setup_s = time.monotonic() - started
        rss.pid = platform.ingestion.pid
        rss.start()
        await asyncio.sleep(1.0)
        idle = rss.window(0, time.monotonic())
        bench = Bench(ctx, platform, IngestionDb(pool, tenant["tenant_id"]), tenant, rss,
                      postmaster, broker_pid(ctx.kafka_bootstrap))

        print(f"bench: ingestion: {N_EVENTS:,} events over HTTP ...", flush=True)
        http, cpu_http = await bench.http_batches()
        _progress("http_batches", http, cpu_http)
        print(f"bench: ingestion: latency at {LATENCY_RATE:,} events/s ...", flush=True)
        latency, cpu_latency = await bench.latency_at_rate()
        _progress("latency_at_20k", latency, cpu_latency)
        print(f"bench: ingestion: Kafka input ({KAFKA_EVENTS:,} events) ...", flush=True)
        kafka, cpu_kafka = await bench.kafka_input()
        _progress("kafka_input", kafka, cpu_kafka)
        if platform.exited():
            raise BenchFailure(f"a service exited during the run: {platform.exited()}")

        memory = {"idle_after_setup_mb": idle.get("steady_mb")}
        for phase, (start, end) in bench.windows.items():
            for name, value in rss.window(start, end).items():
                memory[f"{phase}_{name}"] = value
        memory["peak_mb"] = round(max(mb for _, mb in rss.samples), 1)
        memory["peak_total_mb"] = round(max(mb for _, mb in rss.totals), 1)
        if rss.pss_totals:
            memory["peak_total_pss_mb"] = round(max(mb for _, mb in rss.pss_totals), 1)
        memory["peak_phase"] = max(
            bench.windows, key=lambda p: rss.window(*bench.windows[p]).get("peak_mb", 0))
        ceilings, source = load_ceilings(ctx)
        figures = {
            "setup": {"seconds": round(setup_s, 1), "services": "ingestion, subscription",
                      "ingestion_workers": int(os.environ.get("BILLSTREAM_INGESTION_WORKERS",
                                                              "2")),
                      "event_properties": EVENT_PROPERTIES, "profiled": PROFILE},
            "http_batches": http,
            "latency_at_20k": latency,
            "kafka_input": kafka,
            "memory": memory,
            "cpu_http_batches": cpu_http,
            "cpu_latency_at_20k": cpu_latency,
        }
        if cpu_kafka:
            figures["cpu_kafka_input"] = cpu_kafka
        figures["ratios"] = ratios(ceilings, source, http, latency, kafka, memory)
        ok = True
        return figures
    finally:
        # each step on its own: a failing one must not leave the services running
        with contextlib.suppress(Exception):
            await rss.stop()
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.close()
        await platform.stop()
        if ok and not os.environ.get("BENCH_KEEP_LOGS"):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench: ingestion: logs kept in {workdir}", flush=True)
