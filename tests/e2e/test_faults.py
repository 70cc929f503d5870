"""Fault tests: processes killed mid-stream, the broker restarted empty. The money must still
add up exactly: nothing lost, nothing counted twice."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import orjson
import pytest

from billstream_testing.waiting import eventually
from billstream_testing.webhooks import WebhookReceiver
from conftest import start_stack
from flow import (
    Api, paid_invoices, send_usage, setup_customer, usage_events, usage_total, wait_usage,
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


async def test_metering_killed_mid_stream_counts_every_event_once(tmp_path):
    stack, dev = start_stack(tmp_path)
    api = Api(stack.base_url, dev["test_secret_key"])
    try:
        async with WebhookReceiver() as receiver:
            objs = await setup_customer(api, receiver.url, external_id="kill-1")
            await api.post(f"/v1/test_clocks/{objs['clock']['id']}/advance",
                           {"frozen_time": "2026-01-31T00:00:00Z"})
            events = usage_events("kill-1", 12_000, prefix="k")
            first, second = events[:8000], events[8000:]
            assert (await send_usage(api, first, batch=1000))["accepted"] == 8000

            # kill -9 metering while it is part-way through consuming the stream
            async def partway():
                value = await usage_total(api, "kill-1")
                return 0 < value < 8000

            await eventually(partway, timeout=60, interval=0.02,
                             message="metering part-way through the stream")
            stack.kill_service("metering")
            assert stack.exited().get("metering") is not None

            # the stream goes on (and producers retry: everything is sent twice)
            assert (await send_usage(api, second, batch=1000))["accepted"] == 4000
            again = await send_usage(api, events, batch=1000)
            assert again == {"accepted": 0, "duplicates": 12_000, "rejected": 0}

            stack.start_service("metering")
            await wait_usage(api, "kill-1", 12_000, timeout=120)
            # and it stays exact once metering has caught up with everything
            db = await asyncpg.connect(stack.database_url("metering"))
            try:
                rows = await db.fetchval("SELECT count(*) FROM usage_records")
                assert rows == 12_000
            finally:
                await db.close()
            assert await usage_total(api, "kill-1") == Decimal(12_000)
    finally:
        await api.aclose()
        stack.stop()


async def _republished(stack, services) -> bool:
    for service in services:
        db = await asyncpg.connect(stack.database_url(service))
        try:
            state = await db.fetchrow("SELECT * FROM relay_state WHERE id = 1")
            head = await db.fetchval("SELECT last_seq FROM event_log_head WHERE id = 1")
        finally:
            await db.close()
        if state["republish_count"] < 1 or state["published_seq"] < head:
            return False
    return True


async def test_broker_restarted_empty_converges_to_the_same_invoices(tmp_path):
    stack, dev = start_stack(tmp_path)
    api = Api(stack.base_url, dev["test_secret_key"])
    try:
        async with WebhookReceiver() as receiver:
            objs = await setup_customer(api, receiver.url, external_id="broker-1")
            customer_id, clock_id = objs["customer"]["id"], objs["clock"]["id"]
            await paid_invoices(api, customer_id, 1)
            await api.post(f"/v1/test_clocks/{clock_id}/advance",
                           {"frozen_time": "2026-01-31T00:00:00Z"})
            events = usage_events("broker-1", 1500, prefix="b")
            assert (await send_usage(api, events[:1000]))["accepted"] == 1000

            # The broker loses everything: topics, offsets, consumer groups.
            stack.restart_broker_empty()

            # Usage keeps flowing; the relays notice and republish their logs.
            assert (await send_usage(api, events[1000:]))["accepted"] == 500
            await wait_usage(api, "broker-1", 1500, timeout=120)
            await api.post(f"/v1/test_clocks/{clock_id}/advance",
                           {"frozen_time": "2026-02-02T00:00:00Z"})
            invoices = await paid_invoices(api, customer_id, 2, timeout=120)
            assert sorted(i["total"] for i in invoices) == [4900, 5200]

            services = ["subscription", "ingestion", "metering", "invoicing", "payments"]

            async def all_republished():
                return await _republished(stack, services)

            await eventually(all_republished, timeout=120, interval=0.5,
                             message="every relay republished its log")
            # Every consumer has now seen the whole history again: still the same state.
            await _settle(api, customer_id)
            invoices = (await api.get("/v1/invoices", customer=customer_id))["data"]
            assert sorted(i["total"] for i in invoices) == [4900, 5200]
            assert all(i["status"] == "paid" for i in invoices)
            assert await usage_total(api, "broker-1") == Decimal(1500)
            payments = (await api.get("/v1/payments", customer=customer_id))["data"]
            assert sorted(p["amount"] for p in payments) == [4900, 5200]
            ids = [orjson.loads(r.body)["id"] for r in receiver.requests]
            assert len(ids) == len(set(ids)), "no webhook event delivered twice"
    finally:
        await api.aclose()
        stack.stop()


async def _settle(api: Api, customer_id: str) -> None:
    """Wait until the invoice list reads the same five times in a row (consumers idle)."""
    seen = {"previous": None, "stable": 0}

    async def stable() -> bool:
        current = orjson.dumps((await api.get("/v1/invoices", customer=customer_id))["data"])
        seen["stable"] = seen["stable"] + 1 if current == seen["previous"] else 0
        seen["previous"] = current
        return seen["stable"] >= 5

    await eventually(stable, timeout=30, interval=0.1, message="invoices stable")
