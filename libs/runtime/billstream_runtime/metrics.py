"""Prometheus metrics shared by every service.

A service served by several worker processes (`workers`, ingestion's default is 2) shares one
listening port, so a scrape of `/metrics` reaches whichever worker the kernel picks. Served
from the command line (`run_cli`), a service therefore runs in Prometheus multiprocess mode:
every process writes its values to files in one fresh directory, and `/metrics` of any worker
sums them (counters and histograms add up; gauges say how, e.g. `livemax`). Hosts built
in-process (tests) keep a plain registry of their own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess, values

_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_DIR_PREFIX = "billstream-metrics-"


def fresh_multiprocess_dir() -> str:
    """A new, empty directory for this service process's metrics, named after the process
    (pid and start time: in a container the pid is the same on every restart). The
    directories of processes that are gone (killed before they could remove theirs) are
    removed on the way."""
    mine = _process_tag(os.getpid())
    if mine is None:  # no /proc: nothing to tell the living from the gone by
        return tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
    for old in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*"):
        tag = old.name[len(_DIR_PREFIX):].rsplit("-", 1)[0]
        pid = tag.split(".", 1)[0]
        if pid.isdigit() and _process_tag(int(pid)) != tag:
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{mine}-")


def _process_tag(pid: int) -> str | None:
    """`<pid>.<start time in clock ticks since boot>` of a running process, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (command) "
    return f"{pid}.{fields[19]}"  # field 22, starttime


def enable_multiprocess(directory: str) -> None:
    """Write every metric made from now on under `directory` (empty, and the same for every
    process of the service: set it before the workers fork)."""
    os.environ[_DIR_ENV] = directory
    values.ValueClass = values.get_value_class()


def multiprocess_dir() -> str | None:
    """The directory when metrics are made in multiprocess mode, else None."""
    if getattr(values.ValueClass, "_multiprocess", False):
        return os.environ.get(_DIR_ENV)
    return None


def process_gone(pid: int) -> None:
    """A worker ended: its `live*` gauges no longer count."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(pid)


class Metrics:
    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "billstream_http_requests_total", "HTTP requests", ["method", "route", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "billstream_http_request_seconds", "HTTP request duration", ["route"], registry=r
        )
        self.events_appended = Counter(
            "billstream_events_appended_total", "Events appended to the log", ["type"], registry=r
        )
        self.events_published = Counter(
            "billstream_events_published_total", "Events published by the relay", ["topic"],
            registry=r,
        )
        self.relay_lag = Gauge(
            "billstream_relay_lag_events",
            "Log rows (events; a usage batch is one) not yet published", registry=r,
            multiprocess_mode="livemax",  # one worker leads the relay; the others say 0
        )
        self.relay_republishes = Counter(
            "billstream_relay_republish_total", "Times the relay republished its whole log",
            registry=r,
        )
        self.events_consumed = Counter(
            "billstream_events_consumed_total",
            "Events consumed, by outcome (applied, duplicate, unknown_type, dead_lettered)",
            ["consumer", "outcome"], registry=r,
        )
        self.consumer_batch = Histogram(
            "billstream_consumer_batch_seconds", "Time to apply one consumed batch", ["consumer"],
            registry=r,
        )
        self.custom: dict[str, object] = {}

    def render(self) -> bytes:
        """The exposition text: this process's registry, or every live worker's values summed
        in multiprocess mode."""
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return generate_latest(registry)
