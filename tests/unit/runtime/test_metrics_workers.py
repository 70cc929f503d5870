"""/metrics of a service served by several worker processes: whichever worker answers the
scrape, it reports every worker's counts (Prometheus multiprocess mode, as run_cli sets up).

Each scenario runs in forked processes, as the workers do, so this test process keeps its
plain registries."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from billstream_runtime import metrics as metrics_module
from billstream_runtime.metrics import Metrics
from billstream_testing.processes import in_forked_child


def _sample(text: str, line_start: str) -> float:
    found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith(line_start)]
    assert len(found) == 1, (line_start, text)
    return found[0]


def test_any_worker_reports_the_requests_of_every_worker(tmp_path: Path):
    shared = tmp_path / "metrics"
    shared.mkdir()
    scraped = tmp_path / "scrape.txt"

    def serve() -> None:
        """The parent: builds the service's metrics, then forks its workers (as serve_workers
        does after build), each counting its own requests; one answers the scrape."""
        metrics_module.enable_multiprocess(str(shared))
        service_metrics = Metrics("ingestion")
        service_metrics.relay_lag.set(0)

        def worker(requests: int, lag: int, scrape: bool):
            def run() -> None:
                for _ in range(requests):
                    service_metrics.http_requests.labels("POST", "/v1/usage/events", "200").inc()
                service_metrics.relay_lag.set(lag)
                if scrape:
                    scraped.write_bytes(service_metrics.render())
            return run

        in_forked_child(worker(3, lag=7, scrape=False))
        in_forked_child(worker(5, lag=2, scrape=True))

    in_forked_child(serve)
    text = scraped.read_text()
    assert _sample(text, 'billstream_http_requests_total{method="POST",route="/v1/usage/events"'
                         ',status="200"}') == 8
    # the relay's lag is the leading worker's (the largest), not a sum of copies
    assert _sample(text, "billstream_relay_lag_events") == 7


def test_a_host_built_in_process_keeps_its_own_registry():
    assert metrics_module.multiprocess_dir() is None
    own = Metrics("ingestion")
    own.http_requests.labels("GET", "/x", "200").inc(2)
    assert re.search(rb'billstream_http_requests_total\{[^}]*route="/x"[^}]*\} 2\.0',
                     own.render())


def test_a_fresh_directory_clears_those_of_killed_processes(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(metrics_module.tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no process has any more (a service killed with SIGKILL, say)
    parent = metrics_module._process_tag(os.getppid())
    assert parent is not None and parent.startswith(f"{os.getppid()}.")
    dirs = {
        "killed": tmp_path / f"billstream-metrics-{gone.pid}.12345-abc",
        # the same pid started at another time: a container restarted (pid 1 again)
        "restarted": tmp_path / f"billstream-metrics-{parent.split('.')[0]}.1-ghi",
        "running": tmp_path / f"billstream-metrics-{parent}-def",
        "not ours": tmp_path / "billstream-metrics-notes",
    }
    for d in dirs.values():
        d.mkdir()
        (d / "counter_1.db").write_bytes(b"x")

    fresh = Path(metrics_module.fresh_multiprocess_dir())
    assert fresh.parent == tmp_path
    assert fresh.name.startswith(f"billstream-metrics-{os.getpid()}.")
    assert list(fresh.iterdir()) == []
    assert {name for name, d in dirs.items() if d.exists()} == {"running", "not ours"}


def test_serving_from_the_command_line_makes_every_metric_in_the_shared_directory(
        tmp_path: Path):
    """run_cli turns multiprocess mode on before the service is built (so that the metrics
    made by build() write to the shared directory the workers inherit), and removes the
    directory when the service stops."""
    from billstream_messaging.host import run_cli

    seen = tmp_path / "seen.txt"

    def serve() -> None:
        def build():
            made = Metrics("ingestion")

            async def serve_forever():
                made.http_requests.labels("POST", "/v1/usage/events", "200").inc(3)
                directory = metrics_module.multiprocess_dir()
                files = sorted(p.name.split("_")[0] for p in Path(directory).iterdir())
                seen.write_text(f"{directory}\n{' '.join(files)}\n"
                                + made.render().decode())
                return 0

            settings = SimpleNamespace(workers=1, gc_threshold=0, log_level="WARNING",
                                       log_json=True)
            return SimpleNamespace(name="ingestion", settings=settings,
                                   serve_forever=serve_forever)

        try:
            run_cli(build, ["serve"])
        except SystemExit as stop:
            assert stop.code == 0

    in_forked_child(serve)
    directory, files, text = seen.read_text().split("\n", 2)
    assert "counter" in files.split()
    assert not Path(directory).exists()  # removed at the stop
    assert _sample(text, 'billstream_http_requests_total{method="POST",route="/v1/usage/events"'
                         ',status="200"}') == 3
