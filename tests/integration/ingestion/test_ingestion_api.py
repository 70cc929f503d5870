"""POST /v1/usage/events against real PostgreSQL and broker: per-event outcomes, dedup across
requests and under concurrency, test-clock time, the usage.accepted topic."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from billstream_contracts.topics import USAGE_ACCEPTED
from billstream_ingestion.bootstrap import build
from billstream_testing.events import read_topic
from billstream_runtime.idempotency import IdempotencyMiddleware, hash_request
from billstream_testing.fixtures import unique
from ingestion_harness import Ingestion, ingestion_settings

pytestmark = pytest.mark.integration


#: A fixed instant inside the dedup window (events older than 35 days are rejected).
RECENT_AT = (datetime.now(UTC) - timedelta(days=2)).replace(microsecond=0)
RECENT = RECENT_AT.isoformat().replace("+00:00", "Z")


def ev(key, customer="acme-1", meter="api_calls", **extra):
    return {"idempotency_key": key, "customer": customer, "meter": meter, **extra}


def outcomes(body):
    return [(r["index"], r["status"], r.get("code")) for r in body["results"]]


async def test_batch_gives_exact_per_event_outcomes(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    cus = await ingestion.create_customer("acme-1")
    batch = {"events": [
        ev("k0", quantity="10", timestamp=RECENT, properties={"region": "eu"}),
        ev("k1", quantity="abc"),                                   # malformed
        ev("k0", quantity=10, timestamp=RECENT, properties={"region": "eu"}),
        ev("k0", quantity="11", timestamp=RECENT),  # same key, other payload
        ev("k4", meter="no_such_meter"),                            # unknown meter
        ev("k5", customer="ghost-7", quantity=2.5),                 # unknown customer: kept
        ev("k6", customer=cus, quantity="1.50"),                    # by cus_ id
        ev("k7", properties={"blob": "x" * 9000}),                  # properties too large
        {"customer": "acme-1", "meter": "api_calls"},               # no key
        "not an object",
    ]}
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", content=orjson.dumps(batch).replace(
            b'"quantity":2.5', b'"quantity":2.50'), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "usage_ingest_result"
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (3, 1, 6)
    assert outcomes(body) == [
        (0, "accepted", None),
        (1, "rejected", "invalid_event"),
        (2, "duplicate", None),
        (3, "rejected", "idempotency_key_conflict"),
        (4, "rejected", "unknown_meter"),
        (5, "accepted", None),
        (6, "accepted", None),
        (7, "rejected", "properties_too_large"),
        (8, "rejected", "invalid_event"),
        (9, "rejected", "invalid_event"),
    ]
    res = body["results"]
    assert res[1]["param"] == "quantity" and "quantity" in res[1]["message"]
    assert res[8]["param"] == "idempotency_key" and res[8]["idempotency_key"] is None
    assert res[0]["usage_id"].startswith("use_") and res[2]["usage_id"] == res[0]["usage_id"]
    assert "usage_id" not in res[3]

    events = await ingestion.accepted_events()
    # one log row (one record on the topic) for the request's accepted usage
    assert [e["type"] for e in events] == ["usage.batch_accepted"] * 3
    assert len(await ingestion.log_rows()) == 1
    assert {e["topic"] for e in events} == {USAGE_ACCEPTED}
    by_key = {e["data"]["idempotency_key"]: e for e in events}
    k0, k5, k6 = by_key["k0"], by_key["k5"], by_key["k6"]
    assert k0["data"] == {
        "usage_id": res[0]["usage_id"], "idempotency_key": "k0", "customer": "acme-1",
        "customer_id": cus, "meter": "api_calls", "quantity": "10",
        "timestamp": RECENT, "properties": {"region": "eu"},
    }
    assert (k0["aggregate_type"], k0["aggregate_id"]) == ("usage_batch", k0["id"])
    assert k5["data"]["customer_id"] is None and k5["data"]["customer"] == "ghost-7"
    assert k5["data"]["quantity"] == "2.5"
    assert k6["data"]["customer"] == cus and k6["data"]["customer_id"] == cus
    assert k6["data"]["quantity"] == "1.5"

    # Resending the same batch accepts nothing new.
    async with ingestion.client() as c:
        again = (await c.post("/v1/usage/events", json=batch)).json()
    assert (again["accepted"], again["duplicates"], again["rejected"]) == (0, 4, 6)
    assert [s for _, s, _ in outcomes(again)] == [
        "duplicate", "rejected", "duplicate", "rejected", "rejected", "duplicate", "duplicate",
        "rejected", "rejected", "rejected"]
    assert again["results"][5]["usage_id"] == res[5]["usage_id"]
    assert len(await ingestion.accepted_events()) == 3
    assert await ingestion.host.pool.fetchval("SELECT count(*) FROM usage_keys") == 3


async def test_concurrent_identical_batches_accept_each_key_once(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    batch = {"events": [ev(f"c-{i}", quantity=i + 1) for i in range(300)]}
    async with ingestion.client() as c:
        responses = await asyncio.gather(
            *[c.post("/v1/usage/events", json=batch) for _ in range(6)])
    bodies = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert sum(b["accepted"] for b in bodies) == 300
    assert all(b["accepted"] + b["duplicates"] == 300 and b["rejected"] == 0 for b in bodies)
    accepted = {}
    for b in bodies:
        for r in b["results"]:
            if r["status"] == "accepted":
                assert r["idempotency_key"] not in accepted
                accepted[r["idempotency_key"]] = r["usage_id"]
    for b in bodies:  # duplicates point at the one accepted event
        for r in b["results"]:
            assert r["usage_id"] == accepted[r["idempotency_key"]]
    events = await ingestion.accepted_events()
    assert len(events) == 300
    assert sorted(e["data"]["idempotency_key"] for e in events) == sorted(accepted)


async def test_default_timestamp_is_the_test_clock_time(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    frozen = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
    clock = await ingestion.create_clock(frozen)
    await ingestion.create_customer("clocked", test_clock_id=clock)
    await ingestion.create_customer("walled")
    async with ingestion.client() as c:
        before = datetime.now(UTC)
        r = await c.post("/v1/usage/events", json={"events": [
            ev("t1", customer="clocked"), ev("t2", customer="walled"),
            ev("t3", customer="clocked", timestamp="2026-01-01T00:00:00Z")]})
        assert r.json()["accepted"] == 3
        later = frozen + timedelta(days=20)
        await ingestion.advance_clock(clock, frozen, later)
        r = await c.post("/v1/usage/events", json=ev("t4", customer="clocked"))
        assert r.json()["accepted"] == 1
    ts = {e["data"]["idempotency_key"]: e["data"]["timestamp"]
          for e in await ingestion.accepted_events()}
    assert ts["t1"] == "2026-01-15T12:00:00Z"
    assert ts["t3"] == "2026-01-01T00:00:00Z"
    assert ts["t4"] == "2026-02-04T12:00:00Z"
    wall = datetime.fromisoformat(ts["t2"])
    assert before <= wall <= datetime.now(UTC)


async def test_accepted_events_are_published(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events",
                         json={"events": [ev(f"p{i}", quantity="2") for i in range(100)]})
    assert r.json()["accepted"] == 100
    [record] = [orjson.loads(r.value) for r in await read_topic(
        ingestion.bootstrap, USAGE_ACCEPTED, 1,
        lambda r: orjson.loads(r.value)["tenant_id"] == ingestion.tenant_id)]
    assert (record["type"], record["source"]) == ("usage.batch_accepted", "ingestion")
    assert sorted(u["idempotency_key"] for u in record["data"]["usages"]) == sorted(
        f"p{i}" for i in range(100))
    assert {u["quantity"] for u in record["data"]["usages"]} == {"2"}


async def test_a_meter_created_a_moment_ago_is_waited_for(fresh_database, kafka_bootstrap,
                                                          monkeypatch):
    from billstream_ingestion import repository

    found_unknown = asyncio.Event()
    real_known_meters = repository.known_meters

    async def known_meters(pool, tenant_id, environment, codes):
        known = await real_known_meters(pool, tenant_id, environment, codes)
        if "new" not in known:
            found_unknown.set()
        return known

    monkeypatch.setattr(repository, "known_meters", known_meters)
    host = build(ingestion_settings(fresh_database, kafka_bootstrap, projection_wait_s="10"))
    await host.start(serve_http=False)
    try:
        svc = Ingestion(host, kafka_bootstrap, unique("ten"), "")
        svc.key = await svc.add_key()
        async with svc.client() as c:
            posting = asyncio.create_task(c.post("/v1/usage/events", json=ev("w1", meter="new")))
            # the request has looked the meter up and not found it before it is created
            await asyncio.wait_for(found_unknown.wait(), 30)
            await svc.create_meter("new")
            r = await posting
        assert r.json()["accepted"] == 1, r.text
    finally:
        await host.stop()


async def test_single_events_limits_and_auth(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", json=ev("s1", quantity="3"))
        assert r.status_code == 200 and r.json()["accepted"] == 1
        assert r.json()["results"][0]["idempotency_key"] == "s1"
        r = await c.post("/v1/usage/events", json={"events": [ev(f"b{i}") for i in range(1001)]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "batch_too_large"
        r = await c.post("/v1/usage/events", content=b"x" * (5 * 1024 * 1024 + 1))
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = await c.post("/v1/usage/events", content=b"{nope")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = await c.post("/v1/usage/events", json={"events": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "events"
        r = await c.post("/v1/usage/events", json=[ev("x")])
        assert r.status_code == 400
        r = await c.post("/v1/usage/events", json=ev("s2"), headers={"Authorization": ""})
        assert r.status_code == 401
    publishable = await ingestion.add_key("publishable")
    async with ingestion.client(publishable) as c:
        r = await c.post("/v1/usage/events", json=ev("s3"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "secret_key_required"
    assert len(await ingestion.accepted_events()) == 1


async def test_environments_and_the_idempotency_header(ingestion: Ingestion):
    await ingestion.create_meter("api_calls")  # test mode only
    live = await ingestion.add_key(environment="live")
    async with ingestion.client(live) as c:
        r = await c.post("/v1/usage/events", json=ev("e1"))
        assert r.json()["results"][0]["code"] == "unknown_meter"
    await ingestion.create_meter("api_calls", environment="live")
    async with ingestion.client(live) as c:
        assert (await c.post("/v1/usage/events", json=ev("e1"))).json()["accepted"] == 1
    async with ingestion.client() as c:  # the same key in test mode is another key
        h = {"Idempotency-Key": unique("req")}
        first = await c.post("/v1/usage/events", json=ev("e1"), headers=h)
        again = await c.post("/v1/usage/events", json=ev("e1"), headers=h)
        assert first.json()["accepted"] == 1
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    envs = sorted(e["environment"] for e in await ingestion.accepted_events())
    assert envs == ["live", "test"]


async def test_a_period_end_is_ordered_behind_the_usage_accepted_before_it(ingestion):
    """`subscription.period_ended` becomes `usage.period_closed` in ingestion's own log, after
    every usage event accepted before it: metering's barrier for billing the period."""
    from billstream_contracts.events import (
        Charge, PlanSnapshot, SubscriptionPeriodEnded, SubscriptionSnapshot,
    )

    await ingestion.create_meter("api_calls")
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", json={"events": [
            ev(f"pe{i}", timestamp=RECENT) for i in range(5)]})
    assert r.json()["accepted"] == 5
    jan, feb = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)
    plan = PlanSnapshot(plan_id="plan_1", code="pro", name="Pro", currency="USD",
                        interval="month", charges=[Charge(
                            charge_id="chg_1", type="usage", timing="in_arrears",
                            meter="api_calls", model="per_unit", unit_price="0.002")])
    sub = SubscriptionSnapshot(subscription_id="sub_1", customer_id="cus_1",
                               customer_external_id="acme-1", plan=plan, status="active",
                               started_at=jan, current_period_start=jan, current_period_end=feb)
    await ingestion.publish(SubscriptionPeriodEnded(
        subscription=sub, period_start=jan, period_end=feb, renews=True,
        next_period_start=feb, next_period_end=datetime(2026, 3, 1, tzinfo=UTC)))
    await ingestion.wait_for_row(
        "SELECT 1 FROM event_log WHERE type = 'usage.period_closed' AND tenant_id = $1",
        ingestion.tenant_id)
    log = await ingestion.accepted_events()
    assert [e["type"] for e in log] == ["usage.batch_accepted"] * 5 + ["usage.period_closed"]
    close = log[-1]
    assert close["topic"] == USAGE_ACCEPTED and close["causation_id"] is not None
    assert close["data"]["subscription"]["subscription_id"] == "sub_1"
    assert close["seq"] > max(e["seq"] for e in log[:-1])


