"""POST /v1/usage/events beyond the native body: CloudEvents 1.0 in structured, batch and binary
content modes; the time window (with test clocks); backpressure (503 + Retry-After);
the expiry of idempotency keys past the dedup window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from billstream_ingestion import tasks
from ingestion_harness import Ingestion

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)


def iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


RECENT = iso(NOW - timedelta(hours=2))


def cloudevent(id_, subject="acme-1", **extra):
    return {"specversion": "1.0", "id": id_, "source": "//acme/billing", "type": "api_calls",
            "subject": subject, "time": RECENT, **extra}


async def test_structured_cloudevent(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", content=orjson.dumps(cloudevent(
            "e1", data={"quantity": 4, "region": "eu"})),
            headers={"Content-Type": "application/cloudevents+json"})
        again = await c.post("/v1/usage/events", content=orjson.dumps(cloudevent(
            "e1", data={"quantity": 4, "region": "eu"})),
            headers={"Content-Type": "application/cloudevents+json; charset=utf-8"})
    assert r.status_code == 200, r.text
    [res] = r.json()["results"]
    assert (res["status"], res["idempotency_key"]) == ("accepted", "//acme/billing e1")
    assert again.json()["results"][0]["status"] == "duplicate"
    [event] = [e["data"] for e in await ingestion.accepted_events()]
    assert (event["customer"], event["meter"], event["quantity"], event["properties"],
            event["timestamp"]) == ("acme-1", "api_calls", "4", {"region": "eu"}, RECENT)


async def test_batch_of_cloudevents_with_a_bad_one(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    batch = [cloudevent("b1"), cloudevent("b2", data={"quantity": "0.5"}),
             {**cloudevent("b3"), "specversion": "0.3"},
             cloudevent("b4", subject=None), cloudevent("b5", type="nope"),
             cloudevent("b6", data={"quantity": "-1"})]
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", content=orjson.dumps(batch),
                         headers={"Content-Type": "application/cloudevents-batch+json"})
        empty = await c.post("/v1/usage/events", content=b"[]",
                             headers={"Content-Type": "application/cloudevents-batch+json"})
    body = r.json()
    assert (body["accepted"], body["rejected"]) == (2, 4)
    res = body["results"]
    assert [x["status"] for x in res] == ["accepted", "accepted"] + ["rejected"] * 4
    assert (res[2]["code"], res[2]["param"]) == ("invalid_event", "specversion")
    assert (res[3]["code"], res[3]["param"]) == ("invalid_event", "subject")
    assert (res[4]["code"], res[4]["param"]) == ("unknown_meter", "type")
    assert (res[5]["code"], res[5]["param"]) == ("invalid_event", "data.quantity")
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "parameter_invalid"


async def test_binary_cloudevent(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    headers = {"ce-specversion": "1.0", "ce-id": "bin-1", "ce-source": "//acme/billing",
               "ce-type": "api_calls", "ce-subject": "acme%2D7", "ce-time": RECENT,
               "Content-Type": "application/json"}
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", content=b'{"quantity": 2.25, "tier": "gold"}',
                         headers=headers)
        no_data = await c.post("/v1/usage/events", content=b"",
                               headers={**headers, "ce-id": "bin-2"})
    assert r.json()["results"][0]["status"] == "accepted", r.text
    assert no_data.json()["results"][0]["status"] == "accepted", no_data.text
    events = {e["data"]["idempotency_key"]: e["data"] for e in await ingestion.accepted_events()}
    assert events["//acme/billing bin-1"]["customer"] == "acme-7"  # percent-decoded
    assert events["//acme/billing bin-1"]["quantity"] == "2.25"  # exact, never a float
    assert events["//acme/billing bin-1"]["properties"] == {"tier": "gold"}
    assert events["//acme/billing bin-2"]["quantity"] == "1"


async def test_a_binary_cloudevent_without_ce_specversion_is_told_so(ingestion: Ingestion):
    """Without `ce-specversion` the body is read as a native event; with other ce-* headers
    and no idempotency_key in it, the answer says what is missing instead of
    `idempotency_key is required`. A native event that carries such headers is still one."""
    await ingestion.create_meter("api_calls")
    headers = {"ce-id": "nv-1", "ce-source": "//acme/billing", "ce-type": "api_calls",
               "ce-subject": "acme-7", "Content-Type": "application/json"}
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", content=b'{"quantity": 2}', headers=headers)
        native = await c.post("/v1/usage/events", headers=headers, json={
            "idempotency_key": "nv-2", "customer": "acme-7", "meter": "api_calls",
            "timestamp": RECENT})
        other_format = await c.post("/v1/usage/events", content=b'{"quantity": 2}', headers={
            **headers, "ce-specversion": "1.0",
            "Content-Type": "application/cloudevents+xml"})
    [result] = r.json()["results"]
    assert (result["status"], result["code"], result["param"]) == (
        "rejected", "invalid_event", "ce-specversion"), r.text
    assert result["idempotency_key"] == "//acme/billing nv-1"
    assert native.json()["results"][0]["status"] == "accepted", native.text
    # it has a ce-specversion: whatever is wrong, not told it has none
    assert other_format.json()["results"][0]["param"] != "ce-specversion", other_format.text


async def test_a_structured_content_type_wins_over_ce_headers(ingestion: Ingestion):
    """As on the Kafka input: `Content-Type: application/cloudevents+json` is structured mode
    even when ce-* headers come along (a proxy may add them); the body is the event."""
    await ingestion.create_meter("api_calls")
    event = {"specversion": "1.0", "id": "st-1", "source": "//acme", "type": "api_calls",
             "subject": "acme-1", "time": RECENT, "data": {"quantity": "4"}}
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", content=orjson.dumps(event), headers={
            "Content-Type": "application/cloudevents+json; charset=utf-8",
            "ce-specversion": "1.0", "ce-id": "other", "ce-source": "//elsewhere",
            "ce-type": "api_calls", "ce-subject": "acme-2"})
    assert r.status_code == 200, r.text
    [result] = r.json()["results"]
    assert (result["status"], result["idempotency_key"]) == ("accepted", "//acme st-1")
    events = {e["data"]["idempotency_key"]: e["data"] for e in await ingestion.accepted_events()}
    assert (events["//acme st-1"]["customer"], events["//acme st-1"]["quantity"]) == (
        "acme-1", "4")


async def test_cloudevents_rejected_while_mapping_report_their_composed_key(
        ingestion: Ingestion):
    """The key is reported whenever source and id make one, in every content mode; only an
    event without a valid source and id is reported with none."""
    await ingestion.create_meter("api_calls")
    batch = [cloudevent("k1", data=[1, 2]),
             {**cloudevent("k2"), "data_base64": "eyJxdWFudGl0eSI6IDF9"},
             cloudevent("k3", subject=None),
             {**cloudevent("k4"), "source": "//acme billing"},
             {key: value for key, value in cloudevent("k5").items() if key != "id"},
             cloudevent("k6")]
    binary = {"ce-specversion": "1.0", "ce-id": "k7", "ce-source": "//acme/billing",
              "ce-type": "api_calls", "Content-Type": "application/json"}
    async with ingestion.client() as c:
        structured = await c.post(
            "/v1/usage/events", content=orjson.dumps(cloudevent("k0", data=[{"quantity": 1}])),
            headers={"Content-Type": "application/cloudevents+json"})
        batched = await c.post("/v1/usage/events", content=orjson.dumps(batch),
                               headers={"Content-Type": "application/cloudevents-batch+json"})
        no_subject = await c.post("/v1/usage/events", content=b"", headers=binary)
        no_id = await c.post("/v1/usage/events", content=b"",
                             headers={k: v for k, v in binary.items() if k != "ce-id"})
    assert structured.status_code == 200, structured.text
    assert structured.json()["results"] == [
        {"index": 0, "idempotency_key": "//acme/billing k0", "status": "rejected",
         "code": "invalid_event", "message": "data must be a JSON object", "param": "data"}]
    assert [(r["idempotency_key"], r["status"], r.get("param"))
            for r in batched.json()["results"]] == [
        ("//acme/billing k1", "rejected", "data"),
        ("//acme/billing k2", "rejected", "data_base64"),
        ("//acme/billing k3", "rejected", "subject"),
        (None, "rejected", "source"),  # a source with whitespace makes no key
        (None, "rejected", "id"),
        ("//acme/billing k6", "accepted", None)]
    assert [(r["idempotency_key"], r["param"]) for r in no_subject.json()["results"]] == [
        ("//acme/billing k7", "subject")]
    assert [(r["idempotency_key"], r["param"]) for r in no_id.json()["results"]] == [
        (None, "id")]


async def test_binary_data_that_is_not_json_is_rejected_per_event(ingestion: Ingestion):
    """A datacontenttype other than JSON is a rejected event, in the 200 answer, with its
    key; a JSON content type over a body that is not JSON is a bad body (400 invalid_json),
    as in the other modes."""
    await ingestion.create_meter("api_calls")
    headers = {"ce-specversion": "1.0", "ce-id": "t1", "ce-source": "//acme/billing",
               "ce-type": "api_calls", "ce-subject": "acme-1", "ce-time": RECENT}
    async with ingestion.client() as c:
        text = await c.post("/v1/usage/events", content=b"hello",
                            headers={**headers, "Content-Type": "text/plain"})
        bad_json = await c.post("/v1/usage/events", content=b"hello",
                                headers={**headers, "ce-id": "t2",
                                         "Content-Type": "application/json"})
    assert text.status_code == 200, text.text
    assert text.json()["rejected"] == 1
    [res] = text.json()["results"]
    assert (res["idempotency_key"], res["status"], res["code"], res["param"]) == (
        "//acme/billing t1", "rejected", "invalid_event", "datacontenttype")
    assert bad_json.status_code == 400, bad_json.text
    assert bad_json.json()["error"]["code"] == "invalid_json"
    assert await ingestion.accepted_events() == []


async def test_an_idempotency_key_covers_a_binary_cloudevents_headers(ingestion: Ingestion):
    """In binary mode the event is in the ce-* headers: two events with the same body are two
    requests, so reusing the Idempotency-Key is refused rather than replaying the first."""
    await ingestion.create_meter("api_calls")
    headers = {"ce-specversion": "1.0", "ce-id": "i1", "ce-source": "//acme/billing",
               "ce-type": "api_calls", "ce-subject": "acme-1", "ce-time": RECENT,
               "Content-Type": "application/json", "Idempotency-Key": "bin-batch-1"}
    async with ingestion.client() as c:
        first = await c.post("/v1/usage/events", content=b'{"quantity": 1}', headers=headers)
        other = await c.post("/v1/usage/events", content=b'{"quantity": 1}',
                             headers={**headers, "ce-id": "i2"})
        retry = await c.post("/v1/usage/events", content=b'{"quantity": 1}', headers=headers)
    assert first.json()["results"][0]["status"] == "accepted", first.text
    assert other.status_code == 422, other.text
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert other.json()["error"]["param"] == "Idempotency-Key"
    assert retry.headers["idempotent-replayed"] == "true"  # the same request: replayed
    assert retry.json() == first.json()
    assert [e["data"]["idempotency_key"] for e in await ingestion.accepted_events()] == [
        "//acme/billing i1"]


async def test_the_time_window(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    window = ingestion.host.settings.dedup_window_days
    now = datetime.now(UTC).replace(microsecond=0)  # not import time: the window is now's
    events = [
        {"idempotency_key": "in-old", "customer": "a", "meter": "api_calls",
         "timestamp": iso(now - timedelta(days=window) + timedelta(hours=1))},
        {"idempotency_key": "too-old", "customer": "a", "meter": "api_calls",
         "timestamp": iso(now - timedelta(days=window, hours=1))},
        {"idempotency_key": "soon", "customer": "a", "meter": "api_calls",
         "timestamp": iso(now + timedelta(minutes=4))},
        {"idempotency_key": "too-soon", "customer": "a", "meter": "api_calls",
         "timestamp": iso(now + timedelta(minutes=6))},
    ]
    async with ingestion.client() as c:
        res = (await c.post("/v1/usage/events", json={"events": events})).json()["results"]
    assert [(r["status"], r.get("code")) for r in res] == [
        ("accepted", None), ("rejected", "timestamp_out_of_window"),
        ("accepted", None), ("rejected", "timestamp_out_of_window")]
    assert "older than the 35-day window" in res[1]["message"]
    assert "in the future" in res[3]["message"] and res[3]["param"] == "timestamp"


async def test_the_window_follows_the_customers_test_clock(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    jan31 = datetime(2026, 1, 31, tzinfo=UTC)
    clock = await ingestion.create_clock(jan31)
    await ingestion.create_customer("clocked", test_clock_id=clock)
    events = [
        {"idempotency_key": "jan-1", "customer": "clocked", "meter": "api_calls",
         "timestamp": "2026-01-01T00:00:00Z"},  # 30 days before the clock: in
        {"idempotency_key": "dec-1", "customer": "clocked", "meter": "api_calls",
         "timestamp": "2025-12-01T00:00:00Z"},  # 61 days before the clock: out
        {"idempotency_key": "feb-1", "customer": "clocked", "meter": "api_calls",
         "timestamp": "2026-02-01T00:00:00Z"},  # a day after the clock: out
        {"idempotency_key": "wall", "customer": "clocked", "meter": "api_calls",
         "timestamp": RECENT},  # now on the wall clock, months after the clock: out
        # in the same batch, a customer on no clock keeps the wall clock's window
        {"idempotency_key": "free-now", "customer": "free", "meter": "api_calls",
         "timestamp": RECENT},  # in
        {"idempotency_key": "free-jan-1", "customer": "free", "meter": "api_calls",
         "timestamp": "2026-01-01T00:00:00Z"},  # months before the wall clock: out
    ]
    async with ingestion.client() as c:
        res = (await c.post("/v1/usage/events", json={"events": events})).json()["results"]
        await ingestion.advance_clock(clock, jan31, datetime(2026, 3, 1, tzinfo=UTC))
        later = (await c.post("/v1/usage/events", json={"events": events[:1]})).json()
    assert [r["status"] for r in res] == ["accepted", "rejected", "rejected", "rejected",
                                          "accepted", "rejected"]
    assert "older than the 35-day window" in res[5]["message"]
    # once the clock moved past the window, the January event is too old even to resend
    assert later["results"][0]["code"] == "timestamp_out_of_window"


async def test_backlog_answers_503_with_retry_after_and_takes_nothing(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    host = ingestion.host
    await host.relay.stop()  # nothing is published any more: the backlog grows
    host.app.state.admission._settings = host.settings.model_copy(
        update={"max_relay_lag_bytes": 100})
    host.app.state.admission._lag_at = float("-inf")
    async with ingestion.client() as c:
        first = await c.post("/v1/usage/events", json={"events": [
            {"idempotency_key": f"bp-{i}", "customer": "a", "meter": "api_calls"}
            for i in range(10)]})
        host.app.state.admission._lag_at = float("-inf")
        refused = await c.post("/v1/usage/events", json={
            "idempotency_key": "bp-late", "customer": "a", "meter": "api_calls"},
            headers={"Idempotency-Key": "req-1"})
    assert first.json()["accepted"] == 10
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "ingestion_backlogged"
    async with host.pool.acquire() as conn:
        assert await conn.fetchval(
            "SELECT count(*) FROM usage_keys WHERE idempotency_key = 'bp-late'") == 0


async def test_too_many_events_in_flight_answers_503(ingestion: Ingestion):
    admission = ingestion.host.app.state.admission
    admission.inflight = ingestion.host.settings.max_inflight_events  # as if busy
    try:
        async with ingestion.client() as c:
            r = await c.post("/v1/usage/events", json={
                "idempotency_key": "busy", "customer": "a", "meter": "api_calls"})
    finally:
        admission.inflight = 0
    assert r.status_code == 503 and r.json()["error"]["code"] == "ingestion_busy"
    assert r.headers["retry-after"]


async def test_keys_expire_only_past_the_window(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", json={"events": [
            {"idempotency_key": f"x-{i}", "customer": "a", "meter": "api_calls",
             "timestamp": RECENT} for i in range(3)]})
    assert r.json()["accepted"] == 3
    host = ingestion.host
    window = timedelta(days=host.settings.dedup_window_days)
    # inside the window (and its one-day margin) nothing goes
    assert await tasks.purge_once(host, now=NOW + window) == 0
    async with host.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM usage_keys") == 3
    # received and timestamped more than window + margin ago: they go
    assert await tasks.purge_once(host, now=NOW + window + timedelta(days=2)) == 3
    async with host.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM usage_keys") == 0


async def test_keys_of_a_frozen_clock_customer_are_kept(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    jan31 = datetime(2026, 1, 31, tzinfo=UTC)
    clock = await ingestion.create_clock(jan31)
    await ingestion.create_customer("frozen", test_clock_id=clock)
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", json={
            "idempotency_key": "f-1", "customer": "frozen", "meter": "api_calls",
            "timestamp": "2026-01-30T00:00:00Z"})
    assert r.json()["accepted"] == 1
    host = ingestion.host
    far = NOW + timedelta(days=400)  # wall time long past; the clock still on Jan 31
    assert await tasks.purge_once(host, now=far) == 0
    await ingestion.advance_clock(clock, jan31, datetime(2026, 6, 1, tzinfo=UTC))
    assert await tasks.purge_once(host, now=far) == 1


async def test_usage_sent_right_after_a_clock_advance_waits_for_it(ingestion: Ingestion,
                                                                    monkeypatch):
    """A script advances the clock, then sends that period's usage at once: the advance may
    not have reached ingestion yet. The events wait for it instead of being judged against
    the old clock time (they would look a month in the future)."""
    import asyncio

    from billstream_contracts.events import TestClockAdvanced
    from billstream_ingestion import service

    real_wait_for, waiting_for_the_clock = service.wait_for, asyncio.Event()

    async def wait_for(predicate, timeout_s):
        if predicate.__name__ == "caught_up":  # the request waits for the clock's projection
            waiting_for_the_clock.set()
        return await real_wait_for(predicate, timeout_s)

    monkeypatch.setattr(service, "wait_for", wait_for)

    await ingestion.create_meter("api_calls")
    jan1, jan31 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 31, tzinfo=UTC)
    clock = await ingestion.create_clock(jan1)
    await ingestion.create_customer("rushed", test_clock_id=clock)
    state = ingestion.host.app.state
    state.settings = state.settings.model_copy(update={"projection_wait_s": 5.0})

    async def advance_a_moment_later():
        await asyncio.wait_for(waiting_for_the_clock.wait(), timeout=30)
        await ingestion.publish(TestClockAdvanced(test_clock_id=clock, previous_time=jan1,
                                                  frozen_time=jan31))

    async def send():
        async with ingestion.client() as c:
            return (await c.post("/v1/usage/events", json={"events": [
                {"idempotency_key": f"r-{i}", "customer": "rushed", "meter": "api_calls",
                 "timestamp": f"2026-01-{10 + i}T00:00:00Z"} for i in range(5)]})).json()

    body, _ = await asyncio.gather(send(), advance_a_moment_later())
    assert body["accepted"] == 5, body["results"]


async def test_a_republish_of_the_whole_log_does_not_shut_intake_off(ingestion: Ingestion):
    """After a broker lost its data the relay republishes everything from seq 1; that backlog
    is old events, not new ones: backpressure must not refuse intake until it is done."""
    await ingestion.create_meter("api_calls")
    host = ingestion.host
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", json={"events": [
            {"idempotency_key": f"old-{i}", "customer": "a", "meter": "api_calls"}
            for i in range(20)]})
    assert r.json()["accepted"] == 20
    await host.relay.stop()
    admission = host.app.state.admission
    admission._settings = host.settings.model_copy(update={"max_relay_lag_bytes": 100})
    # as the relay leaves it when it starts republishing the whole log
    await host.pool.execute(
        "UPDATE relay_state SET published_seq = 0,"
        " republish_head = (SELECT last_seq FROM event_log_head WHERE id = 1)")
    admission._lag_at = float("-inf")
    assert await admission.relay_lag() == 0
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", json={
            "idempotency_key": "new-1", "customer": "a", "meter": "api_calls"})
    assert r.status_code == 200 and r.json()["accepted"] == 1
