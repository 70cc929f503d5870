"""The README walkthrough as code: each step is one public API call, as an integrator makes it."""

from __future__ import annotations

import uuid
from decimal import Decimal

import httpx

from billstream_testing.waiting import eventually


class Api:
    def __init__(self, base_url: str, secret_key: str) -> None:
        self.http = httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {secret_key}"}, timeout=30.0,
            trust_env=False,
        )

    async def post(self, path: str, body: dict, *, expect: int | tuple[int, ...] = (200, 201),
                   idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        response = await self.http.post(path, json=body, headers=headers)
        expected = (expect,) if isinstance(expect, int) else expect
        assert response.status_code in expected, (path, response.status_code, response.text)
        return response.json()

    async def get(self, path: str, **params) -> dict:
        response = await self.http.get(path, params=params)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    async def aclose(self) -> None:
        await self.http.aclose()


async def setup_customer(api: Api, receiver_url: str, external_id: str = "acme-1") -> dict:
    """Steps 1–7: clock, webhook endpoint, customer, card, meter, plan, subscription."""
    clock = await api.post("/v1/test_clocks", {"frozen_time": "2026-01-01T00:00:00Z"})
    assert clock["id"].startswith("clk_")
    endpoint = await api.post("/v1/webhook_endpoints",
                              {"url": receiver_url, "enabled_events": ["*"]})
    assert endpoint["secret"].startswith("whsec_")
    customer = await api.post("/v1/customers", {
        "external_id": external_id, "name": "Acme", "email": "billing@acme.test",
        "currency": "USD", "test_clock": clock["id"]})
    assert customer["id"].startswith("cus_")
    pm = await api.post(f"/v1/customers/{customer['id']}/payment_methods", {"token": "tok_visa"})
    assert pm["id"].startswith("pm_")
    await api.post("/v1/meters", {"code": "api_calls", "aggregation": "sum"}, expect=(200, 201, 409))
    await api.post("/v1/plans", {
        "code": "pro", "name": "Pro", "currency": "USD", "interval": "month",
        "charges": [{"type": "fixed", "amount": "49.00", "timing": "in_advance"},
                    {"type": "usage", "meter": "api_calls", "model": "per_unit",
                     "unit_price": "0.002"}]}, expect=(200, 201, 409))
    sub = await api.post("/v1/subscriptions", {"customer": customer["id"], "plan": "pro"})
    assert sub["status"] == "active"
    assert sub["current_period_start"].startswith("2026-01-01")
    assert sub["current_period_end"].startswith("2026-02-01")
    return {"clock": clock, "endpoint": endpoint, "customer": customer, "subscription": sub}


async def paid_invoices(api: Api, customer_id: str, count: int, timeout: float = 60) -> list[dict]:
    async def probe():
        listing = await api.get("/v1/invoices", customer=customer_id)
        invoices = listing["data"]
        if len(invoices) == count and all(i["status"] == "paid" for i in invoices):
            return invoices
        return None

    return await eventually(probe, timeout=timeout, interval=0.2,
                            message=f"{count} paid invoices for {customer_id}")


def usage_events(external_id: str, n: int, prefix: str = "jan") -> list[dict]:
    """n distinct events dated in January (spread over the month)."""
    return [
        {"idempotency_key": f"{prefix}-{i}", "customer": external_id, "meter": "api_calls",
         "quantity": 1, "timestamp": f"2026-01-{1 + i % 30:02d}T{i % 24:02d}:00:00Z",
         "properties": {"endpoint": "/search", "n": i}}
        for i in range(n)
    ]


async def send_usage(api: Api, events: list[dict], batch: int = 500) -> dict[str, int]:
    totals = {"accepted": 0, "duplicates": 0, "rejected": 0}
    for i in range(0, len(events), batch):
        result = await api.post("/v1/usage/events", {"events": events[i:i + batch]}, expect=200)
        assert len(result["results"]) == len(events[i:i + batch])
        for key in totals:
            totals[key] += result[key]
    return totals


async def usage_total(api: Api, external_id: str) -> Decimal:
    result = await api.get("/v1/usage", customer=external_id, meter="api_calls",
                           **{"from": "2026-01-01T00:00:00Z", "to": "2026-02-01T00:00:00Z"})
    return Decimal(result["value"])


async def wait_usage(api: Api, external_id: str, expected: int, timeout: float = 60) -> None:
    async def probe():
        return await usage_total(api, external_id) == expected

    await eventually(probe, timeout=timeout, interval=0.2,
                     message=f"usage of {external_id} to reach {expected}")
