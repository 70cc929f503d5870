"""Tenants and API keys: four working keys, stored hashed, announced by events, revocable."""

from __future__ import annotations

import re

import pytest

from billstream_runtime.auth import hash_key
from subscription_helpers import assert_error, client_for

pytestmark = pytest.mark.integration


async def test_tenant_creation_returns_four_working_keys(host, admin, tenant):
    assert re.fullmatch(r"ten_[0-9A-Z]{26}", tenant["id"])
    assert tenant["object"] == "tenant" and tenant["created"].endswith("Z")
    keys = tenant["keys"]
    assert set(keys) == {"test", "live"}
    for env in ("test", "live"):
        assert set(keys[env]) == {"secret_key", "publishable_key"}
        assert re.fullmatch(rf"sk_{env}_[0-9A-Za-z]{{32}}", keys[env]["secret_key"])
        assert re.fullmatch(rf"pk_{env}_[0-9A-Za-z]{{32}}", keys[env]["publishable_key"])

    for env in ("test", "live"):
        async with client_for(host, keys[env]["secret_key"]) as c:
            who = await c.get("/internal/whoami")
            assert who.status_code == 200
            assert who.json() == {"tenant_id": tenant["id"], "environment": env,
                                  "kind": "secret", "service": "subscription"}
            listed = await c.get("/v1/customers")
            assert listed.status_code == 200
            assert listed.json() == {"object": "list", "data": [], "has_more": False}
        async with client_for(host, keys[env]["publishable_key"]) as c:
            who = await c.get("/internal/whoami")
            assert who.json()["kind"] == "publishable" and who.json()["environment"] == env
            r = await c.post("/v1/customers", json={"external_id": "x"})
            assert_error(r, 403, "secret_key_required")

    # stored only as sha256 hashes
    rows = await host.pool.fetch("SELECT * FROM api_keys WHERE tenant_id = $1", tenant["id"])
    assert len(rows) == 4
    stored = {r["key_hash"] for r in rows}
    clear = [keys[e][k] for e in ("test", "live") for k in ("secret_key", "publishable_key")]
    assert stored == {hash_key(k) for k in clear}
    for r in rows:
        assert r["key_id"].startswith("key_") and r["revoked_at"] is None
        assert all(k not in str(dict(r)) for k in clear)


async def test_tenant_creation_events(host, tenant, log_of):
    rows = await log_of(tenant["id"])
    assert [r["type"] for r in rows] == ["tenant.created"] + ["api_key.created"] * 4
    created = rows[0]
    assert created["environment"] == "live" and created["aggregate_id"] == tenant["id"]
    assert created["data"] == {"tenant_id": tenant["id"], "name": tenant["name"]}
    assert created["topic"] == "billstream.subscription.events"
    keys = tenant["keys"]
    by_hash = {hash_key(keys[e][k]): (e, k.split("_")[0])
               for e in ("test", "live") for k in ("secret_key", "publishable_key")}
    seen = set()
    for r in rows[1:]:
        data = r["data"]
        env, kind = by_hash[data["key_hash"]]
        assert (r["environment"], data["environment"], data["kind"]) == (env, env, kind)
        assert r["aggregate_type"] == "api_key" and r["aggregate_id"] == data["key_id"]
        prefix = ("sk" if kind == "secret" else "pk") + f"_{env}_"
        assert data["key_prefix"].startswith(prefix) and len(data["key_prefix"]) == len(prefix) + 4
        seen.add((env, kind))
    assert len(seen) == 4
    assert all(keys[e][k] not in str(r["data"]) for r in rows
               for e in ("test", "live") for k in ("secret_key", "publishable_key"))


async def test_get_and_list_tenants(admin, tenant):
    r = await admin.get(f"/admin/v1/tenants/{tenant['id']}")
    assert r.status_code == 200
    assert r.json() == {"id": tenant["id"], "object": "tenant", "name": tenant["name"],
                        "created": tenant["created"]}
    assert_error(await admin.get("/admin/v1/tenants/ten_missing"), 404, "resource_missing")
    other = (await admin.post("/admin/v1/tenants", json={"name": "Other"})).json()
    listed = (await admin.get("/admin/v1/tenants", params={"limit": 1})).json()
    assert [t["id"] for t in listed["data"]] == [other["id"]] and listed["has_more"] is True
    assert "keys" not in listed["data"][0]
    rest = (await admin.get("/admin/v1/tenants",
                            params={"starting_after": other["id"]})).json()
    assert [t["id"] for t in rest["data"]] == [tenant["id"]] and rest["has_more"] is False


