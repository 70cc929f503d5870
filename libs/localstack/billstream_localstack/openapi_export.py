"""Publish the one OpenAPI document of the whole public API, generated from the code.

`python -m billstream_localstack.openapi_export [PATH]` builds every service's app (no database
or broker needed), merges their documents exactly as the gateway does at `/openapi.json`, and
writes the result (default `docs/openapi.json`). `tests/unit/test_openapi_published.py` fails
when the committed copy is stale.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

from billstream_localstack.openapi_merge import merge_openapi
from billstream_runtime.routes import SERVICES

DEFAULT_PATH = Path(__file__).resolve().parents[3] / "docs" / "openapi.json"


def generate() -> dict[str, Any]:
    specs = {}
    for service in SERVICES:
        bootstrap = importlib.import_module(f"billstream_{service}.bootstrap")
        specs[service] = bootstrap.build().app.openapi()
    return merge_openapi(specs)


def render() -> str:
    return json.dumps(generate(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else DEFAULT_PATH
    path.write_text(render())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
