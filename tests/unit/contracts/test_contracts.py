"""Event contracts: snapshots of every schema, and a check that fails on breaking changes."""

from __future__ import annotations

import copy
import json

import pytest

from billstream_contracts import all_event_types, is_public, lookup
from billstream_contracts.compat import breaking_changes
from billstream_contracts.events import CustomerCreated, InvoicePaid
from billstream_contracts.snapshot import SCHEMA_DIR, current_schemas

CURRENT = current_schemas()


@pytest.mark.parametrize("name", sorted(CURRENT))
def test_schema_is_compatible_with_its_snapshot(name):
    path = SCHEMA_DIR / name
    assert path.exists(), f"no snapshot for {name}: run `make contracts-snapshot`"
    old = json.loads(path.read_text())
    problems = breaking_changes(old, CURRENT[name])
    assert not problems, (
        f"{name} changed in a breaking way: {problems}. Add a new version instead."
    )
    assert old == json.loads(json.dumps(CURRENT[name], sort_keys=True)), (
        f"{name} changed compatibly; refresh the snapshot with `make contracts-snapshot`"
    )


def test_every_snapshot_still_has_a_contract():
    stale = {p.name for p in SCHEMA_DIR.glob("*.json")} - set(CURRENT)
    assert not stale, f"contracts removed while snapshots remain: {stale}"


def test_checker_catches_breaking_changes():
    old = CustomerCreated.model_json_schema()
    removed = copy.deepcopy(old)
    del removed["properties"]["email"]
    assert any("email: property removed" in p for p in breaking_changes(old, removed))
    required = copy.deepcopy(old)
    required["required"].append("email")
    assert any("email: became required" in p for p in breaking_changes(old, required))
    retyped = copy.deepcopy(old)
    retyped["properties"]["customer_id"] = {"type": "integer"}
    assert any("customer_id: type" in p for p in breaking_changes(old, retyped))
    nested = InvoicePaid.model_json_schema()
    changed = copy.deepcopy(nested)
    changed["$defs"]["InvoiceLine"]["properties"]["amount"]["type"] = "string"
    assert any("amount" in p for p in breaking_changes(nested, changed))


def test_additive_change_is_allowed():
    old = CustomerCreated.model_json_schema()
    new = copy.deepcopy(old)
    new["properties"]["locale"] = {"type": "string"}
    assert breaking_changes(old, new) == []


def test_registry_types_are_namespaced_past_tense_and_versioned():
    for (etype, version), model in all_event_types().items():
        assert "." in etype and version >= 1
        assert lookup(etype, version) is model
    assert is_public("invoice.paid", 1)
    assert not is_public("api_key.created", 1)
    assert not is_public("no.such_type", 1)