async def test_unicode_everywhere_and_a_broken_string_alone_is_rejected(ingestion: Ingestion):
    """Text that is not Unicode (a lone surrogate) or that PostgreSQL cannot store (a NUL,
    which used to fail the whole batch with a 500) rejects its event alone."""
    await ingestion.create_meter("api_calls")
    body = (b'{"events": ['
            b'{"idempotency_key": "\xd0\xba\xd0\xbb\xd1\x8e\xd1\x87-\xf0\x9f\x98\x80", '
            b'"customer": "\xe9\xa1\xa7\xe5\xae\xa2-1", "meter": "api_calls", '
            b'"properties": {"\xe5\x9c\xb0\xe5\x9f\x9f": "\xc3\xa9t\xc3\xa9", "\\u00e9": 1}},'
            b'{"idempotency_key": "lone", "customer": "\\ud800", "meter": "api_calls"},'
            b'{"idempotency_key": "\\ud83d\\ude00-escaped", "customer": "c", "meter": "api_calls"},'
            b'{"idempotency_key": "nul\\u0000", "customer": "c", "meter": "api_calls"},'
            b'{"idempotency_key": "nul-2", "customer": "c", "meter": "api_calls",'
            b' "properties": {"p": "a\\u0000b"}}'
            b']}')
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", content=body,
                         headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [(x["status"], x.get("param")) for x in res] == [
        ("accepted", None), ("rejected", "customer"), ("accepted", None),
        ("rejected", "idempotency_key"), ("rejected", "properties.p")]
    assert {x.get("code") for x in res if x["status"] == "rejected"} == {"invalid_event"}
    assert res[2]["idempotency_key"] == "\U0001F600-escaped"  # a valid surrogate pair
    data = {e["data"]["idempotency_key"]: e["data"] for e in await ingestion.accepted_events()}
    assert data["ключ-😀"]["customer"] == "顧客-1"
    assert data["ключ-😀"]["properties"] == {"地域": "été", "é": 1}


