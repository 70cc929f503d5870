"""PostgreSQL restarted in the middle of a usage stream: every service reconnects, usage is
exact and billing still comes out right."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import httpx
import pytest

from billstream_testing.webhooks import WebhookReceiver
from conftest import start_stack
from flow import (
    Api, paid_invoices, send_usage, setup_customer, usage_events, usage_total, wait_usage,
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


async def _postmaster_start(stack):
    conn = await asyncpg.connect(stack.server_database_url)
    try:
        return await conn.fetchval("SELECT pg_postmaster_start_time()")
    finally:
        await conn.close()


async def _send_until_accepted(api: Api, events: list[dict]) -> None:
    """A producer that retries until every event has an answer (accepted or duplicate)."""
    from billstream_testing.waiting import eventually

    async def sent():
        try:
            response = await api.http.post("/v1/usage/events", json={"events": events})
        except httpx.TransportError:
            return False
        if response.status_code != 200:
            return False
        body = response.json()
        return body["accepted"] + body["duplicates"] == len(events)

    await eventually(sent, timeout=120, interval=0.5, message="batch accepted after the restart")


async def test_postgres_restarted_mid_stream(tmp_path):
    stack, dev = start_stack(tmp_path)
    api = Api(stack.base_url, dev["test_secret_key"])
    try:
        async with WebhookReceiver() as receiver:
            objs = await setup_customer(api, receiver.url, external_id="pg-1")
            customer_id, clock_id = objs["customer"]["id"], objs["clock"]["id"]
            await paid_invoices(api, customer_id, 1)
            await api.post(f"/v1/test_clocks/{clock_id}/advance",
                           {"frozen_time": "2026-01-31T00:00:00Z"})
            events = usage_events("pg-1", 3000, prefix="pg")
            assert (await send_usage(api, events[:1500], batch=500))["accepted"] == 1500
            started_before = await _postmaster_start(stack)
            stack.postgres.stop()
            stack.postgres.start()
            assert await _postmaster_start(stack) > started_before  # really a new server
            for i in range(1500, 3000, 500):
                await _send_until_accepted(api, events[i:i + 500])
            await _send_until_accepted(api, events[:500])  # a retrying producer resends
            await wait_usage(api, "pg-1", 3000, timeout=120)
            await api.post(f"/v1/test_clocks/{clock_id}/advance",
                           {"frozen_time": "2026-02-02T00:00:00Z"})
            invoices = await paid_invoices(api, customer_id, 2, timeout=120)
            assert sorted(i["total"] for i in invoices) == [4900, 5500]
            assert await usage_total(api, "pg-1") == Decimal(3000)
    finally:
        await api.aclose()
        stack.stop()
