"""`python -m bench.serve_profiled OUT.prof` runs `python -m billstream_ingestion serve` under
cProfile (the bench's BENCH_PROFILE=1 when py-spy is not installed) and, when the service
exits (SIGTERM stops it gracefully), writes OUT.prof and OUT.txt (the top 30 functions by
cumulative time, then the top 30 by own time). The service code is not touched."""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1])
    from billstream_ingestion.__main__ import main as service_main

    sys.argv = [sys.argv[0], "serve"]
    profiler = cProfile.Profile()
    try:
        profiler.runcall(service_main)
    finally:
        out.parent.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(out)
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("cumulative").print_stats(30)
        stats.sort_stats("tottime").print_stats(30)
        out.with_suffix(".txt").write_text(text.getvalue())


if __name__ == "__main__":
    main()
