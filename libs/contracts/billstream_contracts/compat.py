"""Backward-compatibility of event schemas (JSON Schema, as pydantic generates it).

A new schema is compatible with an old one when every event valid under the old schema is still
understood: no property removed, no property's type changed, no property made required that was
optional, no enum value removed. Adding optional properties or enum values is allowed.
"""

from __future__ import annotations

from typing import Any


def breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    _compare(old, new, old.get("$defs", {}), new.get("$defs", {}), "$", problems)
    return problems


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    seen = 0
    while "$ref" in schema and seen < 32:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
        seen += 1
    return schema


def _compare(old, new, old_defs, new_defs, path, problems) -> None:
    old, new = _resolve(old, old_defs), _resolve(new, new_defs)
    if old.get("type") != new.get("type"):
        problems.append(f"{path}: type {old.get('type')!r} became {new.get('type')!r}")
        return
    if "enum" in old:
        missing = set(old["enum"]) - set(new.get("enum", old["enum"]))
        if missing:
            problems.append(f"{path}: enum values removed: {sorted(missing)}")
    if "const" in old and old.get("const") != new.get("const"):
        problems.append(f"{path}: const changed")
    for key in ("anyOf", "oneOf"):
        if key in old:
            old_options, new_options = old[key], new.get(key, [])
            if len(new_options) < len(old_options):
                problems.append(f"{path}: {key} options removed")
            for i, (o, n) in enumerate(zip(old_options, new_options, strict=False)):
                _compare(o, n, old_defs, new_defs, f"{path}|{key}[{i}]", problems)
    if "items" in old:
        _compare(old["items"], new.get("items", {}), old_defs, new_defs, f"{path}[]", problems)
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    for name, schema in old_props.items():
        if name not in new_props:
            problems.append(f"{path}.{name}: property removed")
            continue
        _compare(schema, new_props[name], old_defs, new_defs, f"{path}.{name}", problems)
    newly_required = set(new.get("required", [])) - set(old.get("required", []))
    for name in sorted(newly_required):
        problems.append(f"{path}.{name}: became required")
