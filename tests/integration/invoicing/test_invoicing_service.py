"""Invoicing against a real PostgreSQL and broker: events in, invoices and events out, API."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from billstream_contracts.events import (
    ApiKeyCreated,
    Charge,
    MeterUsage,
    PaymentFailed,
    PaymentSucceeded,
    PlanSnapshot,
    SubscriptionCreated,
    SubscriptionSnapshot,
    UsagePeriodSummarized,
)
from billstream_contracts.topics import METERING_EVENTS, PAYMENTS_EVENTS, SUBSCRIPTION_EVENTS
from billstream_invoicing.bootstrap import build
from billstream_invoicing.settings import InvoicingSettings
from billstream_messaging import ServiceHost
from billstream_runtime.auth import hash_key
from billstream_runtime.ids import new_id
from billstream_runtime.settings import load_settings
from billstream_testing.events import envelope, publish
from billstream_testing.fixtures import service_env, unique
from billstream_testing.waiting import eventually

pytestmark = pytest.mark.integration

# Business time on a test clock, far from the wall clock so that a mix-up shows.
T0 = datetime(2031, 1, 1, tzinfo=UTC)
T1 = datetime(2031, 2, 1, tzinfo=UTC)
T2 = datetime(2031, 3, 1, tzinfo=UTC)


@pytest.fixture
async def host(fresh_database, kafka_bootstrap):
    settings = load_settings("invoicing", InvoicingSettings,
                             environ=service_env("invoicing", fresh_database, kafka_bootstrap))
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
        await publish(self.bootstrap, SUBSCRIPTION_EVENTS, envelope(
            ApiKeyCreated(key_id=key_id, environment="test", kind="secret",
                          key_hash=hash_key(self.key), key_prefix=self.key[:12],
                          created_at=T0),
            tenant_id=self.id, aggregate_type="api_key", aggregate_id=key_id))
        await eventually(lambda: self.host.pool.fetchval(
            "SELECT 1 FROM api_keys WHERE key_id = $1", key_id), message="api key projected")

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.host.app, raise_app_exceptions=False),
            base_url="http://t", headers={"Authorization": f"Bearer {self.key}"})

    async def send(self, topic: str, data, *, occurred_at: datetime, source: str,
                   aggregate_id: str, event_id: str | None = None) -> None:
        await publish(self.bootstrap, topic, self.envelope(
            data, occurred_at=occurred_at, source=source, aggregate_id=aggregate_id,
            event_id=event_id))

    def envelope(self, data, *, occurred_at, source, aggregate_id, event_id=None):
        return envelope(data, tenant_id=self.id, source=source, occurred_at=occurred_at,
                        aggregate_type=source, aggregate_id=aggregate_id, event_id=event_id)


@pytest.fixture
async def tenant(host, kafka_bootstrap):
    t = Tenant(host, kafka_bootstrap)
    await t.register()
    return t


def pro_plan(*, currency="USD", base="49.00", unit_price="0.002") -> PlanSnapshot:
    return PlanSnapshot(
        plan_id=new_id("plan"), code="pro", name="Pro", currency=currency, interval="month",
        charges=[
            Charge(charge_id="base", type="fixed", timing="in_advance", amount=base),
            Charge(charge_id="api", type="usage", timing="in_arrears", meter="api_calls",
                   model="per_unit", unit_price=unit_price),
        ],
    )


def subscription(plan: PlanSnapshot, start=T0, end=T1) -> SubscriptionSnapshot:
    return SubscriptionSnapshot(
        subscription_id=new_id("sub"), customer_id=new_id("cus"), plan=plan, status="active",
        started_at=T0, current_period_start=start, current_period_end=end,
        test_clock_id="clock_1")


async def rows(host: ServiceHost, sql: str, *args):
    return await host.pool.fetch(sql, *args)


async def invoices_of(host: ServiceHost, sub: SubscriptionSnapshot):
    return await rows(host, "SELECT * FROM invoices WHERE subscription_id = $1 ORDER BY number",
                      sub.subscription_id)


async def events_of(host: ServiceHost, invoice_id: str) -> list[str]:
    return [r["type"] for r in await rows(
        host, "SELECT type FROM event_log WHERE aggregate_id = $1 ORDER BY seq", invoice_id)]


async def created(tenant: Tenant, sub: SubscriptionSnapshot, event_id: str | None = None):
    await tenant.send(SUBSCRIPTION_EVENTS, SubscriptionCreated(subscription=sub), occurred_at=T0,
                      source="subscription", aggregate_id=sub.subscription_id,
                      event_id=event_id)


async def test_subscription_created_issues_one_open_invoice_and_finalizes_it(host, tenant):
    sub = subscription(pro_plan())
    await created(tenant, sub)
    invs = await eventually(lambda: invoices_of(host, sub), message="first invoice")
    assert len(invs) == 1
    inv = invs[0]
    assert (inv["status"], inv["total"], inv["amount_due"], inv["currency"]) == (
        "open", 4900, 4900, "USD")
    assert inv["number"] == "INV-000001" and inv["kind"] == "subscription_create"
    assert inv["issued_at"] == T0, "issued at the business time of subscription.created"
    assert await events_of(host, inv["id"]) == ["invoice.finalized"]
    ev = await host.pool.fetchrow("SELECT * FROM event_log WHERE aggregate_id = $1", inv["id"])
    assert ev["occurred_at"] == T0 and ev["tenant_id"] == tenant.id
    assert ev["data"]["invoice"]["total"] == 4900
    assert ev["data"]["invoice"]["status"] == "open"
    assert ev["data"]["invoice"]["test_clock_id"] == "clock_1"

    async with tenant.client() as c:
        r = await c.get(f"/v1/invoices/{inv['id']}")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"].startswith("inv_") and body["object"] == "invoice"
        assert body["number"] == "INV-000001"
        assert (body["customer"], body["subscription"]) == (sub.customer_id, sub.subscription_id)
        assert (body["status"], body["currency"], body["total"], body["subtotal"]) == (
            "open", "USD", 4900, 4900)
        assert (body["amount_due"], body["amount_paid"], body["paid_at"]) == (4900, 0, None)
        assert body["period_start"] == "2031-01-01T00:00:00Z"
        assert body["period_end"] == "2031-02-01T00:00:00Z"
        assert body["issued_at"] == "2031-01-01T00:00:00Z" and body["livemode"] is False
        assert body["created"] == "2031-01-01T00:00:00Z"
        [line] = body["lines"]
        assert line == {
            "id": line["id"], "type": "fixed", "description": "Pro: fixed fee",
            "charge_id": "base", "quantity": "1", "unit_price": "49.00", "amount": 4900,
            "period_start": "2031-01-01T00:00:00Z", "period_end": "2031-02-01T00:00:00Z",
        }
        listed = (await c.get("/v1/invoices", params={"customer": sub.customer_id})).json()
        assert listed["object"] == "list" and listed["has_more"] is False
        assert [i["id"] for i in listed["data"]] == [inv["id"]]


async def test_redelivered_subscription_created_bills_once(host, tenant):
    sub = subscription(pro_plan())
    same = tenant.envelope(SubscriptionCreated(subscription=sub), occurred_at=T0,
                           source="subscription", aggregate_id=sub.subscription_id)
    # The same event twice (the inbox), then the same subscription under a new event id
    # (e.g. a producer that re-emitted it): the unique (subscription, period, kind) holds.
    await publish(tenant.bootstrap, SUBSCRIPTION_EVENTS, same, same)
    again = new_id("evt")
    await created(tenant, sub, event_id=again)
    await eventually(lambda: applied(host, same.id, again), message="both events applied")
    await eventually(lambda: duplicates(host), message="the redelivery counted as duplicate")
    other = subscription(pro_plan())
    await created(tenant, other)
    await eventually(lambda: invoices_of(host, other), message="the later subscription billed")
    invs = await invoices_of(host, sub)
    assert len(invs) == 1
    assert [r["number"] for r in await rows(
        host, "SELECT number FROM invoices WHERE tenant_id = $1 ORDER BY number", tenant.id)] == [
        "INV-000001", "INV-000002"], "numbers are gapless: a duplicate takes no number"
    assert await events_of(host, invs[0]["id"]) == ["invoice.finalized"]


async def test_no_in_advance_charges_means_no_first_invoice(host, tenant):
    arrears = PlanSnapshot(plan_id=new_id("plan"), code="payg", name="PAYG", currency="USD",
                           interval="month", charges=[
                               Charge(charge_id="api", type="usage", timing="in_arrears",
                                      meter="api_calls", model="per_unit", unit_price="0.01")])
    sub, event_id = subscription(arrears), new_id("evt")
    await created(tenant, sub, event_id=event_id)
    await eventually(lambda: applied(host, event_id), message="subscription.created applied")
    assert await invoices_of(host, sub) == []


async def test_usage_period_summarized_issues_the_period_invoice(host, tenant):
    sub = subscription(pro_plan())
    summary = UsagePeriodSummarized(
        subscription=sub, period_start=T0, period_end=T1, renews=True, next_period_start=T1,
        next_period_end=T2,
        usage=[MeterUsage(charge_id="api", meter="api_calls", quantity="1500", usage_count=15)])
    await tenant.send(METERING_EVENTS, summary, occurred_at=T1, source="metering",
                      aggregate_id=sub.subscription_id)
    invs = await eventually(lambda: invoices_of(host, sub), message="period invoice")
    [inv] = invs
    assert (inv["total"], inv["status"], inv["kind"]) == (5200, "open", "subscription_cycle")
    assert (inv["period_start"], inv["period_end"], inv["issued_at"]) == (T0, T1, T1)
    lines = await rows(host, "SELECT * FROM invoice_lines WHERE invoice_id = $1 ORDER BY position",
                       inv["id"])
    assert [(ln["charge_id"], ln["amount"], ln["period_start"]) for ln in lines] == [
        ("api", 300, T0), ("base", 4900, T1)]
    assert await events_of(host, inv["id"]) == ["invoice.finalized"]
    async with tenant.client() as c:
        body = (await c.get(f"/v1/invoices/{inv['id']}")).json()
    usage = next(ln for ln in body["lines"] if ln["type"] == "usage")
    assert (usage["quantity"], usage["unit_price"], usage["amount"]) == ("1500", "0.002", 300)
    assert body["total"] == 5200


async def test_zero_total_invoice_is_paid_at_once(host, tenant):
    sub = subscription(pro_plan())
    summary = UsagePeriodSummarized(
        subscription=sub, period_start=T0, period_end=T1, renews=False,
        usage=[MeterUsage(charge_id="api", meter="api_calls", quantity="0", usage_count=0)])
    await tenant.send(METERING_EVENTS, summary, occurred_at=T1, source="metering",
                      aggregate_id=sub.subscription_id)
    [inv] = await eventually(lambda: invoices_of(host, sub))
    assert (inv["total"], inv["status"], inv["amount_paid"], inv["paid_at"]) == (0, "paid", 0, T1)
    assert await events_of(host, inv["id"]) == ["invoice.finalized", "invoice.paid"]
    paid = await host.pool.fetchrow(
        "SELECT data FROM event_log WHERE aggregate_id = $1 AND type = 'invoice.paid'", inv["id"])
    assert paid["data"]["payment_id"] == "none"


async def _open_invoice(host, tenant) -> dict:
    sub = subscription(pro_plan())
    await created(tenant, sub)
    [inv] = await eventually(lambda: invoices_of(host, sub))
    return dict(inv)


async def test_payment_succeeded_marks_the_invoice_paid(host, tenant):
    inv = await _open_invoice(host, tenant)
    pay_id = new_id("pay")
    paid_at = datetime(2031, 1, 1, 0, 5, tzinfo=UTC)
    data = PaymentSucceeded(payment_id=pay_id, invoice_id=inv["id"],
                            customer_id=inv["customer_id"], amount=4900, currency="USD",
                            payment_method_id=new_id("pm"), created_at=paid_at)
    first = tenant.envelope(data, occurred_at=paid_at, source="payments", aggregate_id=pay_id)
    await publish(tenant.bootstrap, PAYMENTS_EVENTS, first, first)
    # The same outcome under a new event id is a no-op too (same partition: same key).
    again = new_id("evt")
    await tenant.send(PAYMENTS_EVENTS, data, occurred_at=paid_at, source="payments",
                      aggregate_id=pay_id, event_id=again)
    await eventually(lambda: applied(host, first.id, again), message="payment events applied")

    async def is_paid():
        return await host.pool.fetchval(
            "SELECT status = 'paid' FROM invoices WHERE id = $1", inv["id"])

    await eventually(is_paid, message="invoice paid")
    row = await host.pool.fetchrow("SELECT * FROM invoices WHERE id = $1", inv["id"])
    assert (row["amount_paid"], row["paid_at"], row["payment_id"]) == (4900, paid_at, pay_id)
    await eventually(lambda: _eq(events_of(host, inv["id"]),
                                 ["invoice.finalized", "invoice.paid"]))
    ev = await host.pool.fetchrow(
        "SELECT * FROM event_log WHERE aggregate_id = $1 AND type = 'invoice.paid'", inv["id"])
    assert ev["occurred_at"] == paid_at
    assert ev["data"]["payment_id"] == pay_id and ev["data"]["invoice"]["status"] == "paid"
    async with tenant.client() as c:
        body = (await c.get(f"/v1/invoices/{inv['id']}")).json()
        assert (body["status"], body["amount_paid"], body["paid_at"]) == (
            "paid", 4900, "2031-01-01T00:05:00Z")
        listed = (await c.get("/v1/invoices", params={"status": "paid"})).json()
        assert [i["id"] for i in listed["data"]] == [inv["id"]]
        assert (await c.get("/v1/invoices", params={"status": "open"})).json()["data"] == []


async def test_payment_failed_keeps_the_invoice_open(host, tenant):
    inv = await _open_invoice(host, tenant)
    pay_id = new_id("pay")
    await tenant.send(PAYMENTS_EVENTS, PaymentFailed(
        payment_id=pay_id, invoice_id=inv["id"], customer_id=inv["customer_id"], amount=4900,
        currency="USD", failure_code="card_declined", failure_message="Your card was declined.",
        created_at=T0), occurred_at=T0, source="payments", aggregate_id=pay_id)
    await eventually(lambda: _eq(events_of(host, inv["id"]),
                                 ["invoice.finalized", "invoice.payment_failed"]))
    ev = await host.pool.fetchrow(
        "SELECT data FROM event_log WHERE aggregate_id = $1 AND type = 'invoice.payment_failed'",
        inv["id"])
    assert ev["data"]["failure_code"] == "card_declined"
    assert ev["data"]["failure_message"] == "Your card was declined."
    assert ev["data"]["invoice"]["status"] == "open"
    assert await host.pool.fetchval("SELECT status FROM invoices WHERE id = $1",
                                    inv["id"]) == "open"


async def test_api_lists_newest_first_with_cursor_and_scopes_by_key(host, tenant,
                                                                    kafka_bootstrap):
    subs = [subscription(pro_plan()) for _ in range(3)]
    for sub in subs:
        await created(tenant, sub)
    await eventually(lambda: _count(host, tenant.id, 3))
    async with tenant.client() as c:
        first = (await c.get("/v1/invoices", params={"limit": 2})).json()
        assert first["has_more"] is True and len(first["data"]) == 2
        rest = (await c.get("/v1/invoices", params={
            "limit": 2, "starting_after": first["data"][-1]["id"]})).json()
        assert rest["has_more"] is False and len(rest["data"]) == 1
        ids = [i["id"] for i in first["data"] + rest["data"]]
        assert ids == sorted(ids, reverse=True)
        by_sub = (await c.get("/v1/invoices", params={
            "subscription": subs[1].subscription_id})).json()
        assert [i["subscription"] for i in by_sub["data"]] == [subs[1].subscription_id]
        r = await c.get("/v1/invoices/inv_nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "resource_missing"
        r = await c.get("/v1/invoices", params={"status": "bogus"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "status"
        r = await c.get("/v1/invoices", headers={"Authorization": "Bearer sk_test_unknown"})
        assert r.status_code == 401
    other = Tenant(host, kafka_bootstrap)
    await other.register()
    async with other.client() as c:
        assert (await c.get("/v1/invoices")).json()["data"] == []
        assert (await c.get(f"/v1/invoices/{ids[0]}")).status_code == 404


async def applied(host: ServiceHost, *event_ids: str) -> bool:
    n = await host.pool.fetchval(
        "SELECT count(*) FROM inbox WHERE event_id = ANY($1::text[]) AND status = 'applied'",
        list(event_ids))
    return n == len(event_ids)


async def duplicates(host: ServiceHost) -> float:
    consumer = host.consumers[0]
    return host.metrics.events_consumed.labels(consumer.name, "duplicate")._value.get()


async def _count(host, tenant_id, n):
    return await host.pool.fetchval(
        "SELECT count(*) FROM invoices WHERE tenant_id = $1", tenant_id) == n


async def _eq(awaitable, expected):
    return (await awaitable) == expected


async def test_a_payment_that_does_not_cover_the_invoice_leaves_it_open(host, tenant):
    inv = await _open_invoice(host, tenant)
    short, wrong_currency = new_id("pay"), new_id("pay")
    at = datetime(2031, 1, 1, 0, 5, tzinfo=UTC)
    ids = []
    for pay_id, amount, currency in ((short, 4899, "USD"), (wrong_currency, 4900, "EUR")):
        data = PaymentSucceeded(payment_id=pay_id, invoice_id=inv["id"],
                                customer_id=inv["customer_id"], amount=amount,
                                currency=currency, payment_method_id=new_id("pm"), created_at=at)
        env = tenant.envelope(data, occurred_at=at, source="payments", aggregate_id=pay_id)
        ids.append(env.id)
        await publish(tenant.bootstrap, PAYMENTS_EVENTS, env)
    await eventually(lambda: applied(host, *ids), message="both payments applied")
    assert await host.pool.fetchval(
        "SELECT status FROM invoices WHERE id = $1", inv["id"]) == "open"
    assert await events_of(host, inv["id"]) == ["invoice.finalized"]
