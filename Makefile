# Billstream: `make run` starts the whole platform locally; `make test` runs every test tier.
# Both install what they need (uv, then the locked workspace) on a fresh machine.
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
PYTEST_ARGS ?=

.PHONY: install run test test-unit test-integration test-e2e bench contracts-snapshot openapi clean

install:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet "uv>=0.5"
	$(UV) sync --locked --all-packages

run: install
	$(UV) run billstream dev

test: install
	$(UV) run pytest tests/unit tests/static -q $(PYTEST_ARGS)
	$(UV) run pytest tests/integration -q $(PYTEST_ARGS)
	$(UV) run pytest tests/e2e -q $(PYTEST_ARGS)

test-unit: install
	$(UV) run pytest tests/unit tests/static -q $(PYTEST_ARGS)

test-integration: install
	$(UV) run pytest tests/integration -q $(PYTEST_ARGS)

test-e2e: install
	$(UV) run pytest tests/e2e -q $(PYTEST_ARGS)

bench: install
	$(UV) run python -m bench

contracts-snapshot: install
	$(UV) run python -m billstream_contracts.snapshot

openapi: install
	$(UV) run python -m billstream_localstack.openapi_export

clean:
	rm -rf .billstream .pytest_cache bench/results/*.json bench/results/SUMMARY.md
