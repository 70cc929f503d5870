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
    """A new, empty directory for this service process's metrics, named after its pid. The
    directories of processes that are gone (killed before they could remove theirs) are
    removed on the way."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{_DIR_PREFIX}*"):
        pid = old.name[len(_DIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
