"""Write the JSON Schema snapshots of every event contract (`make contracts-snapshot`).

Run it after an additive change; tests/unit/contracts fails on a breaking one."""

from __future__ import annotations

import json
from pathlib import Path

from billstream_contracts import Envelope, all_event_types

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"


def current_schemas() -> dict[str, dict]:
    schemas = {"envelope.json": Envelope.model_json_schema()}
    for (etype, version), model in sorted(all_event_types().items()):
        schemas[f"{etype}.v{version}.json"] = model.model_json_schema()
    return schemas


def main() -> None:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for name, schema in current_schemas().items():
        (SCHEMA_DIR / name).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(current_schemas())} schemas to {SCHEMA_DIR}")


if __name__ == "__main__":
    main()
