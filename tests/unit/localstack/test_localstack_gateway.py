"""The gateway against fake upstreams (httpx.MockTransport): no sockets."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from billstream_localstack.gateway import create_gateway
from billstream_runtime.routes import SERVICES

UPSTREAMS = {service: f"http://{service}.test:81" for service in SERVICES}
Handler = Callable[[httpx.Request], httpx.Response]


class _Network(httpx.AsyncByteStream):
    """A body that arrives like one from a socket (httpx pre-reads plain `content=`)."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._body


def respond(
    status: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None
) -> httpx.Response:
    return httpx.Response(status, headers=headers, stream=_Network(body))


class Upstreams:
    """Fake services: records what reaches them and answers with `handler`."""

    def __init__(self) -> None:
        self.seen: list[httpx.Request] = []
        self.handler: Handler = lambda request: respond(200, b'{"ok": true}')

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return self.handler(request)


@pytest.fixture
def upstreams() -> Upstreams:
    return Upstreams()


@pytest.fixture
async def gateway(upstreams: Upstreams) -> AsyncIterator[httpx.AsyncClient]:
    app = create_gateway(UPSTREAMS, transport=httpx.MockTransport(upstreams))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw.test") as client:
            yield client


@pytest.mark.parametrize(
    ("path", "service"),
    [
        ("/v1/usage/events", "ingestion"),
        ("/v1/usage/summary", "metering"),
        ("/v1/customers/cus_1/payment_methods", "payments"),
        ("/v1/customers/cus_1", "subscription"),
        ("/v1/invoices/inv_1/pdf", "invoicing"),
        ("/v1/events", "webhook_dispatch"),
        ("/admin/v1/tenants", "subscription"),
    ],
)
async def test_routes_by_the_route_table(
    gateway: httpx.AsyncClient, upstreams: Upstreams, path: str, service: str
) -> None:
    response = await gateway.get(path)
    assert response.status_code == 200
    assert upstreams.seen[-1].url.host == f"{service}.test"
    assert upstreams.seen[-1].url.path == path


async def test_passes_method_path_query_body_and_end_to_end_headers(
    gateway: httpx.AsyncClient, upstreams: Upstreams
) -> None:
    await gateway.post(
        "/v1/customers/a%2Fb/x?limit=10&starting_after=cus%201",
        content=b'{"name": "Ada"}',
        headers={
            "Authorization": "Bearer sk_test_1",
            "Idempotency-Key": "k1",
            "Content-Type": "application/json",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "dropped because Connection names it",
            "TE": "trailers",
        },
    )
    seen = upstreams.seen[-1]
    assert seen.method == "POST"
    assert seen.url.raw_path == b"/v1/customers/a%2Fb/x?limit=10&starting_after=cus%201"
    assert seen.content == b'{"name": "Ada"}'
    assert seen.headers["authorization"] == "Bearer sk_test_1"
    assert seen.headers["idempotency-key"] == "k1"
    assert seen.headers["host"] == "gw.test"
    assert seen.headers["content-length"] == "15"
    for hop_by_hop in ("connection", "x-hop", "te"):
        assert hop_by_hop not in seen.headers


async def test_adds_forwarded_headers(gateway: httpx.AsyncClient, upstreams: Upstreams) -> None:
    await gateway.get("/v1/customers")
    assert upstreams.seen[-1].headers["x-forwarded-for"] == "203.0.113.7"
    assert upstreams.seen[-1].headers["x-forwarded-proto"] == "http"
    assert upstreams.seen[-1].headers["x-forwarded-host"] == "gw.test"

    await gateway.get("/v1/customers", headers={"X-Forwarded-For": "198.51.100.1"})
    assert upstreams.seen[-1].headers["x-forwarded-for"] == "198.51.100.1, 203.0.113.7"


async def test_returns_status_headers_and_body_as_the_upstream_sent_them(
    gateway: httpx.AsyncClient, upstreams: Upstreams
) -> None:
    compressed = gzip.compress(b'{"error": "nope"}')
    upstreams.handler = lambda request: respond(
        409,
        compressed,
        headers=[
            ("Content-Type", "application/json"),
            ("Content-Encoding", "gzip"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("X-Request-Id", "req_up"),
            ("Keep-Alive", "timeout=5"),
        ],
    )
    response = await gateway.post("/v1/subscriptions", json={})
    assert response.status_code == 409
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert response.headers["x-request-id"] == "req_up"
    assert "keep-alive" not in response.headers
    assert response.json() == {"error": "nope"}  # decoded by the client: passed through intact


async def test_empty_204(gateway: httpx.AsyncClient, upstreams: Upstreams) -> None:
    upstreams.handler = lambda request: respond(204)
    response = await gateway.delete("/v1/webhook_endpoints/we_1")
    assert response.status_code == 204
    assert response.content == b""


async def test_unrouted_path_is_404_in_the_error_shape(
    gateway: httpx.AsyncClient, upstreams: Upstreams
) -> None:
    response = await gateway.get("/v2/nothing", headers={"X-Request-Id": "req_mine"})
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "type": "invalid_request_error",
            "code": "route_not_found",
            "message": "No API route matches GET /v2/nothing.",
            "param": None,
            "request_id": "req_mine",
        }
    }
    assert response.headers["request-id"] == "req_mine"
    assert upstreams.seen == []


async def test_unavailable_upstream_is_502_in_the_error_shape(
    gateway: httpx.AsyncClient, upstreams: Upstreams
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    upstreams.handler = refuse
    response = await gateway.get("/v1/invoices")
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "api_error"
    assert error["code"] == "upstream_unavailable"
    assert "invoicing" in error["message"]
    assert error["param"] is None
    assert error["request_id"].startswith("req_")
    assert response.headers["request-id"] == error["request_id"]


async def test_service_without_upstream_is_502() -> None:
    app = create_gateway({"subscription": "http://subscription.test"})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw.test") as client:
        response = await client.get("/v1/invoices")
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"


async def test_healthz(gateway: httpx.AsyncClient, upstreams: Upstreams) -> None:
    response = await gateway.get("/healthz")
    assert response.status_code == 200
    assert upstreams.seen == []


async def test_docs_is_swagger_ui_on_the_merged_document(gateway: httpx.AsyncClient) -> None:
    response = await gateway.get("/docs")
    assert response.status_code == 200
    assert "swagger-ui" in response.text
    assert "/openapi.json" in response.text
    assert "cdn." not in response.text  # self-hosted: no third-party assets
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
        assert asset in response.text
        served = await gateway.get(asset)
        assert served.status_code == 200 and len(served.content) > 1000


async def test_openapi_merges_the_services_that_answer(
    gateway: httpx.AsyncClient, upstreams: Upstreams
) -> None:
    own_path = {"subscription": "/v1/customers", "invoicing": "/v1/invoices"}

    def specs(request: httpx.Request) -> httpx.Response:
        service = request.url.host.removesuffix(".test")
        assert request.url.path == "/openapi.json"
        if service not in own_path:
            return respond(503)
        paths = {own_path[service]: {"get": {}}, "/readyz": {"get": {}}}
        return respond(200, json.dumps({"openapi": "3.1.0", "paths": paths}).encode())

    upstreams.handler = specs
    doc = (await gateway.get("/openapi.json")).json()
    assert doc["info"]["title"] == "Billstream API"
    assert doc["openapi"] == "3.1.0"
    assert set(doc["paths"]) == {"/v1/customers", "/v1/invoices"}
    assert doc["info"]["x-unavailable-services"] == [
        s for s in SERVICES if s not in ("subscription", "invoicing")
    ]
