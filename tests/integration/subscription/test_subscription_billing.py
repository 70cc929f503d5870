"""The `billing` consumer: invoicing's payment outcomes move a subscription between active
and past due, exactly once, and announce it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from aiokafka.structs import ConsumerRecord

from billstream_contracts import Envelope
from billstream_contracts.events import (
    InvoiceFinalized,
    InvoicePaid,
    InvoicePaymentFailed,
    InvoiceSnapshot,
)
from billstream_contracts.topics import INVOICING_EVENTS
from billstream_runtime.ids import new_id
from billstream_testing.events import envelope, publish
from billstream_testing.waiting import eventually

pytestmark = pytest.mark.integration
PLAN = {"code": "pro", "name": "Pro", "currency": "USD", "interval": "month",
        "charges": [{"type": "fixed", "amount": "49.00"}]}
AT = datetime(2026, 2, 1, tzinfo=UTC)


def invoice(subscription_id: str | None, customer_id: str, status: str = "open",
            invoice_id: str | None = None) -> InvoiceSnapshot:
    return InvoiceSnapshot(
        invoice_id=invoice_id or new_id("inv"), number="INV-0001", customer_id=customer_id,
        subscription_id=subscription_id, currency="USD", status=status, lines=[],
        subtotal=4900, total=4900, amount_due=4900, amount_paid=0,
        period_start=datetime(2026, 1, 1, tzinfo=UTC), period_end=AT, issued_at=AT,
    )


def failed(tenant_id: str, inv: InvoiceSnapshot, environment: str = "test") -> Envelope:
    return envelope(
        InvoicePaymentFailed(invoice=inv, payment_id=new_id("pay"), failure_code="card_declined",
                             failure_message="Your card was declined."),
        tenant_id=tenant_id, environment=environment, source="invoicing",
        aggregate_type="invoice", aggregate_id=inv.invoice_id, occurred_at=AT,
    )


def paid(tenant_id: str, inv: InvoiceSnapshot) -> Envelope:
    return envelope(
        InvoicePaid(invoice=inv.model_copy(update={"status": "paid"}), payment_id=new_id("pay")),
        tenant_id=tenant_id, source="invoicing", aggregate_type="invoice",
        aggregate_id=inv.invoice_id, occurred_at=AT,
    )


def record(env: Envelope, offset: int = 0) -> ConsumerRecord:
    value = env.model_dump_json().encode()
    return ConsumerRecord(INVOICING_EVENTS, 0, offset, 0, 0, env.key.encode(), value, None,
                          len(env.key), len(value), ())


async def _subscription(api) -> dict:
    assert (await api.post("/v1/plans", json=PLAN)).status_code == 201
    assert (await api.post("/v1/customers", json={"external_id": "acme-1"})).status_code == 201
    r = await api.post("/v1/subscriptions", json={"customer": "acme-1", "plan": "pro"})
    assert r.status_code == 201, r.text
    return r.json()


async def _status(api, sub_id: str) -> str:
    return (await api.get(f"/v1/subscriptions/{sub_id}")).json()["status"]


async def test_payment_failure_then_payment_over_the_broker(host, api, tenant, log_of,
                                                            kafka_bootstrap):
    sub = await _subscription(api)
    inv = invoice(sub["id"], sub["customer"])
    failure = failed(tenant["id"], inv)
    await publish(kafka_bootstrap, INVOICING_EVENTS, failure)

    async def past_due():
        return await _status(api, sub["id"]) == "past_due"

    await eventually(past_due, message="the subscription is past due")
    (event,) = await log_of(tenant["id"], ("subscription.past_due",))
    assert event["aggregate_id"] == sub["id"] and event["occurred_at"] == AT
    assert event["causation_id"] == failure.id
    assert event["data"]["invoice_id"] == inv.invoice_id
    assert event["data"]["subscription"]["status"] == "past_due"
    assert event["data"]["subscription"]["customer_external_id"] == "acme-1"

    # the same failure delivered again, then the payment: applied once each, in order
    payment = paid(tenant["id"], inv)
    await publish(kafka_bootstrap, INVOICING_EVENTS, failure, payment)

    async def active():
        return await _status(api, sub["id"]) == "active"

    await eventually(active, message="the subscription is active again")
    rows = await log_of(tenant["id"], ("subscription.past_due", "subscription.reactivated"))
    assert [r["type"] for r in rows] == ["subscription.past_due", "subscription.reactivated"]
    reactivated = rows[1]
    assert reactivated["causation_id"] == payment.id
    assert reactivated["data"]["subscription"]["status"] == "active"
    assert reactivated["data"]["invoice_id"] == inv.invoice_id


async def test_apply_is_exactly_once_and_ignores_what_does_not_apply(host, api, tenant,
                                                                     log_of):
    consumer = next(c for c in host.consumers if c.name == "subscription.billing")
    assert consumer.topics == (INVOICING_EVENTS,)
    assert host.read_models == {}
    sub = await _subscription(api)
    inv = invoice(sub["id"], sub["customer"])
    failure = failed(tenant["id"], inv)

    await consumer.apply([record(failure)])
    await consumer.apply([record(failure)])  # a redelivery: a counted no-op
    assert await _status(api, sub["id"]) == "past_due"
    second_failure = failed(tenant["id"], inv)  # a retry failing again: already past due
    await consumer.apply([record(second_failure, 1)])
    assert len(await log_of(tenant["id"], ("subscription.past_due",))) == 1
    assert await host.pool.fetchval(
        "SELECT count(*) FROM inbox WHERE event_id = $1", failure.id) == 1

    await consumer.apply([record(paid(tenant["id"], inv), 2)])
    assert await _status(api, sub["id"]) == "active"
    await consumer.apply([record(paid(tenant["id"], inv), 3)])  # paid while active: nothing
    assert len(await log_of(tenant["id"], ("subscription.reactivated",))) == 1

    # not this service's business: other tenants, the other environment, invoices without
    # a subscription, unknown subscriptions, event types without a handler
    others = [
        failed("ten_someone_else", inv),
        failed(tenant["id"], inv, environment="live"),
        failed(tenant["id"], invoice(None, sub["customer"])),
        failed(tenant["id"], invoice("sub_missing", sub["customer"])),
        envelope(InvoiceFinalized(invoice=inv), tenant_id=tenant["id"], source="invoicing",
                 aggregate_type="invoice", aggregate_id=inv.invoice_id),
    ]
    await consumer.apply([record(e, 10 + i) for i, e in enumerate(others)])
    assert await _status(api, sub["id"]) == "active"
    assert len(await log_of(tenant["id"], ("subscription.past_due",))) == 1
    # (the topic is shared with other tests, so the counter may count their events too)
    unknown = host.metrics.events_consumed.labels(consumer.name, "unknown_type")._value.get()
    assert unknown >= 1
    assert await host.pool.fetchval(
        "SELECT count(*) FROM dead_letters WHERE event_id = ANY($1::text[])",
        [e.id for e in others]) == 0
