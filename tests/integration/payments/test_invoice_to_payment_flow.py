"""Invoicing and payments together, each with its own database, over the real broker:
subscription.created → invoice finalized → payment collected → invoice paid (or failed)."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from billstream_contracts.events import (
    ApiKeyCreated,
    Charge,
    CustomerCreated,
    PlanSnapshot,
    SubscriptionCreated,
    SubscriptionSnapshot,
)
from billstream_contracts.topics import SUBSCRIPTION_EVENTS
from billstream_invoicing.bootstrap import build as build_invoicing
from billstream_invoicing.settings import InvoicingSettings
from billstream_payments.bootstrap import build as build_payments
from billstream_payments.settings import PaymentsSettings
from billstream_runtime.auth import hash_key
from billstream_runtime.ids import new_id
from billstream_runtime.settings import load_settings
from billstream_testing.events import envelope, publish
from billstream_testing.fixtures import service_env, unique
from billstream_testing.waiting import eventually

pytestmark = pytest.mark.integration

T0 = datetime(2031, 1, 1, tzinfo=UTC)
T1 = datetime(2031, 2, 1, tzinfo=UTC)


def _sibling_database(dsn: str, suffix: str) -> str:
    """Another database on the same server (the host creates it when it starts)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=parts.path + suffix))


def _env(service: str, dsn: str, bootstrap: str) -> dict[str, str]:
    return service_env(service, dsn, bootstrap, collect_poll_interval_s="0.5")


@pytest.fixture
async def hosts(fresh_database, kafka_bootstrap):
    invoicing = build_invoicing(load_settings(
        "invoicing", InvoicingSettings, environ=_env("invoicing", fresh_database,
                                                     kafka_bootstrap)))
    payments = build_payments(load_settings(
        "payments", PaymentsSettings, environ=_env(
            "payments", _sibling_database(fresh_database, "_pay"), kafka_bootstrap)))
    await invoicing.start(serve_http=False)
    try:
        await payments.start(serve_http=False)
        try:
            yield invoicing, payments
        finally:
            await payments.stop()
    finally:
        await invoicing.stop()


async def test_subscription_is_invoiced_collected_and_paid(hosts, kafka_bootstrap):
    invoicing, payments = hosts
    tenant, key = unique("ten"), f"sk_test_{unique('k').replace('-', '')}"

    def env(data, aggregate_id, source="subscription"):
        return envelope(data, tenant_id=tenant, source=source, occurred_at=T0,
                        aggregate_type=source, aggregate_id=aggregate_id)

    key_id, good, bad = new_id("key"), new_id("cus"), new_id("cus")
    await publish(kafka_bootstrap, SUBSCRIPTION_EVENTS,
                  env(ApiKeyCreated(key_id=key_id, environment="test", kind="secret",
                                    key_hash=hash_key(key), key_prefix=key[:12],
                                    created_at=T0), key_id),
                  *[env(CustomerCreated(customer_id=c, created_at=T0), c) for c in (good, bad)])
    for host in hosts:
        await eventually(lambda h=host: h.pool.fetchval(
            "SELECT 1 FROM api_keys WHERE key_id = $1", key_id), message=f"{host.name} key")

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=payments.app, raise_app_exceptions=False),
        base_url="http://t", headers={"Authorization": f"Bearer {key}"},
    ) as pay:
        for customer, token in ((good, "tok_visa"), (bad, "tok_chargeDeclined")):
            r = await pay.post(f"/v1/customers/{customer}/payment_methods",
                               json={"token": token})
            assert r.status_code == 201, r.text

        plan = PlanSnapshot(plan_id=new_id("plan"), code="pro", name="Pro", currency="USD",
                            interval="month", charges=[
                                Charge(charge_id="base", type="fixed", timing="in_advance",
                                       amount="49.00")])
        subs = {c: SubscriptionSnapshot(
            subscription_id=new_id("sub"), customer_id=c, plan=plan, status="active",
            started_at=T0, current_period_start=T0, current_period_end=T1) for c in (good, bad)}
        await publish(kafka_bootstrap, SUBSCRIPTION_EVENTS, *[
            env(SubscriptionCreated(subscription=s), s.subscription_id) for s in subs.values()])

        async def invoice_events(customer):
            return [r["type"] for r in await invoicing.pool.fetch(
                "SELECT e.type FROM event_log e JOIN invoices i ON i.id = e.aggregate_id"
                " WHERE i.customer_id = $1 ORDER BY e.seq", customer)]

        await eventually(lambda: _eq(invoice_events(good),
                                     ["invoice.finalized", "invoice.paid"]),
                         message="the good card's invoice paid")
        await eventually(lambda: _eq(invoice_events(bad),
                                     ["invoice.finalized", "invoice.payment_failed"]),
                         message="the declined card's invoice failed")

        paid = await invoicing.pool.fetchrow(
            "SELECT * FROM invoices WHERE customer_id = $1", good)
        assert (paid["status"], paid["amount_paid"], paid["paid_at"]) == ("paid", 4900, T0)
        [payment] = (await pay.get("/v1/payments", params={"invoice": paid["id"]})).json()["data"]
        assert (payment["status"], payment["amount"]) == ("succeeded", 4900)
        assert paid["payment_id"] == payment["id"]

        failed = await invoicing.pool.fetchrow(
            "SELECT * FROM invoices WHERE customer_id = $1", bad)
        assert failed["status"] == "open"
        [declined] = (await pay.get("/v1/payments", params={"invoice": failed["id"]})
                      ).json()["data"]
        assert (declined["status"], declined["failure_code"]) == ("failed", "card_declined")


async def _eq(awaitable, expected):
    return (await awaitable) == expected
