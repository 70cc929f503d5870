"""Helpers of the subscription integration tests (settings, clients, the error shape)."""

from __future__ import annotations

import httpx

from billstream_messaging import ServiceHost
from billstream_runtime.settings import load_settings
from billstream_subscription.settings import SubscriptionSettings
from billstream_testing.fixtures import service_env

ADMIN_TOKEN = "admin-token-for-subscription-tests"


def settings_for(dsn: str, bootstrap: str, **extra: str) -> SubscriptionSettings:
    env = service_env("subscription", dsn, bootstrap, admin_token=ADMIN_TOKEN, **extra)
    return load_settings("subscription", SubscriptionSettings, environ=env)


def client_for(host: ServiceHost, token: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=host.app, raise_app_exceptions=False),
        base_url="http://subscription", headers=headers,
    )


def assert_error(response: httpx.Response, status: int, code: str,
                 param: str | None = None) -> dict:
    """The one error shape, with the expected status, code and param."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "code", "message", "param", "request_id"}
    assert error["code"] == code, error
    assert error["request_id"] and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error
