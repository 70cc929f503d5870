"""The demo tenant of `billstream dev`: created once through the admin API, kept in
`<root>/dev.json`, reused while the platform still knows it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from billstream_localstack._proc import wait_for, write_private

DEV_FILE = "dev.json"


class BootstrapError(RuntimeError):
    """The demo tenant could not be created or its keys were not accepted."""


def bootstrap_demo_tenant(
    base_url: str,
    admin_token: str,
    service_urls: Mapping[str, str],
    root: Path,
    *,
    extra: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> dict[str, str]:
    """Reuse the tenant of `root/dev.json` if the platform still has it, else create a tenant
    named "Demo"; wait until every service accepts its test secret key (services learn keys
    from events, so this takes a moment); write and return `root/dev.json`.

    The result holds base_url, admin_token, tenant_id, the four keys and `extra`.
    """
    dev_file = root / DEV_FILE
    headers = {"Authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=10.0, trust_env=False) as admin:
        dev = _known_tenant(admin, dev_file) or _create_tenant(admin)
    dev = {**dev, "base_url": base_url, "admin_token": admin_token, **(extra or {})}
    _wait_until_key_accepted(service_urls, dev["test_secret_key"], timeout)
    write_dev_file(dev_file, dev)
    return dev


def read_dev_file(path: Path) -> dict[str, str]:
    """The settings of a previous `billstream dev` run, or {} when there are none."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_dev_file(path: Path, dev: Mapping[str, str]) -> None:
    """Write the dev settings, readable by the owner only: they hold secret keys."""
    write_private(path, json.dumps(dict(dev), indent=2) + "\n")


def _known_tenant(admin: httpx.Client, dev_file: Path) -> dict[str, str] | None:
    """The tenant part of dev.json when the platform still has that tenant."""
    dev = read_dev_file(dev_file)
    if "tenant_id" not in dev or "test_secret_key" not in dev:
        return None
    response = admin.get(f"/admin/v1/tenants/{dev['tenant_id']}")
    if response.status_code == 404:
        return None
    _raise_unless_ok(response, "look up the demo tenant")
    return dev


def _create_tenant(admin: httpx.Client) -> dict[str, str]:
    response = admin.post(
        "/admin/v1/tenants", json={"name": "Demo"}, headers={"Idempotency-Key": uuid.uuid4().hex}
    )
    _raise_unless_ok(response, "create the demo tenant")
    tenant: dict[str, Any] = response.json()
    keys = tenant["keys"]
    return {
        "tenant_id": tenant["id"],
        "test_secret_key": keys["test"]["secret_key"],
        "test_publishable_key": keys["test"]["publishable_key"],
        "live_secret_key": keys["live"]["secret_key"],
        "live_publishable_key": keys["live"]["publishable_key"],
    }


def _wait_until_key_accepted(service_urls: Mapping[str, str], key: str, timeout: float) -> None:
    """Poll `GET /internal/whoami` of every service with `key` until each answers 200."""
    pending = dict(service_urls)
    last_status: dict[str, str] = {}

    def all_accept(client: httpx.Client) -> bool:
        for service, url in list(pending.items()):
            try:
                status = client.get(f"{url}/internal/whoami").status_code
            except httpx.HTTPError as exc:
                last_status[service] = type(exc).__name__
                continue
            if status == 200:
                del pending[service]
            last_status[service] = str(status)
        return not pending

    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(headers=headers, timeout=5.0, trust_env=False) as client:
        reason = wait_for(lambda: all_accept(client), timeout=timeout, interval=0.2)
    if reason is not None:
        refusing = ", ".join(f"{s} (last answer: {last_status.get(s, 'none')})" for s in pending)
        raise BootstrapError(f"the demo tenant's test key is not accepted by {refusing}: {reason}")


def _raise_unless_ok(response: httpx.Response, action: str) -> None:
    if not response.is_success:
        raise BootstrapError(
            f"could not {action}: {response.request.method} {response.request.url} answered "
            f"{response.status_code}: {response.text[:500]}"
        )
