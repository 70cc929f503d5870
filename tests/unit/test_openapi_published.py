"""The published OpenAPI document (docs/openapi.json) is the one the code generates, and it
covers every route family of the route table."""

import json

from billstream_localstack.openapi_export import DEFAULT_PATH, generate, render
from billstream_runtime.routes import ROUTES, service_for


def test_published_openapi_is_current():
    assert DEFAULT_PATH.exists(), "run: uv run python -m billstream_localstack.openapi_export"
    assert DEFAULT_PATH.read_text() == render(), (
        "docs/openapi.json is stale: run `uv run python -m billstream_localstack.openapi_export`"
    )


def test_openapi_covers_the_public_contract_and_declares_auth():
    doc = generate()
    paths = doc["paths"]
    for path in ("/v1/test_clocks", "/v1/test_clocks/{clock_id}/advance", "/v1/webhook_endpoints",
                 "/v1/customers", "/v1/customers/{customer_id}/payment_methods", "/v1/meters",
                 "/v1/plans", "/v1/subscriptions", "/v1/usage/events", "/v1/usage",
                 "/v1/invoices", "/v1/events", "/admin/v1/tenants"):
        assert path in paths, path
    for path in paths:
        assert service_for(path) is not None, f"{path} is not routed"
    served = {service_for(p) for p in paths}
    assert served == {r.service for r in ROUTES}
    assert doc["components"]["securitySchemes"]["bearerKey"]["scheme"] == "bearer"
    assert doc["security"] == [{"bearerKey": []}]
    json.dumps(doc)  # serializable
