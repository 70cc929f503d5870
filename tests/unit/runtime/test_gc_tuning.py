"""A serving process tunes Python's garbage collector (messaging.host.tune_gc): checked in
forked processes, so this test process keeps its own settings."""

from __future__ import annotations

import gc
from types import SimpleNamespace

from billstream_messaging import host as host_module
from billstream_testing.processes import in_forked_child


def test_serving_freezes_what_is_alive_and_collects_rarely():
    def serve() -> None:
        ran = []

        async def serve_forever():
            ran.append(gc.get_threshold())
            return 0

        fake = SimpleNamespace(settings=SimpleNamespace(workers=1, gc_threshold=12_345),
                               serve_forever=serve_forever)
        assert host_module.serve_workers(fake) == 0
        assert ran == [(12_345, 20, 10)]
        assert gc.get_freeze_count() > 1000  # the modules and objects built before serving

    in_forked_child(serve)


def test_zero_keeps_pythons_defaults():
    def serve() -> None:
        before = gc.get_threshold()
        host_module.tune_gc(0)
        assert gc.get_threshold() == before
        assert gc.get_freeze_count() == 0

    in_forked_child(serve)
