"""The bench finds the processes it measures (a service's workers, PostgreSQL's backends) from
/proc/PID/task/*/children; it must find what psutil's full scan finds."""

from __future__ import annotations

import subprocess

import psutil

from bench.ingestion import descendants, with_workers


def test_descendants_are_every_process_below_including_grandchildren():
    # a shell with two children, one of which has a child of its own; the inner one says
    # "ready" once it has forked its child (the outer shell forked the first one before it)
    tree = subprocess.Popen(["bash", "-c", "sleep 30 & (sleep 30 & echo ready; wait) & wait"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert tree.stdout.readline() == "ready\n"
        expected = sorted(c.pid for c in psutil.Process(tree.pid).children(recursive=True))
        assert len(expected) == 3
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
