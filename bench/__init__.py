"""`make bench`: benchmarks that report figures (never pass/fail on time).

Each benchmark module exposes `async def run(ctx) -> dict` and writes
`bench/results/<name>.json`; `SUMMARY.md` gathers them with the ratios to the ceilings."""
