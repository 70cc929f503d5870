"""Run every benchmark against the embedded stack (or BILLSTREAM_DATABASE_URL /
BILLSTREAM_KAFKA_BOOTSTRAP) and write bench/results/<name>.json and SUMMARY.md."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BENCHMARKS = [name for name in os.environ.get("BENCH_ONLY", "ceilings,ingestion").split(",")
              if name]


@dataclass
class Context:
    kafka_bootstrap: str
    server_dsn: str
    #: the records of the benchmarks already run in this run, by name (ingestion reads ceilings)
    results: dict = field(default_factory=dict)

    def database_url(self, name: str) -> str:
        from billstream_localstack.postgres import dsn_for_database

        return dsn_for_database(self.server_dsn, name)


async def _main(ctx: Context) -> dict:
    from billstream_localstack.postgres import create_database

    await create_database(ctx.server_dsn, "bench")
    results = ctx.results
    for name in BENCHMARKS:
        module = importlib.import_module(f"bench.{name}")
        print(f"bench: running {name} ...", flush=True)
        figures = await module.run(ctx)
        record = {
            "name": name,
            "at": datetime.now(UTC).isoformat(),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "figures": figures,
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        results[name] = record
    return results


def _summary(results: dict) -> str:
    lines = ["# Benchmark results", ""]
    for name, record in results.items():
        lines += [f"## {name}", "", f"Run at {record['at']} on {record['machine']['cpus']} CPUs.",
                  "", "| figure | value |", "| --- | --- |"]
        for group, figures in record["figures"].items():
            if isinstance(figures, dict):
                for key, value in figures.items():
                    counted = isinstance(value, int) and not isinstance(value, bool)
                    lines.append(f"| {group}.{key} | {value:,} |" if counted
                                 else f"| {group}.{key} | {value} |")
            else:
                lines.append(f"| {group} | {figures} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    external_db = os.environ.get("BILLSTREAM_DATABASE_URL")
    external_kafka = os.environ.get("BILLSTREAM_KAFKA_BOOTSTRAP")
    with tempfile.TemporaryDirectory(prefix="billstream-bench-") as tmp:
        pg = broker = None
        try:
            if external_db:
                server_dsn = external_db
            else:
                from billstream_localstack.postgres import EmbeddedPostgres

                pg = EmbeddedPostgres(Path(tmp) / "pgdata")
                pg.start()
                server_dsn = pg.local_dsn()  # the services' way to a local server
            if external_kafka:
                bootstrap = external_kafka
            else:
                from billstream_localstack.broker import TansuBroker

                broker = TansuBroker(log_path=Path(tmp) / "tansu.log")
                broker.start()
                bootstrap = broker.bootstrap
            results = asyncio.run(_main(Context(bootstrap, server_dsn)))
        finally:
            if broker:
                broker.stop()
            if pg:
                pg.stop()
    summary = _summary(results)
    (RESULTS / "SUMMARY.md").write_text(summary)
    print(summary)
    sys.exit(0)


if __name__ == "__main__":
    main()