async def test_a_failed_ingest_releases_its_idempotency_key_for_the_retry(ingestion,
                                                                           monkeypatch):
    """The usage route runs safely again (each event's key dedups), so a failure, which may
    come after the commit, is not stored to be replayed as a 500 to every retry: the key is
    released and the retry runs the batch."""
    from billstream_ingestion import service

    await ingestion.create_meter("api_calls")
    real_ingest, failures = service.ingest, []

    async def ingest_then_fail(*args, **kwargs):
        outcomes = await real_ingest(*args, **kwargs)  # committed
        if not failures:
            failures.append(1)
            raise ConnectionResetError("the connection went away after the commit")
        return outcomes

    monkeypatch.setattr(service, "ingest", ingest_then_fail)
    body = orjson.dumps({"events": [ev("rel-1"), ev("rel-2")]})
    headers = {"content-type": "application/json", "Idempotency-Key": "batch-rel"}
    async with ingestion.client() as c:
        failed = await c.post("/v1/usage/events", content=body, headers=headers)
        assert failed.status_code == 500
        assert await ingestion.host.pool.fetchval(
            "SELECT count(*) FROM idempotency_keys WHERE key = 'batch-rel'") == 0
        retried = await c.post("/v1/usage/events", content=body, headers=headers)
        assert retried.status_code == 200 and "idempotent-replayed" not in retried.headers
        assert outcomes(retried.json()) == [(0, "duplicate", None), (1, "duplicate", None)]
        replayed = await c.post("/v1/usage/events", content=body, headers=headers)
        assert replayed.headers["idempotent-replayed"] == "true"
        assert replayed.json() == retried.json()


