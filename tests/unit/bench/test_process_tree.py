"""The bench finds the processes it measures (a service's workers, PostgreSQL's backends) from
/proc/PID/task/*/children; it must find what psutil's full scan finds."""

from __future__ import annotations

import subprocess
import time

import psutil

from bench.ingestion import descendants, with_workers


def test_descendants_are_every_process_below_including_grandchildren():
    # a shell with two children, one of which has a child of its own
    tree = subprocess.Popen(["bash", "-c", "sleep 30 & (sleep 30 & wait) & wait"])
    try:
        deadline = time.monotonic() + 10
        while len(psutil.Process(tree.pid).children(recursive=True)) < 3:
            assert time.monotonic() < deadline, "the process tree never formed"
            time.sleep(0.02)
        expected = sorted(c.pid for c in psutil.Process(tree.pid).children(recursive=True))
        assert sorted(descendants(tree.pid)) == expected
        workers = with_workers(tree.pid)
        assert workers[0] == tree.pid and sorted(workers[1:]) == expected
    finally:
        for proc in psutil.Process(tree.pid).children(recursive=True):
            proc.kill()
        tree.kill()
        tree.wait()


def test_a_process_that_is_gone_has_no_descendants():
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert descendants(gone.pid) == []
    assert with_workers(None) == []
