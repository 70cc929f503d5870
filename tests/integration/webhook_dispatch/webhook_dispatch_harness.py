"""webhook_dispatch under test: its real `build()` against PostgreSQL and the broker, a tenant of
its own with a key projected from `api_key.created`, contract events published straight onto
the services' topics, and a real webhook receiver."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from billstream_contracts import Envelope, EventData
from billstream_contracts.events import (
    ApiKeyCreated,
    CustomerCreated,
    InvoiceFinalized,
    InvoiceLine,
    InvoicePaid,
    InvoiceSnapshot,
    PaymentSucceeded,
)
from billstream_contracts.topics import (
    INVOICING_EVENTS,
    PAYMENTS_EVENTS,
    SUBSCRIPTION_EVENTS,
)
from billstream_messaging import ServiceHost
from billstream_runtime.auth import hash_key
from billstream_runtime.ids import new_id
from billstream_testing.events import envelope, publish
from billstream_testing.fixtures import service_env, unique
from billstream_testing.waiting import eventually
from billstream_testing.webhooks import WebhookReceiver
from billstream_webhook_dispatch.bootstrap import build
from billstream_webhook_dispatch.settings import WebhookDispatchSettings, settings_from_env

SOURCES = {SUBSCRIPTION_EVENTS: "subscription", INVOICING_EVENTS: "invoicing",
           PAYMENTS_EVENTS: "payments"}
TOPIC_OF = {"customer": SUBSCRIPTION_EVENTS, "tenant": SUBSCRIPTION_EVENTS,
            "api_key": SUBSCRIPTION_EVENTS, "invoice": INVOICING_EVENTS,
            "payment": PAYMENTS_EVENTS}

FAST = {  # retries in tens of milliseconds; the test receiver listens on loopback
    "allow_private_destinations": "true",
    "delivery_backoff_base_s": "0.02",
    "delivery_backoff_max_s": "0.5",
    "delivery_poll_interval_s": "0.2",
    "delivery_timeout_s": "5",
    "delivery_lease_s": "10",
}


def dispatch_settings(dsn: str, bootstrap: str, **extra: str) -> WebhookDispatchSettings:
    env = service_env("webhook_dispatch", dsn, bootstrap, **{
        "projection_wait_s": "0.3", "db_pool_max": "20", **FAST, **extra})
    return settings_from_env(env)


@dataclass
class Dispatch:
    host: ServiceHost
    bootstrap: str
    tenant_id: str
    key: str = ""

    def client(self, key: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.host.app, raise_app_exceptions=False),
            base_url="http://webhook-dispatch",
            headers={"Authorization": f"Bearer {key or self.key}"}, timeout=60,
        )

    # -- events ------------------------------------------------------------------------------
    def envelope(self, data: EventData | dict, *, environment: str = "test",
                 tenant_id: str | None = None, **kw: Any) -> Envelope:
        type_ = data.event_type if isinstance(data, EventData) else kw["type"]
        topic = TOPIC_OF.get(type_.split(".")[0], SUBSCRIPTION_EVENTS)
        return envelope(data, tenant_id=tenant_id or self.tenant_id, environment=environment,
                        source=SOURCES[topic], **kw)

    async def publish(self, *envelopes: Envelope) -> list[Envelope]:
        """Publish each envelope onto the topic of its source service."""
        for env in envelopes:
            await publish(self.bootstrap, f"billstream.{env.source}.events", env)
        return list(envelopes)

    async def add_key(self, kind: str = "secret", environment: str = "test",
                      tenant_id: str | None = None) -> str:
        prefix = {"secret": "sk", "publishable": "pk"}[kind]
        key = f"{prefix}_{environment}_{unique('k').replace('-', '')}"
        key_id = new_id("key")
        await self.publish(self.envelope(ApiKeyCreated(
            key_id=key_id, environment=environment, kind=kind, key_hash=hash_key(key),
            key_prefix=key[:12], created_at=datetime.now(UTC)), environment=environment,
            tenant_id=tenant_id))
        await self.wait_for_row("SELECT 1 FROM api_keys WHERE key_id = $1", key_id)
        return key

    async def wait_for_row(self, sql: str, *args) -> Any:
        return await eventually(lambda: self.host.pool.fetchval(sql, *args), message=sql)

    async def wait_stored(self, *event_ids: str) -> None:
        await eventually(
            lambda: _equals(self.host.pool.fetchval(
                "SELECT count(*) FROM events WHERE id = ANY($1::text[])", list(event_ids)),
                len(event_ids)),
            message=f"events {event_ids} stored")

    def consumed(self, outcome: str) -> float:
        consumer = self.host.consumers[0]
        return self.host.metrics.events_consumed.labels(consumer.name, outcome)._value.get()

    # -- API ---------------------------------------------------------------------------------
    async def create_endpoint(self, url: str, enabled_events: list[str] | None = None,
                              **extra: Any) -> dict:
        async with self.client() as c:
            r = await c.post("/v1/webhook_endpoints",
                             json={"url": url, "enabled_events": enabled_events or ["*"],
                                   **extra})
        assert r.status_code == 201, r.text
        return r.json()

    async def deliveries(self, **params: str) -> list[dict]:
        async with self.client() as c:
            r = await c.get("/v1/webhook_deliveries", params={"limit": 100, **params})
        assert r.status_code == 200, r.text
        return r.json()["data"]

    async def delivery(self, **params: str) -> dict:
        [found] = await self.deliveries(**params)
        return found


async def _equals(awaitable, expected) -> bool:
    return (await awaitable) == expected


@asynccontextmanager
async def running(dsn: str, bootstrap: str, **extra: str):
    host = build(dispatch_settings(dsn, bootstrap, **extra))
    await host.start(serve_http=False)
    try:
        svc = Dispatch(host, bootstrap, unique("ten"))
        svc.key = await svc.add_key()
        yield svc
    finally:
        await host.stop()


@pytest.fixture
async def dispatch(fresh_database, kafka_bootstrap):
    async with running(fresh_database, kafka_bootstrap) as svc:
        yield svc


@pytest.fixture
async def receiver():
    async with WebhookReceiver() as r:
        yield r


# ---------------------------------------------------------------- contract events


def customer_created() -> CustomerCreated:
    return CustomerCreated(customer_id=new_id("cus"), email="ada@example.com",
                           created_at=datetime.now(UTC))


def invoice(status: str = "open") -> InvoiceSnapshot:
    start, end = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)
    return InvoiceSnapshot(
        invoice_id=new_id("inv"), number="INV-0001", customer_id=new_id("cus"),
        subscription_id=new_id("sub"), currency="USD", status=status,
        lines=[InvoiceLine(line_id=new_id("il"), type="fixed", description="Pro plan",
                           charge_id="chg_1", quantity="1", unit_price="12.00", amount=1200,
                           period_start=start, period_end=end)],
        subtotal=1200, total=1200, amount_due=1200 if status == "open" else 0,
        amount_paid=1200 if status == "paid" else 0, period_start=start, period_end=end,
        issued_at=end, paid_at=end if status == "paid" else None,
    )


def invoice_paid() -> InvoicePaid:
    return InvoicePaid(invoice=invoice("paid"), payment_id=new_id("pay"))


def invoice_finalized() -> InvoiceFinalized:
    return InvoiceFinalized(invoice=invoice("open"))


def payment_succeeded() -> PaymentSucceeded:
    return PaymentSucceeded(payment_id=new_id("pay"), invoice_id=new_id("inv"),
                            customer_id=new_id("cus"), amount=1200, currency="USD",
                            payment_method_id=new_id("pm"), created_at=datetime.now(UTC))
