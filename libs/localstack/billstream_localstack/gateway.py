"""The single entry point of the local stack: a reverse proxy that routes by the route table.

`GET /openapi.json` merges the services' documents into one, `GET /docs` shows it in Swagger UI,
`GET /healthz` answers 200. Every other request goes to the service that
`billstream_runtime.routes.service_for` names.

Run it with `python -m billstream_localstack.gateway`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import swagger_ui_bundle
import uvicorn
from billstream_runtime.routes import GATEWAY_PORT, SERVICES, service_for
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from billstream_localstack._proc import LOOPBACK
from billstream_localstack.openapi_merge import merge_openapi

UPSTREAM_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
SPEC_TIMEOUT = httpx.Timeout(10.0, connect=2.0)
UPSTREAM_LIMITS = httpx.Limits(max_connections=512, max_keepalive_connections=128)
PROXIED_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# The length is recomputed from the body; date and server come from our own HTTP server.
_DROPPED_RESPONSE_HEADERS = _HOP_BY_HOP | {"content-length", "date", "server"}


def create_gateway(
    upstreams: Mapping[str, str], *, transport: httpx.AsyncBaseTransport | None = None
) -> Starlette:
    """The gateway app. `upstreams` maps a service name to its base URL
    (`"subscription": "http://127.0.0.1:8103"`); `transport` replaces the network in tests."""
    client = httpx.AsyncClient(
        transport=transport, timeout=UPSTREAM_TIMEOUT, limits=UPSTREAM_LIMITS, trust_env=False
    )
    gateway = _Gateway({s: upstreams[s] for s in SERVICES if s in upstreams}, client)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    routes = [
        Route("/healthz", gateway.healthz, methods=["GET"]),
        Route("/openapi.json", gateway.openapi, methods=["GET"]),
        Route("/docs", gateway.docs, methods=["GET"]),
        # Swagger UI 5 (OpenAPI 3.1) from the swagger-ui-bundle-v2 wheel: no CDN, works offline.
        Mount("/docs/assets", app=StaticFiles(directory=swagger_ui_bundle.swagger_ui_path)),
        Route("/{path:path}", gateway.proxy, methods=PROXIED_METHODS),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


class _Gateway:
    def __init__(self, upstreams: Mapping[str, str], client: httpx.AsyncClient) -> None:
        self._upstreams = upstreams
        self._client = client

    async def healthz(self, _: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def docs(self, _: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Billstream API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )

    async def openapi(self, _: Request) -> Response:
        """The merged document of every service that answers; the others are listed in
        `info.x-unavailable-services`."""
        bases = self._upstreams.values()
        fetched = await asyncio.gather(*(self._fetch_spec(base) for base in bases))
        specs = {
            s: spec for s, spec in zip(self._upstreams, fetched, strict=True) if spec is not None
        }
        merged = merge_openapi(specs)
        unavailable = [s for s in self._upstreams if s not in specs]
        if unavailable:
            merged["info"]["x-unavailable-services"] = unavailable
        return JSONResponse(merged)

    async def proxy(self, request: Request) -> Response:
        service = service_for(request.url.path)
        if service is None:
            message = f"No API route matches {request.method} {request.url.path}."
            return _error_response(request, 404, "route_not_found", message)
        base = self._upstreams.get(service)
        if base is None:
            message = f"The gateway has no upstream for service {service}."
            return _error_response(request, 502, "upstream_unavailable", message)
        upstream_request = httpx.Request(
            request.method,
            _upstream_url(base, request),
            headers=_upstream_headers(request),
            content=await request.body(),
        )
        try:
            upstream = await self._client.send(upstream_request, stream=True)
            try:
                body = b"".join([chunk async for chunk in upstream.aiter_raw()])
            finally:
                await upstream.aclose()
        except httpx.TransportError as exc:
            message = f"Service {service} is unavailable ({type(exc).__name__})."
            return _error_response(request, 502, "upstream_unavailable", message)
        return _downstream_response(upstream, body)

    async def _fetch_spec(self, base: str) -> dict[str, Any] | None:
        try:
            url = f"{base.rstrip('/')}/openapi.json"
            response = await self._client.get(url, timeout=SPEC_TIMEOUT)
            response.raise_for_status()
            spec = response.json()
        except (httpx.HTTPError, ValueError):
            return None
        return spec if isinstance(spec, dict) else None


def _error_response(request: Request, status: int, code: str, message: str) -> JSONResponse:
    """A response in the Billstream error shape, echoing the caller's `x-request-id`."""
    request_id = request.headers.get("x-request-id") or f"req_{secrets.token_hex(12)}"
    kind = "api_error" if status >= 500 else "invalid_request_error"
    error = {"type": kind, "code": code, "message": message, "param": None}
    return JSONResponse(
        {"error": {**error, "request_id": request_id}},
        status_code=status,
        headers={"request-id": request_id},
    )


