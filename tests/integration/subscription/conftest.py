"""The subscription service's `build()` against a real PostgreSQL and broker, one database and
consumer group per test; a tenant created through the admin API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from billstream_messaging import ServiceHost
from billstream_subscription.bootstrap import build
from billstream_testing.fixtures import unique
from subscription_helpers import ADMIN_TOKEN, client_for, settings_for


@pytest.fixture
async def host(fresh_database, kafka_bootstrap) -> AsyncIterator[ServiceHost]:
    h = build(settings_for(fresh_database, kafka_bootstrap))
    await h.start(serve_http=False)
    try:
        yield h
    finally:
        await h.stop()


@pytest.fixture
async def admin(host) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(host, ADMIN_TOKEN) as c:
        yield c


@pytest.fixture
async def tenant(admin) -> dict:
    """A tenant made through the admin API: its creation response, with the four keys."""
    r = await admin.post("/admin/v1/tenants", json={"name": unique("Tenant")})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture
async def api(host, tenant) -> AsyncIterator[httpx.AsyncClient]:
    """A client with the tenant's test secret key."""
    async with client_for(host, tenant["keys"]["test"]["secret_key"]) as c:
        yield c


@pytest.fixture
async def live_api(host, tenant) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(host, tenant["keys"]["live"]["secret_key"]) as c:
        yield c


@pytest.fixture
def log_of(host) -> Callable:
    """The tenant's rows of the service's event log, in log order."""

    async def fetch(tenant_id: str, types: tuple[str, ...] | None = None) -> list:
        rows = await host.pool.fetch(
            "SELECT seq, id, type, environment, aggregate_type, aggregate_id, occurred_at,"
            " causation_id, correlation_id, topic, data FROM event_log WHERE tenant_id = $1"
            " ORDER BY seq", tenant_id)
        return [r for r in rows if types is None or r["type"] in types]

    return fetch
