"""The public API of webhook_dispatch: endpoints (validation, secret shown once, scoping,
disable), the event log (newest first, pagination, type filter, tenant+environment scope),
deliveries."""

from __future__ import annotations

import pytest

from billstream_contracts.events import TenantCreated
from billstream_testing.fixtures import unique
from billstream_testing.waiting import eventually
from billstream_testing.webhooks import WebhookReceiver

from webhook_dispatch_harness import (  # noqa: F401
    Dispatch,
    customer_created,
    dispatch,
    invoice_finalized,
    invoice_paid,
    payment_succeeded,
    receiver,
)

pytestmark = pytest.mark.integration


async def test_endpoints_are_validated_scoped_and_show_their_secret_once(dispatch: Dispatch):
    async with dispatch.client() as c:
        r = await c.post("/v1/webhook_endpoints", json={
            "url": "http://127.0.0.1:9999/hook", "enabled_events": ["invoice.paid"],
            "description": "billing sync"})
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["id"].startswith("we_") and created["object"] == "webhook_endpoint"
        assert created["secret"].startswith("whsec_")
        assert (created["url"], created["enabled_events"], created["status"],
                created["description"], created["livemode"]) == (
            "http://127.0.0.1:9999/hook", ["invoice.paid"], "enabled", "billing sync", False)
        assert created["created"].endswith("Z")

        r = await c.get(f"/v1/webhook_endpoints/{created['id']}")
        assert r.status_code == 200 and "secret" not in r.json()
        assert r.json() == {k: v for k, v in created.items() if k != "secret"}

        second = (await c.post("/v1/webhook_endpoints", json={
            "url": "https://example.com/h", "enabled_events": ["*"]})).json()
        listed = (await c.get("/v1/webhook_endpoints")).json()
        assert [e["id"] for e in listed["data"]] == [second["id"], created["id"]]
        assert listed["object"] == "list" and listed["has_more"] is False
        assert all("secret" not in e for e in listed["data"])
        page1 = (await c.get("/v1/webhook_endpoints", params={"limit": 1})).json()
        assert [e["id"] for e in page1["data"]] == [second["id"]] and page1["has_more"]
        page2 = (await c.get("/v1/webhook_endpoints",
                             params={"limit": 1, "starting_after": second["id"]})).json()
        assert [e["id"] for e in page2["data"]] == [created["id"]] and not page2["has_more"]

        for body, param, code in [
            ({"url": "http://x.test/h", "enabled_events": ["invoice.teleported"]},
             "enabled_events", "parameter_invalid"),
            ({"url": "http://x.test/h", "enabled_events": ["api_key.created"]},
             "enabled_events", "parameter_invalid"),
            ({"url": "http://x.test/h", "enabled_events": []}, "enabled_events",
             "parameter_invalid"),
            ({"url": "http://x.test/h"}, "enabled_events", "parameter_missing"),
            ({"url": "ftp://x.test/h", "enabled_events": ["*"]}, "url", "url_invalid"),
            ({"url": "x.test/h", "enabled_events": ["*"]}, "url", "url_invalid"),
            ({"url": "http://x.test/h", "enabled_events": ["*"], "colour": "red"}, "colour",
             "parameter_invalid"),
        ]:
            r = await c.post("/v1/webhook_endpoints", json=body)
            assert r.status_code == 400, (body, r.text)
            assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code), body

    publishable = await dispatch.add_key(kind="publishable")
    other = await dispatch.add_key(tenant_id=unique("ten"))
    live = await dispatch.add_key(environment="live")
    async with dispatch.client(publishable) as c:
        assert (await c.get("/v1/webhook_endpoints")).status_code == 403
    for key in (other, live):
        async with dispatch.client(key) as c:
            r = await c.get(f"/v1/webhook_endpoints/{created['id']}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "resource_missing"
            assert (await c.get("/v1/webhook_endpoints")).json()["data"] == []
            assert (await c.delete(f"/v1/webhook_endpoints/{created['id']}")).status_code == 404
    async with dispatch.client(live) as c:
        r = await c.post("/v1/webhook_endpoints", json={
            "url": "https://example.com/live", "enabled_events": ["*"]})
        assert r.status_code == 201 and r.json()["livemode"] is True


async def test_disabling_an_endpoint_cancels_its_pending_deliveries(dispatch: Dispatch):
    async with WebhookReceiver(fail_first=10**6) as failing:
        endpoint = await dispatch.create_endpoint(failing.url)
        [env] = await dispatch.publish(dispatch.envelope(invoice_paid()))
        await failing.wait_for(lambda r: len(r) >= 2)  # it is being retried
        async with dispatch.client() as c:
            r = await c.delete(f"/v1/webhook_endpoints/{endpoint['id']}")
            assert r.status_code == 200 and r.json()["status"] == "disabled"
            assert (await c.delete(f"/v1/webhook_endpoints/{endpoint['id']}")).status_code == 200
            got = (await c.get(f"/v1/webhook_endpoints/{endpoint['id']}")).json()
            assert got["status"] == "disabled"

            async def canceled():
                [d] = await dispatch.deliveries(event=env.id)
                return d if d["status"] == "canceled" else None

            delivery = await eventually(canceled)
            assert delivery["next_attempt_at"] is None
            sent = len(failing.requests)
            r = await c.post(f"/v1/webhook_deliveries/{delivery['id']}/retry")
            assert r.status_code == 400 and r.json()["error"]["code"] == "endpoint_disabled"
            r = await c.post(f"/v1/webhook_endpoints/{endpoint['id']}/replay",
                             json={"since": "2020-01-01T00:00:00Z"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "endpoint_disabled"

        # New events create no deliveries for it.
        [later] = await dispatch.publish(dispatch.envelope(invoice_paid()))
        await dispatch.wait_stored(later.id)
        assert await dispatch.deliveries(event=later.id) == []
        assert len(failing.requests) == sent


async def test_event_log_is_newest_first_paginated_filtered_and_scoped(dispatch: Dispatch):
    live_key = await dispatch.add_key(environment="live")
    mine = await dispatch.publish(
        dispatch.envelope(customer_created()), dispatch.envelope(invoice_finalized()),
        dispatch.envelope(invoice_paid()), dispatch.envelope(payment_succeeded()),
        dispatch.envelope(invoice_paid()))
    live = dispatch.envelope(invoice_paid(), environment="live")
    foreign = dispatch.envelope(invoice_paid(), tenant_id=unique("ten"))
    private = dispatch.envelope(TenantCreated(tenant_id=dispatch.tenant_id, name="Acme"))
    await dispatch.publish(live, foreign, private)
    await dispatch.wait_stored(*[e.id for e in mine], live.id, foreign.id)

    newest_first = sorted((e.id for e in mine), reverse=True)
    async with dispatch.client() as c:
        everything = (await c.get("/v1/events", params={"limit": 100})).json()
        assert [e["id"] for e in everything["data"]] == newest_first
        assert everything["object"] == "list" and not everything["has_more"]
        first = (await c.get("/v1/events", params={"limit": 2})).json()
        assert [e["id"] for e in first["data"]] == newest_first[:2] and first["has_more"]
        rest = (await c.get("/v1/events", params={"limit": 10,
                                                  "starting_after": newest_first[1]})).json()
        assert [e["id"] for e in rest["data"]] == newest_first[2:] and not rest["has_more"]
        paid = (await c.get("/v1/events", params={"type": "invoice.paid"})).json()
        assert [e["id"] for e in paid["data"]] == sorted(
            (e.id for e in mine if e.type == "invoice.paid"), reverse=True)
        assert (await c.get("/v1/events", params={"type": "tenant.created"})).json()["data"] == []

        one = (await c.get(f"/v1/events/{mine[0].id}")).json()
        assert one["id"] == mine[0].id and one["type"] == "customer.created"
        assert one["data"]["email"] == "ada@example.com" and one["livemode"] is False
        for hidden in (live.id, foreign.id, private.id, "evt_nope"):
            r = await c.get(f"/v1/events/{hidden}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "resource_missing"
        assert (await c.get("/v1/events", params={"limit": 101})).status_code == 400
    async with dispatch.client(live_key) as c:
        listed = (await c.get("/v1/events")).json()["data"]
        assert [e["id"] for e in listed] == [live.id] and listed[0]["livemode"] is True


async def test_deliveries_api(dispatch: Dispatch, receiver: WebhookReceiver):
    a = await dispatch.create_endpoint(receiver.url_for("/a"))
    b = await dispatch.create_endpoint(receiver.url_for("/b"), ["invoice.paid"])
    e1, e2 = await dispatch.publish(dispatch.envelope(invoice_paid()),
                                    dispatch.envelope(customer_created()))
    await receiver.wait_for(lambda r: len(r) == 3)

    async def all_delivered():
        found = await dispatch.deliveries()
        return found if len(found) == 3 and {d["status"] for d in found} == {"delivered"} else None

    found = await eventually(all_delivered)
    assert [d["id"] for d in found] == sorted((d["id"] for d in found), reverse=True)
    d = (await dispatch.deliveries(endpoint=b["id"]))[0]
    assert (d["object"], d["endpoint"], d["event"], d["event_type"]) == (
        "webhook_delivery", b["id"], e1.id, "invoice.paid")
    assert d["id"].startswith("wd_") and d["livemode"] is False and d["created"].endswith("Z")
    assert {x["endpoint"] for x in await dispatch.deliveries(event=e1.id)} == {a["id"], b["id"]}
    assert [x["event"] for x in await dispatch.deliveries(endpoint=a["id"], event=e2.id)] == [
        e2.id]
    assert len(await dispatch.deliveries(status="delivered")) == 3
    assert await dispatch.deliveries(status="failed") == []
    async with dispatch.client() as c:
        assert (await c.get(f"/v1/webhook_deliveries/{d['id']}")).json() == d
        assert (await c.get("/v1/webhook_deliveries/wd_nope")).status_code == 404
        assert (await c.post("/v1/webhook_deliveries/wd_nope/retry")).status_code == 404
        assert (await c.get("/v1/webhook_deliveries/wd_nope/attempts")).status_code == 404
        r = await c.get("/v1/webhook_deliveries", params={"status": "lost"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "status"
        attempts = (await c.get(f"/v1/webhook_deliveries/{d['id']}/attempts")).json()["data"]
        assert [(x["attempt"], x["status_code"], x["succeeded"]) for x in attempts] == [
            (1, 200, True)]
        assert attempts[0]["response_body"] == '{"received": true}'
    other = await dispatch.add_key(tenant_id=unique("ten"))
    async with dispatch.client(other) as c:
        assert (await c.get("/v1/webhook_deliveries")).json()["data"] == []
        assert (await c.get(f"/v1/webhook_deliveries/{d['id']}")).status_code == 404
        assert (await c.post(f"/v1/webhook_deliveries/{d['id']}/retry")).status_code == 404
