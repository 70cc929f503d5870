"""deploy/compose/nginx.conf routes exactly like billstream_runtime.routes.ROUTES."""

from __future__ import annotations

import re

import pytest
from billstream_runtime.routes import ROUTES, SERVICES, service_for

from .support import (
    NGINX_CONF,
    Directive,
    compose_service_for_dockerfile,
    load_compose,
    nginx_server,
    nginx_upstream_host,
    parse_nginx,
    sample_paths,
)


@pytest.fixture(scope="module")
def server() -> Directive:
    return nginx_server()


@pytest.fixture(scope="module")
def host_to_service() -> dict[str, str]:
    """Compose container name -> Billstream service (via the Dockerfile it is built from)."""
    compose = load_compose()
    out = {}
    for service in SERVICES:
        name = compose_service_for_dockerfile(compose, f"services/{service}/Dockerfile")
        assert name is not None
        out[name] = service
    gateway = compose_service_for_dockerfile(compose, "deploy/gateway.Dockerfile")
    assert gateway is not None
    out[gateway] = "gateway"
    return out


def _locations(server: Directive) -> list[Directive]:
    return server.find("location")


def _regex_locations(server: Directive) -> list[Directive]:
    return [loc for loc in _locations(server) if loc.args[0] in ("~", "~*")]


def _exact_locations(server: Directive) -> dict[str, Directive]:
    return {loc.args[1]: loc for loc in _locations(server) if loc.args[0] == "="}


def test_regex_locations_are_the_routes_in_order(
    server: Directive, host_to_service: dict[str, str]
) -> None:
    regex = _regex_locations(server)
    assert [loc.args[0] for loc in regex] == ["~"] * len(regex), "case-sensitive, like ROUTES"
    assert [loc.args[1] for loc in regex] == [route.pattern for route in ROUTES]
    for loc, route in zip(regex, ROUTES, strict=True):
        assert host_to_service[nginx_upstream_host(loc)] == route.service, route.pattern


def test_openapi_and_docs_go_to_the_gateway(
    server: Directive, host_to_service: dict[str, str]
) -> None:
    exact = _exact_locations(server)
    for path in ("/openapi.json", "/docs"):
        assert host_to_service[nginx_upstream_host(exact[path])] == "gateway"


def test_no_other_location_proxies(server: Directive) -> None:
    """Every proxying location is a route or a gateway path: no route hides elsewhere."""
    proxied = [loc for loc in _locations(server) if loc.find("proxy_pass")]
    assert len(proxied) == len(ROUTES) + 2
    for loc in _locations(server):
        if loc.args[0] not in ("~", "~*", "="):
            assert not loc.find("proxy_pass"), f"unexpected proxying location {loc.args}"


def test_variable_upstreams_have_a_resolver(server: Directive) -> None:
    """proxy_pass through a variable is resolved per request, which needs a resolver."""
    targets = [
        loc.find("proxy_pass")[0].args[0] for loc in _locations(server) if loc.find("proxy_pass")
    ]
    if any(target.startswith("$") for target in targets):
        (http,) = [d for d in parse_nginx(NGINX_CONF.read_text()) if d.name == "http"]
        assert http.find("resolver") or server.find("resolver")


def _nginx_pick(server: Directive, path: str) -> str | None:
    """nginx's location choice for `path`: exact, then regexes in order, then prefix `/`."""
    exact = _exact_locations(server)
    if path in exact:
        loc = exact[path]
    else:
        for loc in _regex_locations(server):
            flags = re.IGNORECASE if loc.args[0] == "~*" else 0
            if re.search(loc.args[1], path, flags):
                break
        else:
            return None
    return nginx_upstream_host(loc) if loc.find("proxy_pass") else None


@pytest.mark.parametrize("route", ROUTES, ids=[r.pattern for r in ROUTES])
def test_nginx_picks_the_same_service_as_routes(
    server: Directive, host_to_service: dict[str, str], route
) -> None:
    for path in sample_paths(route.pattern):
        host = _nginx_pick(server, path)
        assert (host_to_service[host] if host else None) == service_for(path), path


def test_paths_outside_routes(server: Directive, host_to_service: dict[str, str]) -> None:
    for path in ("/openapi.json", "/docs", "/healthz", "/", "/v2/customers", "/internal/whoami"):
        host = _nginx_pick(server, path)
        expected = "gateway" if path in ("/openapi.json", "/docs") else service_for(path)
        assert (host_to_service[host] if host else None) == expected, path
