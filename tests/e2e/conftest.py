"""End-to-end tier: the services as separate processes behind one base URL, driven only
through the public API, a test clock and a webhook receiver."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from billstream_localstack.demo_tenant import bootstrap_demo_tenant
from billstream_localstack.stack import LocalStack


def start_stack(root: Path, **overrides) -> tuple[LocalStack, dict[str, str]]:
    """A whole platform on free ports, with a demo tenant whose keys every service accepts."""
    env = {
        # fast webhook retries and renewals so the tests finish quickly
        "BILLSTREAM_WEBHOOK_DISPATCH_DELIVERY_BACKOFF_BASE_S": "0.2",
        "BILLSTREAM_RELAY_HEARTBEAT_INTERVAL_S": "0.5",
        **overrides.pop("env", {}),
    }
    stack = LocalStack(
        root,
        gateway_port=0,
        service_ports={s: 0 for s in ("ingestion", "metering", "subscription", "invoicing",
                                      "payments", "webhook_dispatch")},
        external_database_url=os.environ.get("BILLSTREAM_TEST_DATABASE_URL"),
        external_kafka=os.environ.get("BILLSTREAM_TEST_KAFKA_BOOTSTRAP"),
        env_overrides=env,
        **overrides,
    )
    stack.start()
    try:
        dev = bootstrap_demo_tenant(stack.base_url, stack.admin_token, stack.service_urls, root)
    except BaseException:
        stack.stop()
        raise
    return stack, dev


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    stack, dev = start_stack(root)
    try:
        yield stack, dev
    finally:
        stack.stop()
