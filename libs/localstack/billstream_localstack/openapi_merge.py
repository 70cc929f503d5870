"""Merge the services' OpenAPI documents into the one document of the public API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from billstream_runtime.routes import service_for

Json = dict[str, Any]
_Renames = dict[tuple[str, str], str]  # (components section, name) -> new name


def merge_openapi(
    specs: Mapping[str, Mapping[str, Any]], *, title: str = "Billstream API", version: str = "v1"
) -> Json:
    """One OpenAPI 3.1 document from the documents of several services.

    `specs` maps a service name to its document; earlier services win. A service contributes
    only the paths that the route table sends to it. Components with the same name and the same
    content are merged; a component whose name is taken by a different earlier one is renamed
    with the service's prefix (`invoicing`'s `Error` becomes `InvoicingError`) and every
    reference to it in that service's document follows.
    """
    paths: Json = {}
    components: dict[str, Json] = {}
    tags: Json = {}
    for service, original in specs.items():
        renames = _conflict_renames(original.get("components", {}), components, service)
        spec = _rewrite_refs(original, _ref_map(renames))
        for section, items in spec.get("components", {}).items():
            target = components.setdefault(section, {})
            for name, value in items.items():
                target.setdefault(renames.get((section, name), name), value)
        paths.update(
            (path, item)
            for path, item in spec.get("paths", {}).items()
            if service_for(path) == service
        )
        for tag in spec.get("tags", []):
            tags.setdefault(tag["name"], tag)
    merged: Json = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
    }
    if components:
        merged["components"] = components
    if tags:
        merged["tags"] = list(tags.values())
    security = next((spec["security"] for spec in specs.values() if spec.get("security")), None)
    if security:
        merged["security"] = security
    return merged


def _conflict_renames(
    own: Mapping[str, Mapping[str, Any]], merged: Mapping[str, Json], service: str
) -> _Renames:
    """New names for the components of `own` that clash with different ones in `merged`.

    Renaming one component changes the references in the others, which may make them differ
    from a same-named merged one too, so this repeats until nothing new clashes.
    """
    renames: _Renames = {}
    while True:
        rewritten = _rewrite_refs(own, _ref_map(renames))
        clashes = [
            (section, name)
            for section, items in rewritten.items()
            for name, value in items.items()
            if (section, name) not in renames
            and name in merged.get(section, {})
            and merged[section][name] != value
        ]
        if not clashes:
            return renames
        for section, name in clashes:
            taken = {*merged.get(section, {}), *own.get(section, {}), *renames.values()}
            renames[(section, name)] = _unique(_pascal(service) + name, taken)


def _ref_map(renames: _Renames) -> dict[str, str]:
    return {
        f"#/components/{section}/{name}": f"#/components/{section}/{new}"
        for (section, name), new in renames.items()
    }


def _rewrite_refs(node: Any, ref_map: Mapping[str, str]) -> Any:
    """A copy of `node` with every string equal to a renamed reference replaced. That covers
    `$ref` values and discriminator mappings alike."""
    if isinstance(node, dict):
        return {key: _rewrite_refs(value, ref_map) for key, value in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(value, ref_map) for value in node]
    if isinstance(node, str):
        return ref_map.get(node, node)
    return node


def _pascal(service: str) -> str:
    return "".join(part.capitalize() for part in service.split("_"))


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}{n}", n + 1
    return candidate