def _upstream_url(base: str, request: Request) -> httpx.URL:
    """`base` plus the request's path and query exactly as received (still percent-encoded)."""
    base_url = httpx.URL(base)
    path = request.scope.get("raw_path") or request.url.path.encode()
    raw_path = base_url.raw_path.rstrip(b"/") + path
    query = request.scope.get("query_string", b"")
    return base_url.copy_with(raw_path=raw_path + (b"?" + query if query else b""))


def _upstream_headers(request: Request) -> list[tuple[bytes, bytes]]:
    """The request's end-to-end headers plus `x-forwarded-{for,proto,host}`."""
    dropped = _HOP_BY_HOP | {"content-length", "x-forwarded-for"}
    dropped |= _connection_tokens(request.headers)
    headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1") not in dropped]
    client = request.client.host if request.client else LOOPBACK
    previous = request.headers.get("x-forwarded-for")
    forwarded_for = f"{previous}, {client}" if previous else client
    headers.append((b"x-forwarded-for", forwarded_for.encode("latin-1")))
    if "x-forwarded-proto" not in request.headers:
        headers.append((b"x-forwarded-proto", request.url.scheme.encode()))
    if "x-forwarded-host" not in request.headers and "host" in request.headers:
        headers.append((b"x-forwarded-host", request.headers["host"].encode("latin-1")))
    return headers


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    """Header names that a `Connection` header declares hop-by-hop."""
    tokens = headers.get("connection", "").split(",")
    return {token.strip().lower() for token in tokens if token.strip()}


def _downstream_response(upstream: httpx.Response, body: bytes) -> Response:
    """The upstream response as is (body still encoded), minus hop-by-hop headers."""
    response = Response(content=body, status_code=upstream.status_code)
    dropped = _DROPPED_RESPONSE_HEADERS | _connection_tokens(upstream.headers)
    response.raw_headers.extend(
        (key.lower(), value)
        for key, value in upstream.headers.raw
        if key.decode("latin-1").lower() not in dropped
    )
    return response


def main() -> None:
    """Serve the gateway: upstreams from `BILLSTREAM_GATEWAY_UPSTREAMS` (a JSON object of
    service name to base URL), port from `BILLSTREAM_GATEWAY_PORT` (default 8080)."""
    raw = os.environ.get("BILLSTREAM_GATEWAY_UPSTREAMS")
    if not raw:
        example = '{"subscription": "http://127.0.0.1:8103"}'
        raise SystemExit(f"BILLSTREAM_GATEWAY_UPSTREAMS must be set, e.g. {example}")
    upstreams = json.loads(raw)
    port = int(os.environ.get("BILLSTREAM_GATEWAY_PORT", GATEWAY_PORT))
    host = os.environ.get("BILLSTREAM_GATEWAY_HOST", LOOPBACK)
    log_level = os.environ.get("BILLSTREAM_LOG_LEVEL", "INFO").lower()
    uvicorn.run(
        create_gateway(upstreams),
        host=host,
        port=port,
        log_level=log_level,
        access_log=log_level == "debug",
        proxy_headers=False,  # the gateway is the edge: it adds X-Forwarded-*, never trusts them
    )


if __name__ == "__main__":
    main()
