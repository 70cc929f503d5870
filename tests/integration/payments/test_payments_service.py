"""Payments against a real PostgreSQL and broker: payment methods over HTTP, finalized
invoices in, collected payments and their events out."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import httpx
import pytest

from billstream_contracts.events import (
    ApiKeyCreated,
    CustomerCreated,
    InvoiceFinalized,
    InvoiceLine,
    InvoiceSnapshot,
    TestClockCreated as ClockCreated,
)
from billstream_contracts.topics import INVOICING_EVENTS, SUBSCRIPTION_EVENTS
from billstream_messaging import ServiceHost
from billstream_payments.bootstrap import build
from billstream_payments.settings import PaymentsSettings
from billstream_runtime.auth import hash_key
from billstream_runtime.ids import new_id
from billstream_runtime.settings import load_settings
from billstream_testing.events import envelope, publish
from billstream_testing.fixtures import service_env, unique
from billstream_testing.waiting import eventually

pytestmark = pytest.mark.integration

T0 = datetime(2031, 1, 1, tzinfo=UTC)  # business time on a test clock
T1 = datetime(2031, 2, 1, tzinfo=UTC)
PROJECTION_WAIT_S = 1.0


@pytest.fixture
async def host(fresh_database, kafka_bootstrap):
    settings = load_settings("payments", PaymentsSettings, environ=service_env(
        "payments", fresh_database, kafka_bootstrap, projection_wait_s=PROJECTION_WAIT_S,
        collect_poll_interval_s="0.5"))
    h = build(settings)
    await h.start(serve_http=False)
    try:
        yield h
    finally:
        await h.stop()


class Tenant:
    """A unique tenant with a secret test key, projected through `api_key.created`."""

    def __init__(self, host: ServiceHost, bootstrap: str) -> None:
        self.host, self.bootstrap = host, bootstrap
        self.id = unique("ten")
        self.key = f"sk_test_{unique('k').replace('-', '')}"

    async def register(self) -> None:
        key_id = new_id("key")
        await self.send(SUBSCRIPTION_EVENTS, ApiKeyCreated(
            key_id=key_id, environment="test", kind="secret", key_hash=hash_key(self.key),
            key_prefix=self.key[:12], created_at=T0), source="subscription", aggregate_id=key_id)
        await eventually(lambda: self.host.pool.fetchval(
            "SELECT 1 FROM api_keys WHERE key_id = $1", key_id), message="api key projected")

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.host.app, raise_app_exceptions=False),
            base_url="http://t", headers={"Authorization": f"Bearer {self.key}"})

    def envelope(self, data, *, source, aggregate_id, occurred_at=T0, event_id=None):
        return envelope(data, tenant_id=self.id, source=source, occurred_at=occurred_at,
                        aggregate_type=source, aggregate_id=aggregate_id, event_id=event_id)

    async def send(self, topic, data, *, source, aggregate_id, occurred_at=T0, event_id=None):
        await publish(self.bootstrap, topic, self.envelope(
            data, source=source, aggregate_id=aggregate_id, occurred_at=occurred_at,
            event_id=event_id))

    async def customer(self, test_clock_id: str | None = None, *, wait: bool = True) -> str:
        customer_id = new_id("cus")
        await self.send(SUBSCRIPTION_EVENTS, CustomerCreated(
            customer_id=customer_id, currency="USD", test_clock_id=test_clock_id,
            created_at=T0), source="subscription", aggregate_id=customer_id)
        if wait:
            await eventually(lambda: self.host.pool.fetchval(
                "SELECT 1 FROM customers WHERE customer_id = $1", customer_id))
        return customer_id

    async def attach(self, customer_id: str, token: str = "tok_visa") -> dict:
        async with self.client() as c:
            r = await c.post(f"/v1/customers/{customer_id}/payment_methods",
                             json={"token": token})
        assert r.status_code == 201, r.text
        return r.json()


@pytest.fixture
async def tenant(host, kafka_bootstrap):
    t = Tenant(host, kafka_bootstrap)
    await t.register()
    return t


def invoice(customer_id: str, amount: int = 4900, *, status="open") -> InvoiceSnapshot:
    return InvoiceSnapshot(
        invoice_id=new_id("inv"), number="INV-000001", customer_id=customer_id,
        subscription_id=new_id("sub"), currency="USD", status=status,
        lines=[InvoiceLine(line_id=new_id("il"), type="fixed", description="Pro: fixed fee",
                           charge_id="base", quantity="1", unit_price="49.00", amount=amount,
                           period_start=T0, period_end=T1)],
        subtotal=amount, total=amount, amount_due=amount, amount_paid=0, period_start=T0,
        period_end=T1, issued_at=T0, test_clock_id="clock_1")


async def finalize(tenant: Tenant, inv: InvoiceSnapshot, event_id: str | None = None) -> None:
    await tenant.send(INVOICING_EVENTS, InvoiceFinalized(invoice=inv), source="invoicing",
                      aggregate_id=inv.invoice_id, event_id=event_id)


async def settled_event(host: ServiceHost, invoice_id: str):
    return await host.pool.fetchrow(
        "SELECT * FROM event_log WHERE type IN ('payment.succeeded', 'payment.failed')"
        " AND data->>'invoice_id' = $1", invoice_id)


async def payments_of(host: ServiceHost, invoice_id: str):
    return await host.pool.fetch("SELECT * FROM payments WHERE invoice_id = $1", invoice_id)


# ---------------------------------------------------------------------------------- methods


async def test_attach_first_method_becomes_default(host, tenant):
    customer_id = await tenant.customer()
    first = await tenant.attach(customer_id, "tok_visa")
    assert first["id"].startswith("pm_") and first["object"] == "payment_method"
    assert first == {
        "id": first["id"], "object": "payment_method", "customer": customer_id, "type": "card",
        "card": {"brand": "visa", "last4": "4242"}, "default": True, "livemode": False,
        "created": first["created"],
    }
    assert first["created"].endswith("Z")
    second = await tenant.attach(customer_id, "tok_mastercard")
    assert second["default"] is False and second["card"] == {"brand": "mastercard",
                                                            "last4": "4444"}
    async with tenant.client() as c:
        listed = (await c.get(f"/v1/customers/{customer_id}/payment_methods")).json()
    assert listed["object"] == "list" and listed["has_more"] is False
    assert [m["id"] for m in listed["data"]] == [second["id"], first["id"]]
    ev = await host.pool.fetch(
        "SELECT * FROM event_log WHERE type = 'payment_method.attached' AND aggregate_id = $1"
        " ORDER BY seq", customer_id)
    assert [(e["data"]["payment_method_id"], e["data"]["is_default"]) for e in ev] == [
        (first["id"], True), (second["id"], False)]
    assert ev[0]["data"]["brand"] == "visa" and ev[0]["data"]["last4"] == "4242"


async def test_attach_waits_for_a_customer_created_moments_ago(host, tenant):
    customer_id = await tenant.customer(wait=False)  # the projection may not have it yet
    assert (await tenant.attach(customer_id))["default"] is True


async def test_unknown_customer_is_404_after_the_projection_wait(host, tenant):
    async with tenant.client() as c:
        started = time.monotonic()
        r = await c.post("/v1/customers/cus_unknown/payment_methods", json={"token": "tok_visa"})
        waited = time.monotonic() - started
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "resource_missing"
    assert waited >= PROJECTION_WAIT_S * 0.9


async def test_invalid_token_is_400(host, tenant):
    customer_id = await tenant.customer()
    async with tenant.client() as c:
        r = await c.post(f"/v1/customers/{customer_id}/payment_methods",
                         json={"token": "tok_nonsense"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert (err["code"], err["param"]) == ("invalid_token", "token")
        r = await c.post(f"/v1/customers/{customer_id}/payment_methods", json={})
        assert r.status_code == 400 and r.json()["error"]["code"] == "parameter_missing"
    assert await host.pool.fetchval("SELECT count(*) FROM payment_methods") == 0


async def test_method_created_on_the_customers_test_clock(host, tenant):
    clock_id = new_id("clock")
    await tenant.send(SUBSCRIPTION_EVENTS, ClockCreated(test_clock_id=clock_id,
                                                            frozen_time=T1),
                      source="subscription", aggregate_id=clock_id)
    customer_id = await tenant.customer(clock_id)
    await eventually(lambda: host.pool.fetchval(
        "SELECT 1 FROM test_clocks WHERE test_clock_id = $1", clock_id))
    assert (await tenant.attach(customer_id))["created"] == "2031-02-01T00:00:00Z"


# ---------------------------------------------------------------------------------- payments


async def test_finalized_invoice_is_collected(host, tenant):
    customer_id = await tenant.customer()
    pm = await tenant.attach(customer_id, "tok_visa")
    inv = invoice(customer_id, 5200)
    await finalize(tenant, inv)
    ev = await eventually(lambda: settled_event(host, inv.invoice_id), message="payment event")
    assert ev["type"] == "payment.succeeded" and ev["tenant_id"] == tenant.id
    assert ev["occurred_at"] == T0, "payment events happen at the invoice's business time"
    data = ev["data"]
    assert (data["amount"], data["currency"], data["customer_id"]) == (5200, "USD", customer_id)
    assert data["payment_method_id"] == pm["id"]
    [row] = await payments_of(host, inv.invoice_id)
    assert (row["status"], row["amount"], row["id"]) == ("succeeded", 5200, data["payment_id"])
    async with tenant.client() as c:
        body = (await c.get(f"/v1/payments/{row['id']}")).json()
        assert body == {
            "id": row["id"], "object": "payment", "invoice": inv.invoice_id,
            "customer": customer_id, "amount": 5200, "currency": "USD", "status": "succeeded",
            "failure_code": None, "failure_message": None, "payment_method": pm["id"],
            "livemode": False, "created": "2031-01-01T00:00:00Z",
        }
        listed = (await c.get("/v1/payments", params={"invoice": inv.invoice_id})).json()
        assert [p["id"] for p in listed["data"]] == [row["id"]]
        by_customer = (await c.get("/v1/payments", params={"customer": customer_id})).json()
        assert [p["id"] for p in by_customer["data"]] == [row["id"]]
        r = await c.get("/v1/payments/pay_nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "resource_missing"


async def test_declined_card_fails_the_payment(host, tenant):
    customer_id = await tenant.customer()
    pm = await tenant.attach(customer_id, "tok_chargeDeclined")
    inv = invoice(customer_id)
    await finalize(tenant, inv)
    ev = await eventually(lambda: settled_event(host, inv.invoice_id))
    assert ev["type"] == "payment.failed"
    assert (ev["data"]["failure_code"], ev["data"]["payment_method_id"]) == (
        "card_declined", pm["id"])
    assert ev["data"]["amount"] == 4900
    async with tenant.client() as c:
        [p] = (await c.get("/v1/payments", params={"invoice": inv.invoice_id})).json()["data"]
    assert (p["status"], p["failure_code"]) == ("failed", "card_declined")


async def test_no_payment_method_fails_with_payment_method_missing(host, tenant):
    customer_id = await tenant.customer()
    inv = invoice(customer_id)
    await finalize(tenant, inv)
    ev = await eventually(lambda: settled_event(host, inv.invoice_id))
    assert ev["type"] == "payment.failed"
    assert ev["data"]["failure_code"] == "payment_method_missing"
    assert ev["data"]["payment_method_id"] is None


async def test_redelivered_invoice_finalized_charges_once(host, tenant):
    customer_id = await tenant.customer()
    await tenant.attach(customer_id)
    inv = invoice(customer_id)
    same = tenant.envelope(InvoiceFinalized(invoice=inv), source="invoicing",
                           aggregate_id=inv.invoice_id)
    await publish(tenant.bootstrap, INVOICING_EVENTS, same, same)
    again = new_id("evt")  # the same invoice under another event id: the unique key holds
    await finalize(tenant, inv, event_id=again)
    await eventually(lambda: _applied(host, same.id, again), message="all three delivered")
    await eventually(lambda: settled_event(host, inv.invoice_id))
    assert len(await payments_of(host, inv.invoice_id)) == 1
    assert await host.pool.fetchval(
        "SELECT count(*) FROM event_log WHERE data->>'invoice_id' = $1", inv.invoice_id) == 1


async def test_nothing_to_collect_records_no_payment(host, tenant):
    customer_id = await tenant.customer()
    await tenant.attach(customer_id)
    zero, paid = invoice(customer_id, 0), invoice(customer_id, status="paid")
    ids = [new_id("evt"), new_id("evt")]
    await finalize(tenant, zero, event_id=ids[0])
    await finalize(tenant, paid, event_id=ids[1])
    await eventually(lambda: _applied(host, *ids))
    assert await payments_of(host, zero.invoice_id) == []
    assert await payments_of(host, paid.invoice_id) == []


async def test_collects_many_invoices_each_once(host, tenant):
    customer_id = await tenant.customer()
    await tenant.attach(customer_id)
    invs = [invoice(customer_id, 100 + i) for i in range(25)]
    await publish(tenant.bootstrap, INVOICING_EVENTS, *[
        tenant.envelope(InvoiceFinalized(invoice=i), source="invoicing",
                        aggregate_id=i.invoice_id) for i in invs])

    async def all_settled():
        return await host.pool.fetchval(
            "SELECT count(*) FROM event_log WHERE type = 'payment.succeeded'"
            " AND tenant_id = $1", tenant.id) == len(invs)

    await eventually(all_settled, message="every invoice collected")
    amounts = await host.pool.fetch(
        "SELECT (data->>'amount')::int AS amount FROM event_log"
        " WHERE type = 'payment.succeeded' AND tenant_id = $1 ORDER BY 1", tenant.id)
    assert [r["amount"] for r in amounts] == [100 + i for i in range(25)]


async def _applied(host: ServiceHost, *event_ids: str) -> bool:
    n = await host.pool.fetchval(
        "SELECT count(*) FROM inbox WHERE event_id = ANY($1::text[])", list(event_ids))
    return n == len(event_ids)


async def test_a_lapsed_lease_is_not_charged_by_its_former_holder(host, tenant):
    """A collector renews each payment's lease right before charging it; once its lease has
    lapsed (another collector may have taken the payment) it leaves the payment alone."""
    from billstream_payments import repository

    customer_id = await tenant.customer()
    await tenant.attach(customer_id, "tok_visa")
    inv = invoice(customer_id, 1200)
    await finalize(tenant, inv)
    await eventually(lambda: settled_event(host, inv.invoice_id), message="payment event")
    [row] = await payments_of(host, inv.invoice_id)
    async with host.pool.acquire() as conn:
        await conn.execute("UPDATE payments SET status = 'pending', locked_until ="
                           " now() - interval '1 second' WHERE id = $1", row["id"])
        assert not await repository.renew_lease(conn, row["id"], 60)
        await conn.execute("UPDATE payments SET locked_until = now() + interval '5 seconds'"
                           " WHERE id = $1", row["id"])
        assert await repository.renew_lease(conn, row["id"], 60)
        lease = await conn.fetchval("SELECT locked_until - now() FROM payments WHERE id = $1",
                                    row["id"])
        assert lease.total_seconds() > 50
