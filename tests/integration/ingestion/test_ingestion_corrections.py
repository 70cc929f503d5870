"""Corrections of accepted usage (POST /v1/usage/corrections): void and amend as compensating
events on the log, the original kept; already billed usage refused; the event's state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from billstream_contracts.events import (
    Charge,
    PlanSnapshot,
    SubscriptionPeriodEnded,
    SubscriptionSnapshot,
)
from ingestion_harness import Ingestion

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)
RECENT = (NOW - timedelta(days=3)).isoformat().replace("+00:00", "Z")


def ev(key, quantity=5, timestamp=RECENT, **extra):
    return {"idempotency_key": key, "customer": "acme-1", "meter": "api_calls",
            "quantity": quantity, "timestamp": timestamp, **extra}


async def send(c, *events):
    r = await c.post("/v1/usage/events", json={"events": list(events)})
    assert r.status_code == 200, r.text
    return r.json()


async def close_period(ingestion: Ingestion, start: datetime, end: datetime) -> None:
    plan = PlanSnapshot(plan_id="plan_1", code="pro", name="Pro", currency="USD",
                        interval="month", charges=[Charge(
                            charge_id="chg_1", type="usage", timing="in_arrears",
                            meter="api_calls", model="per_unit", unit_price="0.002")])
    sub = SubscriptionSnapshot(subscription_id="sub_1", customer_id="cus_1",
                               customer_external_id="acme-1", plan=plan, status="active",
                               started_at=start, current_period_start=start,
                               current_period_end=end)
    await ingestion.publish(SubscriptionPeriodEnded(
        subscription=sub, period_start=start, period_end=end, renews=True,
        next_period_start=end, next_period_end=end + timedelta(days=30)))
    await ingestion.wait_for_row(
        "SELECT 1 FROM period_closes WHERE tenant_id = $1 AND period_end = $2",
        ingestion.tenant_id, end)


async def test_void_appends_a_compensating_event_and_keeps_the_original(ingestion):
    await ingestion.create_meter("api_calls")
    async with ingestion.client() as c:
        sent = await send(c, ev("v-1", properties={"path": "/a"}))
        usage_id = sent["results"][0]["usage_id"]
        r = await c.post("/v1/usage/corrections", json={
            "idempotency_key": "v-1", "action": "void", "reason": "test traffic"})
        again = await c.post("/v1/usage/corrections", json={
            "idempotency_key": "v-1", "action": "void"})
        resend = await send(c, ev("v-1", properties={"path": "/a"}))
        amend = await c.post("/v1/usage/corrections", json={
            "idempotency_key": "v-1", "action": "amend", "quantity": 2})
        state = (await c.get("/v1/usage/events/lookup", params={"idempotency_key": "v-1"}))
    assert r.status_code == 200, r.text
    void = r.json()
    assert (void["object"], void["action"], void["usage_id"], void["reason"]) == (
        "usage_correction", "void", usage_id, "test traffic")
    assert again.json()["id"] == void["id"]  # voiding twice answers the first void
    assert resend["results"][0]["status"] == "duplicate"  # the key stays taken
    assert amend.status_code == 409 and amend.json()["error"]["code"] == "usage_event_voided"
    log = await ingestion.accepted_events()
    assert [e["type"] for e in log] == ["usage.batch_accepted", "usage.voided"]
    assert log[0]["data"]["quantity"] == "5"  # the original is untouched
    assert log[1]["data"] == {"correction_id": void["id"], "usage_id": usage_id,
                              "idempotency_key": "v-1", "reason": "test traffic"}
    assert log[1]["aggregate_id"] == log[0]["aggregate_id"]  # same key, same partition
    body = state.json()
    assert (body["status"], body["quantity"], len(body["corrections"])) == ("voided", "5", 1)


async def test_amend_replaces_quantity_and_properties(ingestion):
    await ingestion.create_meter("api_calls")
    async with ingestion.client() as c:
        await send(c, ev("a-1", quantity="1.5", properties={"region": "eu", "n": 1}))
        q = await c.post("/v1/usage/corrections", json={
            "idempotency_key": "a-1", "action": "amend", "quantity": "12.50"})
        p = await c.post("/v1/usage/corrections", json={
            "idempotency_key": "a-1", "action": "amend", "properties": {"region": "us"}})
        state = (await c.get("/v1/usage/events/lookup",
                             params={"idempotency_key": "a-1"})).json()
    assert q.status_code == 200, q.text
    assert (q.json()["quantity"], q.json()["properties"]) == ("12.5", {"region": "eu", "n": 1})
    assert (p.json()["quantity"], p.json()["properties"]) == ("12.5", {"region": "us"})
    log = await ingestion.accepted_events()
    assert [e["type"] for e in log] == ["usage.batch_accepted", "usage.amended", "usage.amended"]
    assert log[2]["data"]["quantity"] == "12.5"
    assert log[2]["data"]["properties"] == {"region": "us"}
    assert (state["status"], state["quantity"], state["properties"]) == (
        "amended", "12.5", {"region": "us"})
    assert state["original"] == {"quantity": "1.5", "properties": {"region": "eu", "n": 1}}


async def test_an_event_of_a_batch_stored_compressed_is_corrected(ingestion):
    """A large batch's log row holds its envelope compressed (zstd, `log_zstd_min_bytes`):
    a correction still finds the original usage in it."""
    await ingestion.create_meter("api_calls")
    events = [ev(f"z-{i}", quantity=i + 1, properties={"path": f"/p/{i}", "note": "x" * 40})
              for i in range(100)]
    async with ingestion.client() as c:
        await send(c, *events)
        r = await c.post("/v1/usage/corrections", json={
            "idempotency_key": "z-57", "action": "amend", "quantity": "0.5"})
        state = (await c.get("/v1/usage/events/lookup",
                             params={"idempotency_key": "z-57"})).json()
    assert r.status_code == 200, r.text
    codecs = await ingestion.host.pool.fetch(
        "SELECT envelope_codec FROM event_log WHERE tenant_id = $1 ORDER BY seq",
        ingestion.tenant_id)
    assert [row["envelope_codec"] for row in codecs] == ["zstd", None]  # batch, amendment
    assert state["original"] == {"quantity": "58",
                                 "properties": {"path": "/p/57", "note": "x" * 40}}
    log = await ingestion.accepted_events()
    assert [e["data"]["idempotency_key"] for e in log[:100]] == [f"z-{i}" for i in range(100)]
    assert log[100]["data"]["quantity"] == "0.5"


@pytest.mark.parametrize("body, code, param", [
    ({"idempotency_key": "k", "action": "erase"}, "parameter_invalid", "action"),
    ({"idempotency_key": "k", "action": "void", "quantity": 1}, "parameter_invalid",
     "quantity"),
    ({"idempotency_key": "k", "action": "amend"}, "parameter_missing", "quantity"),
    ({"idempotency_key": "k", "action": "amend", "quantity": -1}, "parameter_invalid",
     "quantity"),
    ({"idempotency_key": "k", "action": "amend", "quantity": "1,5"}, "parameter_invalid",
     "quantity"),
    ({"idempotency_key": "", "action": "void"}, "parameter_invalid", "idempotency_key"),
    ({"idempotency_key": "k", "action": "void", "extra": 1}, "parameter_unknown", "extra"),
    # PostgreSQL stores no NUL: these were 500s
    ({"idempotency_key": "k\x00", "action": "void"}, "parameter_invalid", "idempotency_key"),
    ({"idempotency_key": "k", "action": "void", "reason": "a\x00"}, "parameter_invalid",
     "reason"),
    ({"idempotency_key": "k", "action": "amend", "properties": {"a": "\x00"}},
     "parameter_invalid", "properties.a"),
])
async def test_bad_corrections_are_refused_with_the_field(ingestion, body, code, param):
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/corrections", json=body)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == (code, param)


async def test_unknown_key_is_404(ingestion):
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/corrections", json={"idempotency_key": "nope",
                                                        "action": "void"})
        lookup = await c.get("/v1/usage/events/lookup", params={"idempotency_key": "nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "idempotency_key"
    assert lookup.status_code == 404


async def test_billed_usage_cannot_be_corrected(ingestion):
    """A close after an event, whose period ends after its timestamp, billed it: refused. An
    event dated after the period end, or accepted after the close, is still open."""
    await ingestion.create_meter("api_calls")
    start, end = NOW - timedelta(days=20), NOW - timedelta(days=1)
    inside = (NOW - timedelta(days=3)).isoformat()
    after_end = (NOW - timedelta(hours=1)).isoformat()
    async with ingestion.client() as c:
        await send(c, ev("billed", timestamp=inside), ev("next-period", timestamp=after_end))
        await close_period(ingestion, start, end)
        await send(c, ev("late", timestamp=inside))  # backdated, accepted after the close
        billed = await c.post("/v1/usage/corrections", json={
            "idempotency_key": "billed", "action": "amend", "quantity": 1})
        next_period = await c.post("/v1/usage/corrections", json={
            "idempotency_key": "next-period", "action": "void"})
        late = await c.post("/v1/usage/corrections", json={
            "idempotency_key": "late", "action": "amend", "quantity": 9})
        # the next close bills the late event (swept) and next-period's void
        await close_period(ingestion, end, NOW + timedelta(days=29))
        late_again = await c.post("/v1/usage/corrections", json={
            "idempotency_key": "late", "action": "void"})
    assert billed.status_code == 409
    assert billed.json()["error"]["code"] == "usage_period_closed"
    assert next_period.status_code == 200, next_period.text
    assert late.status_code == 200, late.text
    assert late_again.status_code == 409
    types = [e["type"] for e in await ingestion.accepted_events()]
    assert types == ["usage.batch_accepted", "usage.batch_accepted", "usage.period_closed",
                     "usage.batch_accepted", "usage.voided", "usage.amended",
                     "usage.period_closed"]


async def test_a_replayed_period_end_is_not_closed_twice(ingestion):
    await ingestion.create_meter("api_calls")
    start, end = NOW - timedelta(days=20), NOW - timedelta(days=1)
    await close_period(ingestion, start, end)
    await close_period(ingestion, start, end)  # the same period end again (another event id)
    types = [e["type"] for e in await ingestion.accepted_events()]
    assert types == ["usage.period_closed"]
