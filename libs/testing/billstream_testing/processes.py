"""Run test code in a forked process, as a service's workers run (settings that are
process-wide — metrics mode, the garbage collector — then stay out of the test process)."""

from __future__ import annotations

import os
from collections.abc import Callable


def in_forked_child(work: Callable[[], None]) -> None:
    """Run `work()` in a forked process and wait for it; fail if it failed."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