async def test_admin_needs_the_admin_token(host, tenant):
    async with client_for(host, None) as anonymous:
        assert_error(await anonymous.post("/admin/v1/tenants", json={"name": "x"}), 401,
                     "invalid_admin_token")
    async with client_for(host, tenant["keys"]["test"]["secret_key"]) as merchant:
        assert_error(await merchant.get("/admin/v1/tenants"), 401, "invalid_admin_token")


async def test_admin_validation(admin):
    assert_error(await admin.post("/admin/v1/tenants", json={}), 400, "parameter_missing",
                 "name")
    assert_error(await admin.post("/admin/v1/tenants", json={"name": "  "}), 400,
                 "parameter_invalid", "name")


async def test_add_and_revoke_a_key(host, admin, tenant, log_of):
    r = await admin.post(f"/admin/v1/tenants/{tenant['id']}/api_keys",
                         json={"environment": "test", "kind": "secret"})
    assert r.status_code == 201, r.text
    key = r.json()
    assert key["object"] == "api_key" and key["id"].startswith("key_")
    assert key["key"].startswith("sk_test_") and key["tenant"] == tenant["id"]
    assert key["livemode"] is False and key["revoked"] is None
    listed = (await admin.get(f"/admin/v1/tenants/{tenant['id']}/api_keys",
                              params={"limit": 100})).json()
    assert len(listed["data"]) == 5 and all("key" not in k for k in listed["data"])

    revoked = await admin.delete(f"/admin/v1/api_keys/{key['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked"].endswith("Z")
    again = await admin.delete(f"/admin/v1/api_keys/{key['id']}")
    assert again.status_code == 200 and again.json()["revoked"] == revoked.json()["revoked"]
    async with client_for(host, key["key"]) as c:
        assert_error(await c.get("/v1/customers"), 401, "invalid_api_key")

    rows = await log_of(tenant["id"], ("api_key.created", "api_key.revoked"))
    assert [r["type"] for r in rows][-2:] == ["api_key.created", "api_key.revoked"]
    assert rows[-1]["data"]["key_id"] == key["id"] and rows[-1]["environment"] == "test"
    assert len([r for r in rows if r["type"] == "api_key.revoked"]) == 1

    assert_error(await admin.delete("/admin/v1/api_keys/key_missing"), 404, "resource_missing")
    assert_error(await admin.post("/admin/v1/tenants/ten_missing/api_keys",
                                  json={"environment": "test", "kind": "secret"}),
                 404, "resource_missing")
    assert_error(await admin.post(f"/admin/v1/tenants/{tenant['id']}/api_keys",
                                  json={"environment": "prod", "kind": "secret"}),
                 400, "parameter_invalid", "environment")


async def test_tenant_creation_is_idempotent_and_never_stores_the_keys(host, admin):
    h = {"Idempotency-Key": "create-demo"}
    first = await admin.post("/admin/v1/tenants", json={"name": "Demo"}, headers=h)
    again = await admin.post("/admin/v1/tenants", json={"name": "Demo"}, headers=h)
    assert first.status_code == 201
    # The keys are shown once: a retry with the same key creates nothing and shows no secret.
    assert_error(again, 409, "idempotent_replay_unavailable")
    assert "sk_test_" not in again.text
    assert await host.pool.fetchval("SELECT count(*) FROM tenants") == 1
    stored = await host.pool.fetch("SELECT response_body, response_headers FROM idempotency_keys")
    assert len(stored) == 1 and stored[0]["response_body"] is None
    assert first.json()["keys"]["test"]["secret_key"] not in str(stored[0]["response_headers"])
    assert first.headers["cache-control"] == "no-store"
