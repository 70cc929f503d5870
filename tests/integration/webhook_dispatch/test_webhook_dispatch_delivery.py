"""Webhook delivery against real PostgreSQL, broker and an HTTP receiver: fan-out, filtering,
signatures (checked by `standardwebhooks`), retries with backoff, manual retry and replay,
redelivery and rebuild without duplicates, recovery of a crashed worker's lease."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from billstream_contracts.events import TenantCreated
from billstream_testing.fixtures import unique
from billstream_testing.waiting import eventually
from billstream_testing.webhooks import WebhookReceiver, delivered
from billstream_webhook_dispatch.bootstrap import build
from billstream_webhook_dispatch.service import dispatch_metrics, record_public_event

from webhook_dispatch_harness import (  # noqa: F401
    Dispatch,
    customer_created,
    dispatch,
    dispatch_settings,
    invoice_finalized,
    invoice_paid,
    payment_succeeded,
    receiver,
    running,
)

pytestmark = pytest.mark.integration


async def test_star_endpoint_gets_each_public_event_once_signed(dispatch: Dispatch,
                                                                 receiver: WebhookReceiver):
    endpoint = await dispatch.create_endpoint(receiver.url, ["*"])
    public = [dispatch.envelope(customer_created()), dispatch.envelope(invoice_paid()),
              dispatch.envelope(payment_succeeded())]
    skipped = [
        dispatch.envelope(TenantCreated(tenant_id=dispatch.tenant_id, name="Acme")),
        dispatch.envelope({"x": 1}, type="widget.frobbed"),          # unknown type
        dispatch.envelope({"x": 1}, type="invoice.paid", version=99),  # unknown version
    ]
    other_tenant = dispatch.envelope(invoice_paid(), tenant_id=unique("ten"))
    live = dispatch.envelope(invoice_paid(), environment="live")
    unknown_before = dispatch.consumed("unknown_type")
    await dispatch.publish(*skipped, other_tenant, live, *public)
    # api_key.created (non-public) goes through the same topic: a second key.
    await dispatch.add_key()

    reqs = await receiver.wait_for(lambda r: len(r) >= 3)
    bodies = receiver.verify(endpoint["secret"])  # standardwebhooks verifies every request
    assert sorted(b["id"] for b in bodies) == sorted(e.id for e in public)
    for req in reqs:
        assert req.webhook_id == req.json()["id"]
        assert req.headers["content-type"] == "application/json"
        assert req.path == "/hook"

    # Everything published has been consumed: nothing else is, or will be, delivered.
    await dispatch.wait_stored(other_tenant.id, live.id)
    await eventually(lambda: _ge(dispatch.consumed("unknown_type"), unknown_before + 2))
    not_public = dispatch_metrics(dispatch.host.metrics).public_events.labels("not_public")
    await eventually(lambda: _ge(not_public._value.get(), 1))
    deliveries = await eventually(lambda: _settled(dispatch, 3))
    assert sorted(d["event"] for d in deliveries) == sorted(e.id for e in public)
    assert {d["status"] for d in deliveries} == {"delivered"}
    assert all(d["attempts"] == 1 and d["last_status_code"] == 200 for d in deliveries)
    stored = await dispatch.host.pool.fetch(
        "SELECT id, type FROM events WHERE tenant_id = $1", dispatch.tenant_id)
    assert {r["id"] for r in stored} == {e.id for e in public} | {live.id}
    assert len(receiver.requests) == 3

    # The webhook carries exactly what GET /v1/events/{id} returns.
    paid = next(r for r in reqs if r.json()["type"] == "invoice.paid")
    async with dispatch.client() as c:
        got = await c.get(f"/v1/events/{paid.webhook_id}")
    assert got.status_code == 200 and got.json() == paid.json()
    event = paid.json()
    assert set(event) == {"id", "object", "type", "version", "created", "occurred_at",
                          "livemode", "data"}
    assert (event["object"], event["version"], event["livemode"]) == ("event", 1, False)
    assert event["created"].endswith("Z") and event["occurred_at"].endswith("Z")
    assert event["data"]["invoice"]["total"] == 1200


async def test_filtered_endpoint_gets_only_its_types(dispatch: Dispatch,
                                                     receiver: WebhookReceiver):
    paid_only = await dispatch.create_endpoint(receiver.url_for("/paid"), ["invoice.paid"])
    everything = await dispatch.create_endpoint(receiver.url_for("/all"), ["*"])
    envs = await dispatch.publish(dispatch.envelope(invoice_finalized()),
                                  dispatch.envelope(invoice_paid()),
                                  dispatch.envelope(customer_created()),
                                  dispatch.envelope(invoice_paid()))
    reqs = await receiver.wait_for(
        lambda r: len([x for x in r if x.path == "/all"]) == 4
        and len([x for x in r if x.path == "/paid"]) == 2)
    paid_ids = sorted(e.id for e in envs if e.type == "invoice.paid")
    assert sorted(r.webhook_id for r in reqs if r.path == "/paid") == paid_ids
    receiver.verify(paid_only["secret"], [r for r in reqs if r.path == "/paid"])
    receiver.verify(everything["secret"], [r for r in reqs if r.path == "/all"])
    assert sorted(d["event"] for d in await dispatch.deliveries(endpoint=paid_only["id"])) == \
        paid_ids
    assert len(await dispatch.deliveries(endpoint=everything["id"])) == 4


async def test_redelivered_events_do_not_create_second_deliveries(dispatch: Dispatch,
                                                                  receiver: WebhookReceiver):
    await dispatch.create_endpoint(receiver.url)
    env = dispatch.envelope(invoice_paid())
    await dispatch.publish(env, env)
    await receiver.wait_for(lambda r: len(r) == 1)
    await dispatch.publish(env)  # once more, after it was delivered
    marker = (await dispatch.publish(dispatch.envelope(invoice_paid())))[0]
    await receiver.wait_for(lambda r: any(x.webhook_id == marker.id for x in r))
    await eventually(lambda: _ge(dispatch.consumed("duplicate"), 2),
                     message="both redeliveries seen by the consumer")
    # Even past the consumer's inbox (a rebuild, or the event reaching us twice), the
    # (endpoint, event) key holds.
    async with dispatch.host.pool.acquire() as conn, conn.transaction():
        assert await record_public_event(conn, env) == 0
    assert len(await dispatch.deliveries(event=env.id)) == 1
    assert [r.webhook_id for r in receiver.requests].count(env.id) == 1


async def test_failing_receiver_gets_the_event_on_the_third_attempt(dispatch: Dispatch):
    async with WebhookReceiver(fail_first=2) as receiver:
        endpoint = await dispatch.create_endpoint(receiver.url)
        [env] = await dispatch.publish(dispatch.envelope(invoice_paid()))
        reqs = await receiver.wait_for(lambda r: len(delivered(r)) == 1)
        assert [r.status for r in reqs] == [500, 500, 200]
        assert {r.webhook_id for r in reqs} == {env.id}  # the same id on every attempt
        receiver.verify(endpoint["secret"])  # each attempt signed with its own timestamp
        assert len({r.body for r in reqs}) == 1  # the same bytes every time

        delivery = await eventually(lambda: _delivered(dispatch, env.id))
        assert delivery["attempts"] == 3 and delivery["last_status_code"] == 200
        assert delivery["next_attempt_at"] is None and delivery["delivered_at"]
        async with dispatch.client() as c:
            attempts = (await c.get(f"/v1/webhook_deliveries/{delivery['id']}/attempts")).json()
        listed = [(a["attempt"], a["status_code"], a["succeeded"], a["error"])
                  for a in attempts["data"]]
        assert listed == [(3, 200, True, None), (2, 500, False, "HTTP 500"),
                          (1, 500, False, "HTTP 500")]
        assert all(a["duration_ms"] >= 0 and a["finished_at"] for a in attempts["data"])


async def test_exhausted_retries_fail_and_manual_retry_resends(fresh_database, kafka_bootstrap):
    async with running(fresh_database, kafka_bootstrap, delivery_max_attempts="3") as dispatch, \
            WebhookReceiver(fail_first=1000) as receiver:
        endpoint = await dispatch.create_endpoint(receiver.url)
        [env] = await dispatch.publish(dispatch.envelope(invoice_paid()))
        failed = await eventually(lambda: _status(dispatch, env.id, "failed"))
        assert failed["attempts"] == 3 and failed["last_status_code"] == 500
        assert failed["next_attempt_at"] is None and failed["last_error"] == "HTTP 500"
        assert len(receiver.requests) == 3

        receiver.fail_next(0)
        async with dispatch.client() as c:
            r = await c.post(f"/v1/webhook_deliveries/{failed['id']}/retry")
        assert r.status_code == 200 and r.json()["status"] in ("pending", "sending",
                                                               "delivered")
        await receiver.wait_for(lambda reqs: len(delivered(reqs)) == 1)
        done = await eventually(lambda: _delivered(dispatch, env.id))
        assert done["attempts"] == 4

        # A delivered delivery may be retried too (a replay of one event).
        async with dispatch.client() as c:
            r = await c.post(f"/v1/webhook_deliveries/{failed['id']}/retry")
        assert r.status_code == 200
        reqs = await receiver.wait_for(lambda reqs: len(delivered(reqs)) == 2)
        assert [x.webhook_id for x in delivered(reqs)] == [env.id, env.id]
        receiver.verify(endpoint["secret"], delivered(reqs))
        await eventually(lambda: _attempts(dispatch, env.id, 5))


async def test_network_errors_and_timeouts_are_retried(fresh_database, kafka_bootstrap):
    async with running(fresh_database, kafka_bootstrap, delivery_timeout_s="0.3",
                       delivery_max_attempts="2") as dispatch, \
            WebhookReceiver(delay_s=1.0) as slow:
        closed = WebhookReceiver()
        await closed.start()
        dead_url = closed.url
        await closed.stop()  # nothing listens there any more
        await dispatch.create_endpoint(dead_url)
        await dispatch.create_endpoint(slow.url)
        [env] = await dispatch.publish(dispatch.envelope(invoice_paid()))
        failures = await eventually(lambda: _all_status(dispatch, env.id, "failed", 2))
        for d in failures:
            assert d["attempts"] == 2 and d["last_status_code"] is None
        errors = {d["last_error"].split(":")[0] for d in failures}
        assert errors == {"ConnectError", "timeout"}


async def test_replay_since_resends_stored_events(dispatch: Dispatch, receiver: WebhookReceiver):
    early = await dispatch.publish(dispatch.envelope(invoice_paid()),
                                   dispatch.envelope(customer_created()))
    await dispatch.wait_stored(*[e.id for e in early])
    endpoint = await dispatch.create_endpoint(receiver.url, ["invoice.paid"])
    # An endpoint gets the events recorded after its creation; older ones only on replay.
    later = (await dispatch.publish(dispatch.envelope(invoice_paid())))[0]
    await receiver.wait_for(lambda r: len(r) == 1)
    assert receiver.requests[0].webhook_id == later.id
    await eventually(lambda: _delivered(dispatch, later.id))  # not in flight any more

    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    async with dispatch.client() as c:
        r = await c.post(f"/v1/webhook_endpoints/{endpoint['id']}/replay", json={"since": since})
        assert r.status_code == 200, r.text
        assert r.json()["enqueued"] == 2  # both invoice.paid; customer.created is filtered out
        reqs = await receiver.wait_for(lambda reqs: len(reqs) == 3)
        assert sorted(x.webhook_id for x in reqs) == sorted([later.id, later.id, early[0].id])
        receiver.verify(endpoint["secret"])
        future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        r = await c.post(f"/v1/webhook_endpoints/{endpoint['id']}/replay",
                         json={"since": future})
        assert r.json()["enqueued"] == 0
        r = await c.post(f"/v1/webhook_endpoints/{endpoint['id']}/replay", json={})
        assert r.status_code == 400 and r.json()["error"]["param"] == "since"
        r = await c.post("/v1/webhook_endpoints/we_nope/replay", json={"since": since})
        assert r.status_code == 404


async def test_crashed_workers_lease_expires_and_the_delivery_is_retried(
        dispatch: Dispatch, receiver: WebhookReceiver):
    endpoint = await dispatch.create_endpoint(receiver.url)
    [env] = await dispatch.publish(dispatch.envelope(invoice_paid()))
    await receiver.wait_for(lambda r: len(r) == 1)
    delivery = await eventually(lambda: _delivered(dispatch, env.id))
    # Put it back the way a worker that died mid-attempt leaves it: sending, lease expired,
    # its attempt never closed.
    pool = dispatch.host.pool
    await pool.execute(
        "INSERT INTO delivery_attempts (id, delivery_id, tenant_id, environment, number)"
        " VALUES ('wda_dead', $1, $2, 'test', 2)", delivery["id"], dispatch.tenant_id)
    await pool.execute(
        "UPDATE deliveries SET status = 'sending', attempts = 2, cycle_attempts = 1,"
        " current_attempt_id = 'wda_dead', locked_until = now() - interval '1 second'"
        " WHERE id = $1", delivery["id"])
    await pool.execute("SELECT pg_notify('billstream_webhook_deliveries', '')")
    reqs = await receiver.wait_for(lambda r: len(r) == 2)
    receiver.verify(endpoint["secret"], reqs)
    again = await eventually(lambda: _attempts(dispatch, env.id, 3))
    assert again["status"] == "delivered"
    async with dispatch.client() as c:
        attempts = (await c.get(f"/v1/webhook_deliveries/{delivery['id']}/attempts")).json()
    by_number = {a["attempt"]: a for a in attempts["data"]}
    assert by_number[2]["error"].startswith("lost") and by_number[2]["succeeded"] is False
    assert by_number[3]["status_code"] == 200


async def test_rebuild_by_replay_sends_nothing_twice(fresh_database, kafka_bootstrap):
    group = unique("g")
    async with WebhookReceiver() as receiver:
        async with running(fresh_database, kafka_bootstrap, consumer_group_prefix=group) as d:
            await d.create_endpoint(receiver.url)
            envs = await d.publish(d.envelope(invoice_paid()), d.envelope(customer_created()))
            await receiver.wait_for(lambda r: len(r) == 2)
            tenant, key = d.tenant_id, d.key
        settings = dispatch_settings(fresh_database, kafka_bootstrap,
                                     consumer_group_prefix=group)
        assert await build(settings).rebuild("events") == 2
        host = build(settings)
        await host.start(serve_http=False)
        try:
            again = Dispatch(host, kafka_bootstrap, tenant, key)
            await again.wait_stored(*[e.id for e in envs])
            marker = (await again.publish(again.envelope(invoice_paid())))[0]
            await receiver.wait_for(lambda r: any(x.webhook_id == marker.id for x in r))
            assert len(receiver.requests) == 3
            assert len(await again.deliveries()) == 3
        finally:
            await host.stop()


# ---------------------------------------------------------------- helpers


async def _ge(value, expected) -> bool:
    return value >= expected


async def _status(dispatch: Dispatch, event_id: str, status: str) -> dict | None:
    found = await dispatch.deliveries(event=event_id)
    return found[0] if found and found[0]["status"] == status else None


async def _delivered(dispatch: Dispatch, event_id: str) -> dict | None:
    return await _status(dispatch, event_id, "delivered")


async def _attempts(dispatch: Dispatch, event_id: str, n: int) -> dict | None:
    found = await dispatch.deliveries(event=event_id)
    return found[0] if found and found[0]["attempts"] == n and found[0]["status"] in (
        "delivered", "failed") else None


async def _settled(dispatch: Dispatch, n: int, **params: str) -> list | None:
    found = await dispatch.deliveries(**params)
    done = len(found) == n and all(d["status"] in ("delivered", "failed") for d in found)
    return found if done else None


async def _all_status(dispatch: Dispatch, event_id: str, status: str, n: int) -> list | None:
    found = await dispatch.deliveries(event=event_id)
    return found if len(found) == n and all(d["status"] == status for d in found) else None
