"""The gateway, nginx and the Ingress route by billstream_runtime.routes.ROUTES: every public
path a service serves must route to that service (a new endpoint without a route is
unreachable through the one base URL)."""

from __future__ import annotations

import importlib

import pytest

from billstream_runtime.routes import SERVICES, service_for

_LOCAL = ("/healthz", "/readyz", "/metrics", "/internal/", "/docs", "/openapi.json", "/redoc")


@pytest.mark.parametrize("service", SERVICES)
def test_every_public_path_routes_to_its_service(service):
    host = importlib.import_module(f"billstream_{service}.bootstrap").build()
    paths = {path for path in host.app.openapi()["paths"] if not path.startswith(_LOCAL)}
    assert paths, f"{service} serves no public path"
    wrong = {path: service_for(path.replace("{", "x").replace("}", "x"))
             for path in paths
             if service_for(path.replace("{", "x").replace("}", "x")) != service}
    assert not wrong, f"paths of {service} routed elsewhere: {wrong}"
