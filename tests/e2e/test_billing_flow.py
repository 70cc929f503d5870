"""Issue #2 §5: one real flow through all six services, exactly as the README walks it."""

from __future__ import annotations

import orjson
import pytest

from billstream_testing.webhooks import WebhookReceiver
from flow import Api, paid_invoices, send_usage, setup_customer, usage_events, wait_usage

pytestmark = pytest.mark.e2e


async def test_one_billing_flow_through_all_six_services(platform):
    stack, dev = platform
    api = Api(stack.base_url, dev["test_secret_key"])
    async with WebhookReceiver() as receiver:
        objs = await setup_customer(api, receiver.url)
        customer_id = objs["customer"]["id"]

        # 7. The first invoice: January's fixed fee, finalized and paid by the sandbox gateway.
        [first] = await paid_invoices(api, customer_id, 1)
        assert first["total"] == 4900 and first["currency"] == "USD"

        # 8. Move to the end of January.
        clock_id = objs["clock"]["id"]
        await api.post(f"/v1/test_clocks/{clock_id}/advance",
                       {"frozen_time": "2026-01-31T00:00:00Z"})

        # 9. 1,500 distinct events dated in January, 300 of them sent twice.
        events = usage_events("acme-1", 1500)
        totals = await send_usage(api, events + events[:300])
        assert totals == {"accepted": 1500, "duplicates": 300, "rejected": 0}
        bad = await api.post("/v1/usage/events", {"events": [
            {"idempotency_key": "bad-1", "customer": "acme-1", "meter": "nope", "quantity": 1},
            {"idempotency_key": "jan-0", "customer": "acme-1", "meter": "api_calls",
             "quantity": 5, "timestamp": "2026-01-05T00:00:00Z"},
        ]}, expect=200)
        assert [r["status"] for r in bad["results"]] == ["rejected", "rejected"]
        assert bad["results"][0]["code"] == "unknown_meter"
        assert bad["results"][1]["code"] == "idempotency_key_conflict"

        # 10. Usage for January is exactly 1500.
        await wait_usage(api, "acme-1", 1500)

        # 11. Past the period end: January's usage + February's fee = 52.00, paid.
        await api.post(f"/v1/test_clocks/{clock_id}/advance",
                       {"frozen_time": "2026-02-02T00:00:00Z"})
        invoices = await paid_invoices(api, customer_id, 2)
        assert sorted(i["total"] for i in invoices) == [4900, 5200]
        second = next(i for i in invoices if i["total"] == 5200)
        assert second["currency"] == "USD" and second["status"] == "paid"
        amounts = sorted(line["amount"] for line in second["lines"])
        assert amounts == [300, 4900]
        listing = await api.get("/v1/invoices", customer=customer_id)
        assert listing["has_more"] is False

        # 12. invoice.paid twice among the other events, each signed (Standard Webhooks).
        def two_paid(requests):
            return [r for r in requests if orjson.loads(r.body)["type"] == "invoice.paid"]

        paid = await receiver.wait_for(lambda reqs: len(two_paid(reqs)) >= 2, timeout=60)
        paid = two_paid(paid)
        assert len(paid) == 2
        secret = objs["endpoint"]["secret"]
        verified = receiver.verify(secret)  # standardwebhooks: raises on a bad signature
        assert len(verified) == len(receiver.requests)
        with pytest.raises(Exception):
            receiver.verify("whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB")  # another secret fails
        assert all(r.headers["webhook-id"] == orjson.loads(r.body)["id"] for r in paid)
        types = {orjson.loads(r.body)["type"] for r in receiver.requests}
        assert {"customer.created", "subscription.created", "invoice.finalized",
                "payment.succeeded", "subscription.renewed"} <= types
        paid_totals = sorted(orjson.loads(r.body)["data"]["invoice"]["total"] for r in paid)
        assert paid_totals == [4900, 5200]
    await api.aclose()


async def test_usage_acknowledged_before_a_period_closes_is_billed_in_that_period(platform):
    """No waiting between the last usage answer and the clock advance: whatever ingestion
    acknowledged before the period closed is on that period's invoice."""
    stack, dev = platform
    api = Api(stack.base_url, dev["test_secret_key"])
    async with WebhookReceiver() as receiver:
        objs = await setup_customer(api, receiver.url, external_id="rush-1")
        customer_id, clock_id = objs["customer"]["id"], objs["clock"]["id"]
        await paid_invoices(api, customer_id, 1)
        await api.post(f"/v1/test_clocks/{clock_id}/advance",
                       {"frozen_time": "2026-01-31T00:00:00Z"})
        totals = await send_usage(api, usage_events("rush-1", 2500, prefix="rush"), batch=1000)
        assert totals["accepted"] == 2500
        await api.post(f"/v1/test_clocks/{clock_id}/advance",
                       {"frozen_time": "2026-02-02T00:00:00Z"})
        invoices = await paid_invoices(api, customer_id, 2)
        assert sorted(i["total"] for i in invoices) == [4900, 5400]  # 49.00 + 2500 × 0.002
    await api.aclose()