async def test_a_client_gone_before_its_body_ended_runs_nothing(ingestion: Ingestion):
    """A disconnect in the middle of the upload is not the end of the body: the part that came
    is not run (it was a 400 stored under the key, and the full retry then got 422)."""
    await ingestion.create_meter("api_calls")
    body = orjson.dumps({"events": [ev("cut-1"), ev("cut-2")]})
    headers = [(b"authorization", f"Bearer {ingestion.key}".encode()),
               (b"content-type", b"application/json"), (b"idempotency-key", b"batch-cut"),
               (b"content-length", str(len(body)).encode())]
    messages = [{"type": "http.request", "body": body[:20], "more_body": True},
                {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await ingestion.host.app({"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                              "method": "POST", "path": "/v1/usage/events", "raw_path":
                              b"/v1/usage/events", "query_string": b"", "headers": headers,
                              "scheme": "http", "server": ("ingestion", 80),
                              "client": ("127.0.0.1", 5000), "root_path": ""},
                             receive, send)
    assert sent == []  # no one to answer
    counted = [line for line in ingestion.host.metrics.render().decode().splitlines()
               if line.startswith("billstream_http_requests_total{")
               and "POST" in line]
    assert any('status="499"' in line for line in counted), counted  # a client abort, not 500
    assert not any('status="500"' in line for line in counted), counted
    pool = ingestion.host.pool
    assert await pool.fetchval("SELECT count(*) FROM idempotency_keys WHERE key = 'batch-cut'"
                               ) == 0
    assert await pool.fetchval("SELECT count(*) FROM usage_keys") == 0
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", content=body,
                         headers={"content-type": "application/json",
                                  "Idempotency-Key": "batch-cut"})
    assert r.status_code == 200 and r.json()["accepted"] == 2, r.text


async def test_a_dead_requests_idempotency_key_is_taken_over_after_the_lease(
        ingestion: Ingestion):
    """A request killed after committing part of its work leaves its Idempotency-Key
    `in_progress`. On the usage endpoint a retry with the same key is told when to come back
    (409 + Retry-After) and, once the lease has run out, runs the batch again: what the dead
    request took answers `duplicate` (same usage id), the rest is accepted, nothing twice."""
    await ingestion.create_meter("api_calls")
    pool = ingestion.host.pool
    body = orjson.dumps({"events": [ev("dead-1", quantity="3"), ev("dead-2", quantity="4")]})
    headers = {"content-type": "application/json", "Idempotency-Key": "batch-7"}
    async with ingestion.client() as c:
        # what the dead request had committed: its first event
        taken = (await c.post("/v1/usage/events", json=ev("dead-1", quantity="3"))).json()
        assert taken["accepted"] == 1
        await pool.execute(
            "INSERT INTO idempotency_keys (tenant_id, environment, key, request_hash, status,"
            " locked_at, lease_id) VALUES ($1, 'test', 'batch-7', $2, 'in_progress', now(),"
            " 'dead-holder')",
            ingestion.tenant_id, hash_request("POST", "/v1/usage/events", b"", body))

        early = await c.post("/v1/usage/events", content=body, headers=headers)
        assert early.status_code == 409
        assert early.json()["error"]["code"] == "idempotency_key_in_use"
        assert early.headers["retry-after"] == "2"  # soon: the holder may just be finishing
        assert "retry in 60 s or later runs it again" in early.json()["error"]["message"]

        await pool.execute("UPDATE idempotency_keys SET locked_at = now() - interval '61 s'"
                           " WHERE key = 'batch-7'")
        retried = await c.post("/v1/usage/events", content=body, headers=headers)
        assert retried.status_code == 200, retried.text
        assert outcomes(retried.json()) == [(0, "duplicate", None), (1, "accepted", None)]
        assert retried.json()["results"][0]["usage_id"] == taken["results"][0]["usage_id"]
        assert await pool.fetchval(
            "SELECT status FROM idempotency_keys WHERE key = 'batch-7'") == "done"
        replayed = await c.post("/v1/usage/events", content=body, headers=headers)
        assert replayed.headers["idempotent-replayed"] == "true"
        assert replayed.json() == retried.json()
        # had the first holder been slow rather than dead, its late answer changes nothing
        await IdempotencyMiddleware._store(pool, ingestion.tenant_id, "test", "batch-7",
                                           "dead-holder", {"status": 201, "headers": [],
                                                           "body": b"late"})
        await IdempotencyMiddleware._release(pool, ingestion.tenant_id, "test", "batch-7",
                                             "dead-holder")
        again = await c.post("/v1/usage/events", content=body, headers=headers)
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json() == retried.json()

        # an endpoint whose effect is not deduplicated by itself keeps the key: 409, always
        correction = orjson.dumps({"idempotency_key": "dead-2", "action": "void"})
        await pool.execute(
            "INSERT INTO idempotency_keys (tenant_id, environment, key, request_hash, status,"
            " locked_at) VALUES ($1, 'test', 'fix-1', $2, 'in_progress',"
            " now() - interval '1 hour')",
            ingestion.tenant_id, hash_request("POST", "/v1/usage/corrections", b"", correction))
        refused = await c.post("/v1/usage/corrections", content=correction, headers={
            "content-type": "application/json", "Idempotency-Key": "fix-1"})
        assert refused.status_code == 409
        assert "retry-after" not in refused.headers
    assert sorted(e["data"]["idempotency_key"] for e in await ingestion.accepted_events()) == [
        "dead-1", "dead-2"]


async def test_a_batch_encoded_for_another_size_is_encoded_again_when_written(
        ingestion: Ingestion):
    """`write` splits usage by its own max_batch_bytes, even for a batch encoded before with
    another size: each batch event holds at most that much usage, and each key names the batch
    event that holds its usage."""
    from billstream_ingestion import service

    await ingestion.create_meter("api_calls")
    host = ingestion.host
    scope = service.Scope(ingestion.tenant_id, "test")
    raws = [ev(f"split-{i}", quantity=str(i + 1)) for i in range(12)]
    prepared = await service.prepare(host.pool, host.settings, scope, raws)
    service.encode(prepared, 10**9)
    assert len(prepared.encoded.event_ids) == 1  # one batch event at that size
    small = 3 * max(len(u) for u in prepared.encoded.usages)  # 2 or 3 usages a batch event
    async with host.pool.acquire() as conn, conn.transaction():
        results = await service.write(conn, host.store, [prepared], max_batch_bytes=small)
    assert [o.status for o in results] == ["accepted"] * 12
    batches = [r for r in await ingestion.log_rows() if r["type"] == "usage.batch_accepted"]
    assert 4 <= len(batches) <= 6
    assert all(len(orjson.dumps(b["data"]["usages"])) <= small for b in batches)
    holder = {u["idempotency_key"]: b["id"] for b in batches for u in b["data"]["usages"]}
    claims = await host.pool.fetch(
        "SELECT idempotency_key, event_id FROM usage_keys WHERE tenant_id = $1", scope.tenant_id)
    assert {r["idempotency_key"]: r["event_id"] for r in claims} == holder
    assert len(holder) == 12
