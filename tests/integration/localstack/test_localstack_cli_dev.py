"""`billstream dev` as a user runs it, with the fake service shadowing the real service
packages (`python -m billstream_<service>` finds our shim first on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from billstream_runtime.routes import SERVICES

pytestmark = pytest.mark.integration

FAKE_SERVICE = Path(__file__).with_name("fake_service.py")


def _shim_packages(directory: Path) -> Path:
    """Packages `billstream_<service>` whose `__main__` runs the fake service."""
    for service in SERVICES:
        package = directory / f"billstream_{service}"
        package.mkdir(parents=True)
        (package / "__init__.py").touch()
        (package / "__main__.py").write_text(
            "import runpy, sys\n"
            f"sys.argv = [{str(FAKE_SERVICE)!r}, {service!r}]\n"
            f"runpy.run_path({str(FAKE_SERVICE)!r}, run_name='__main__')\n"
        )
    return directory


def _wait_for_file(path: Path, cli: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert cli.poll() is None, f"billstream dev exited early:\n{cli.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.1)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_dev_runs_bootstraps_and_stops_cleanly(tmp_path: Path, stop_signal: int) -> None:
    root = tmp_path / ".billstream"
    env = {
        **os.environ,
        "PYTHONPATH": str(_shim_packages(tmp_path / "shims")),
        "FAKE_STATE_DIR": str(tmp_path),
    }
    argv = [sys.executable, "-m", "billstream_localstack.cli", "dev", "--root", str(root)]
    cli = subprocess.Popen(
        [*argv, "--any-ports"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_file(root / "dev.json", cli, timeout=120)
        processes = psutil.Process(cli.pid).children(recursive=True)
        dev = json.loads((root / "dev.json").read_text())
        with httpx.Client(trust_env=False) as http:
            assert http.get(f"{dev['base_url']}/healthz").status_code == 200
            tenant = http.get(
                f"{dev['base_url']}/admin/v1/tenants/{dev['tenant_id']}",
                headers={"Authorization": f"Bearer {dev['admin_token']}"},
            )
        assert tenant.status_code == 200
        assert dev["database_url"].endswith("/postgres")
        assert dev["kafka_bootstrap"].startswith("127.0.0.1:")

        cli.send_signal(stop_signal)
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    assert cli.returncode == 0, err
    assert "Billstream is running." in out
    assert dev["test_secret_key"] in out
    assert f"{dev['base_url']}/docs" in out
    assert "Stopping Billstream" in out
    assert len(processes) >= len(SERVICES) + 3
    assert not any(process.is_running() for process in processes)
