"""The HTTP app factory every service uses.

It gives each service the same public surface: request ids (`Request-Id` header, also in every
error body and log line), the one error shape, API-key and admin-token auth dependencies, the
Idempotency-Key layer for POSTs, `/healthz`, `/readyz`, `/metrics`, `/internal/whoami`, and an
OpenAPI document generated from the code.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import Any, Literal

import orjson
import structlog
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.exceptions import HTTPException as StarletteHTTPException

from billstream_runtime.auth import AuthContext, admin_token_matches, bearer_token
from billstream_runtime.errors import (
    ApiError,
    Forbidden,
    InvalidRequest,
    Unauthorized,
    unexpected,
)
from billstream_runtime.ids import new_id
from billstream_runtime.idempotency import (
    NO_REPLAY_HEADER,
    IdempotencyMiddleware,
    rerunnable_routes,
)
from billstream_runtime.telemetry import context_from_carrier

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
log = structlog.get_logger("billstream.http")


class ORJSONResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z)


def error_response(err: ApiError) -> ORJSONResponse:
    return ORJSONResponse(err.body(request_id_var.get()), status_code=err.status,
                          headers=err.headers)


async def _error_tuple(err: ApiError) -> tuple[int, list, bytes]:
    body = orjson.dumps(err.body(request_id_var.get()))
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    rid = request_id_var.get()
    if rid:
        headers.append((b"request-id", rid.encode()))
    return err.status, headers, body


class RequestContextMiddleware:
    """Request id, structlog context, a server span (continuing an incoming traceparent) and
    HTTP metrics, as plain ASGI so that it wraps everything, the idempotency layer included."""

    def __init__(self, app, *, service: str, metrics) -> None:
        self.app = app
        self._tracer = trace.get_tracer(f"billstream.{service}.http")
        self._metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id") or new_id("req")
        token = request_id_var.set(rid)
        structlog.contextvars.bind_contextvars(request_id=rid)
        status_holder = {"status": 500, "started": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"request-id", rid.encode())]
            await send(message)

        started = time.perf_counter()
        path = scope["path"]
        ctx = context_from_carrier(headers)
        with self._tracer.start_as_current_span(
            f"{scope['method']} {path}", context=ctx, kind=SpanKind.SERVER,
            attributes={"http.method": scope["method"], "http.target": path,
                        "billstream.request_id": rid},
        ) as span:
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as exc:
                # every unhandled exception is answered here, inside the request's context
                # (Starlette's outermost handler would run after this request's id is gone):
                # a 500 carries its Request-Id like any answer
                if status_holder["started"]:
                    raise
                err = unexpected(exc)
                if err.status >= 500:
                    log.exception("unhandled_error", error=str(exc))
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, str(exc)))
                status, hdrs, body = await _error_tuple(err)
                await send_with_id({"type": "http.response.start", "status": status,
                                    "headers": [h for h in hdrs if h[0] != b"request-id"]})
                await send_with_id({"type": "http.response.body", "body": body})
            finally:
                if not status_holder["started"]:  # nothing was answered: the client left
                    status_holder["status"] = 499  # (nginx's code for it), not a 500
                span.set_attribute("http.status_code", status_holder["status"])
                route = _route_template(scope)
                self._metrics.http_requests.labels(
                    scope["method"], route, str(status_holder["status"])
                ).inc()
                self._metrics.http_latency.labels(route).observe(time.perf_counter() - started)
                structlog.contextvars.unbind_contextvars("request_id")
                request_id_var.reset(token)


def _route_template(scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


async def authenticate(request: Request) -> AuthContext:
    """Any valid API key, secret or publishable."""
    ctx = getattr(request.state, "auth", None)
    if ctx is None:
        token = bearer_token(request.headers.get("authorization"))
        ctx = await request.app.state.authenticator.authenticate(token)
        request.state.auth = ctx
    structlog.contextvars.bind_contextvars(tenant_id=ctx.tenant_id, environment=ctx.environment)
    return ctx


async def require_secret_key(ctx: AuthContext = Depends(authenticate)) -> AuthContext:
    if ctx.kind != "secret":
        raise Forbidden(
            "secret_key_required",
            "This endpoint needs a secret key (sk_...); publishable keys may only read "
            "entitlements and start checkouts",
        )
    return ctx


async def require_admin(request: Request) -> None:
    token = bearer_token(request.headers.get("authorization"))
    if not admin_token_matches(token, request.app.state.settings.admin_token):
        raise Unauthorized("invalid_admin_token", "A valid admin token is required")


SecretKey = Depends(require_secret_key)
AnyKey = Depends(authenticate)
Admin = Depends(require_admin)


class ListParams:
    """Cursor pagination: `limit` (1..100, default 10) and `starting_after` (an object id)."""

    def __init__(
        self,
        limit: int = Query(10, ge=1, le=100, description="How many objects, 1 to 100"),
        starting_after: str | None = Query(
            None, description="An object id: list the objects after it"
        ),
    ) -> None:
        self.limit = limit
        self.starting_after = starting_after


def page(items: list[Any], limit: int) -> dict[str, Any]:
    """`{"object": "list", "data": [...], "has_more"}` from up to limit+1 fetched items."""
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def shown_once(response: Response) -> None:
    """Mark a response that carries secrets shown only once: it is never stored for
    Idempotency-Key replays (see billstream_runtime.idempotency)."""
    response.headers[NO_REPLAY_HEADER] = "secret"
    response.headers["Cache-Control"] = "no-store"


ReadyCheck = Callable[[], Awaitable[bool] | bool]


def create_app(
    *,
    service: str,
    title: str,
    routers: Iterable[APIRouter],
    lifespan=None,
) -> FastAPI:
    """A FastAPI app with Billstream's conventions. The service's composition root sets
    `app.state.settings`, `.pool`, `.authenticator`, `.metrics` and `.ready_checks`."""
    app = FastAPI(
        title=title,
        version="1.0.0",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.ready_checks = []

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearerKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A secret key (sk_test_… / sk_live_…: it fixes tenant and "
                    "environment); a publishable key (pk_…) only reads entitlements and starts "
                    "checkouts; the admin token for /admin paths.",
                }
            }
            schema["security"] = [{"bearerKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        msg = first.get("msg", "Invalid request")
        if first.get("type") == "json_invalid":
            return error_response(InvalidRequest("invalid_json", "The body is not valid JSON"))
        code = "parameter_missing" if first.get("type") == "missing" else "parameter_invalid"
        return error_response(InvalidRequest(code, f"{param}: {msg}" if param else msg,
                                             param=param))

    @app.exception_handler(json.JSONDecodeError)
    async def _bad_json(_request: Request, exc: json.JSONDecodeError):
        return error_response(InvalidRequest("invalid_json", f"The body is not valid JSON: {exc}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = ApiError("route_not_found", "Unrecognized request URL", status=404)
        elif exc.status_code == 405:
            err = ApiError("method_not_allowed", str(exc.detail), status=405)
        else:
            err = ApiError("http_error", str(exc.detail), status=exc.status_code)
        return error_response(err)

    ops = APIRouter(include_in_schema=False)

    @ops.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @ops.get("/readyz")
    async def readyz(request: Request):
        failing = []
        for check in request.app.state.ready_checks:
            try:
                result = check()
                if asyncio.iscoroutine(result):
                    result = await result
            except Exception:  # noqa: BLE001 - a failing check means not ready
                result = False
            if not result:
                failing.append(getattr(check, "__name__", "check"))
        if failing:
            return ORJSONResponse({"status": "not_ready", "failing": failing}, status_code=503)
        return {"status": "ready"}

    @ops.get("/metrics")
    async def metrics(request: Request):
        return Response(request.app.state.metrics.render(),
                        media_type="text/plain; version=0.0.4")

    @ops.get("/internal/whoami")
    async def whoami(ctx: AuthContext = AnyKey):
        return {"tenant_id": ctx.tenant_id, "environment": ctx.environment, "kind": ctx.kind,
                "service": service}

    app.include_router(ops)
    routers = list(routers)
    for router in routers:
        app.include_router(router)  # (no prefix: a route's own path is where it is served)
    rerunnable = rerunnable_routes(route for router in routers for route in router.routes)

    app.add_middleware(
        IdempotencyMiddleware,
        pool=lambda: app.state.pool,
        authenticator=lambda: app.state.authenticator,
        admin_token=lambda: app.state.settings.admin_token,
        error_response=_error_tuple,
        rerunnable=lambda: rerunnable,
        lease_s=lambda: app.state.settings.idempotency_lease_s,
    )
    app.add_middleware(RequestContextMiddleware, service=service,
                       metrics=_LazyMetrics(app))
    return app


class _LazyMetrics:
    """Metrics are attached to app.state by the composition root after the app is built."""

    def __init__(self, app: FastAPI) -> None:
        self._app = app

    def __getattr__(self, name: str):
        return getattr(self._app.state.metrics, name)


async def wait_for(fetch: Callable[[], Awaitable[Any]], timeout_s: float) -> Any:
    """Read-your-writes across services: poll `fetch` until it returns something truthy or the
    timeout passes (then return the last falsy result). Used when an API call names an object
    another service created moments ago and this service's projection may lag by milliseconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.01
    while True:
        result = await fetch()
        if result or loop.time() >= deadline:
            return result
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


Env = Literal["test", "live"]
