"""A stand-in for a Billstream service, run as `python fake_service.py <service>`: just enough
HTTP for the LocalStack tests, configured by the same environment as the real services.

- `GET /readyz`: 200 once its database accepts a connection.
- `GET /openapi.json`: one routed path, one unrouted path, a shared and a conflicting schema.
- `GET /internal/whoami`: 200 for keys listed in `$FAKE_STATE_DIR/keys.json`, which the fake
  subscription writes when it creates a tenant (so the others "learn" keys a moment later).
- `/admin/v1/tenants` (subscription only): create and get tenants, kept in memory.
- anything else: echoes the request and the BILLSTREAM_* environment.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import asyncpg
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

SERVICE = sys.argv[1]
PREFIX = f"BILLSTREAM_{SERVICE.upper()}_"
STATE_DIR = Path(os.environ["FAKE_STATE_DIR"])
KEYS_FILE = STATE_DIR / "keys.json"
OWN_PATH = {
    "ingestion": "/v1/usage/events",
    "metering": "/v1/entitlements",
    "subscription": "/v1/customers",
    "invoicing": "/v1/invoices",
    "payments": "/v1/payments",
    "webhook_dispatch": "/v1/events",
}
TENANTS: dict[str, dict[str, Any]] = {}


async def readyz(request: Request) -> JSONResponse:
    conn = await asyncpg.connect(os.environ[PREFIX + "DATABASE_URL"])
    await conn.close()
    return JSONResponse({"status": "ready"})


async def openapi(request: Request) -> JSONResponse:
    ok = {"200": {"description": "ok", "content": {"application/json": {"schema": {}}}}}
    ok["200"]["content"]["application/json"]["schema"] = {"$ref": "#/components/schemas/Thing"}
    paths = {OWN_PATH[SERVICE]: {"get": {"responses": ok}}, "/readyz": {"get": {}}}
    schemas = {"Error": {"type": "object"}, "Thing": {"type": "object", "title": SERVICE}}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": SERVICE, "version": "0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    return JSONResponse(doc)


def _bearer(request: Request) -> str:
    return request.headers.get("authorization", "").removeprefix("Bearer ")


async def whoami(request: Request) -> JSONResponse:
    known = json.loads(KEYS_FILE.read_text()) if KEYS_FILE.exists() else []
    if _bearer(request) not in known:
        return JSONResponse({"error": {"code": "invalid_api_key"}}, status_code=401)
    return JSONResponse({"service": SERVICE})


def _admin_only(request: Request) -> JSONResponse | None:
    if SERVICE != "subscription":
        return JSONResponse({"error": {"code": "not_here"}}, status_code=404)
    if _bearer(request) != os.environ["BILLSTREAM_ADMIN_TOKEN"]:
        return JSONResponse({"error": {"code": "unauthorized"}}, status_code=401)
    return None


async def create_tenant(request: Request) -> JSONResponse:
    if (refused := _admin_only(request)) is not None:
        return refused
    tenant_id = f"ten_{secrets.token_hex(8)}"
    keys = {
        mode: {
            "secret_key": f"sk_{mode}_{secrets.token_hex(8)}",
            "publishable_key": f"pk_{mode}_{secrets.token_hex(8)}",
        }
        for mode in ("test", "live")
    }
    name = (await request.json())["name"]
    TENANTS[tenant_id] = {"id": tenant_id, "name": name}
    known = json.loads(KEYS_FILE.read_text()) if KEYS_FILE.exists() else []
    scratch = KEYS_FILE.with_suffix(".tmp")
    scratch.write_text(json.dumps([*known, keys["test"]["secret_key"]]))
    scratch.replace(KEYS_FILE)
    return JSONResponse({**TENANTS[tenant_id], "keys": keys}, status_code=201)


async def get_tenant(request: Request) -> JSONResponse:
    if (refused := _admin_only(request)) is not None:
        return refused
    tenant = TENANTS.get(request.path_params["tenant_id"])
    if tenant is None:
        return JSONResponse({"error": {"code": "resource_missing"}}, status_code=404)
    return JSONResponse(tenant)


async def echo(request: Request) -> JSONResponse:
    env = {key: value for key, value in os.environ.items() if key.startswith("BILLSTREAM_")}
    return JSONResponse(
        {
            "service": SERVICE,
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "body": (await request.body()).decode(),
            "env": env,
        }
    )


app = Starlette(
    routes=[
        Route("/readyz", readyz),
        Route("/openapi.json", openapi),
        Route("/internal/whoami", whoami),
        Route("/admin/v1/tenants", create_tenant, methods=["POST"]),
        Route("/admin/v1/tenants/{tenant_id}", get_tenant),
        Route("/{path:path}", echo, methods=["GET", "POST", "DELETE"]),
    ]
)

if __name__ == "__main__":
    print(f"fake {SERVICE} starting", flush=True)
    uvicorn.run(
        app,
        host=os.environ[PREFIX + "HTTP_HOST"],
        port=int(os.environ[PREFIX + "HTTP_PORT"]),
        log_level="warning",
    )
