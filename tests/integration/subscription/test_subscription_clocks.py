"""Test clocks: an advance renews every period it crosses, in order, exactly once; the
wall-clock renewal task does the same for subscriptions without a clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from billstream_runtime.auth import AuthContext
from billstream_runtime.ids import new_id
from billstream_subscription import repository, service
from billstream_subscription.bootstrap import build
from billstream_subscription.domain import Subscription
from billstream_testing.waiting import eventually
from subscription_helpers import ADMIN_TOKEN, assert_error, client_for, settings_for

pytestmark = pytest.mark.integration

PLAN = {"code": "pro", "name": "Pro", "currency": "USD", "interval": "month",
        "charges": [{"type": "fixed", "amount": "49.00"}]}


def z(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def _clock(api, frozen_time="2026-01-31T00:00:00Z", name=None) -> dict:
    body = {"frozen_time": frozen_time} | ({"name": name} if name else {})
    r = await api.post("/v1/test_clocks", json=body)
    assert r.status_code == 201, r.text
    return r.json()


async def _subscribe(api, external_id: str, clock: dict | None) -> dict:
    body = {"external_id": external_id} | ({"test_clock": clock["id"]} if clock else {})
    r = await api.post("/v1/customers", json=body)
    assert r.status_code == 201, r.text
    r = await api.post("/v1/subscriptions", json={"customer": external_id, "plan": "pro"})
    assert r.status_code == 201, r.text
    return r.json()


async def test_clock_crud(api, live_api, tenant, log_of):
    clock = await _clock(api, "2026-01-01T02:00:00+02:00", name="january")
    assert clock["id"].startswith("clk_")
    assert {k: clock[k] for k in ("object", "name", "frozen_time", "status", "livemode")} == {
        "object": "test_clock", "name": "january", "frozen_time": "2026-01-01T00:00:00Z",
        "status": "ready", "livemode": False}
    assert (await api.get(f"/v1/test_clocks/{clock['id']}")).json() == clock
    other = await _clock(api)
    assert [c["id"] for c in (await api.get("/v1/test_clocks")).json()["data"]] == [
        other["id"], clock["id"]]
    assert_error(await api.get("/v1/test_clocks/clk_missing"), 404, "resource_missing")
    assert_error(await live_api.post("/v1/test_clocks",
                                     json={"frozen_time": "2026-01-01T00:00:00Z"}),
                 400, "test_mode_only")
    assert_error(await live_api.get("/v1/test_clocks"), 400, "test_mode_only")
    assert_error(await api.post("/v1/test_clocks", json={"frozen_time": "2026-01-01T00:00:00"}),
                 400, "parameter_invalid", "frozen_time")
    assert_error(await api.post("/v1/test_clocks", json={}), 400, "parameter_missing",
                 "frozen_time")
    events = await log_of(tenant["id"], ("test_clock.created",))
    assert [e["data"] for e in events] == [
        {"test_clock_id": clock["id"], "name": "january", "frozen_time": "2026-01-01T00:00:00Z"},
        {"test_clock_id": other["id"], "name": None, "frozen_time": "2026-01-31T00:00:00Z"}]


async def test_advance_over_three_months_renews_three_times_in_order(api, tenant, log_of):
    assert (await api.post("/v1/plans", json=PLAN)).status_code == 201
    clock = await _clock(api, "2026-01-31T00:00:00Z")
    sub = await _subscribe(api, "acme-1", clock)
    assert (sub["started_at"], sub["current_period_start"], sub["current_period_end"]) == (
        "2026-01-31T00:00:00Z", "2026-01-31T00:00:00Z", "2026-02-28T00:00:00Z")
    assert sub["test_clock"] == clock["id"]
    customer = (await api.get("/v1/customers/acme-1")).json()
    assert customer["test_clock"] == clock["id"] and customer["created"] == clock["frozen_time"]
    # bystanders: a subscription on another clock and one on the wall clock
    other_clock = await _clock(api, "2026-01-31T00:00:00Z")
    bystander = await _subscribe(api, "other-clock", other_clock)
    wall = await _subscribe(api, "wall", None)
    before = len(await log_of(tenant["id"]))

    r = await api.post(f"/v1/test_clocks/{clock['id']}/advance",
                       json={"frozen_time": "2026-04-30T12:00:00Z"})
    assert r.status_code == 200, r.text
    assert r.json() == {**clock, "frozen_time": "2026-04-30T12:00:00Z"}
    assert (await api.get(f"/v1/test_clocks/{clock['id']}")).json() == r.json()

    new = (await log_of(tenant["id"]))[before:]
    assert [e["type"] for e in new] == [
        "subscription.period_ended", "subscription.renewed",
        "subscription.period_ended", "subscription.renewed",
        "subscription.period_ended", "subscription.renewed",
        "test_clock.advanced",
    ]
    boundaries = ["2026-02-28T00:00:00Z", "2026-03-31T00:00:00Z", "2026-04-30T00:00:00Z"]
    starts = ["2026-01-31T00:00:00Z"] + boundaries
    ends = boundaries + ["2026-05-31T00:00:00Z"]
    for i in range(3):
        ended, renewed = new[2 * i], new[2 * i + 1]
        assert ended["aggregate_id"] == renewed["aggregate_id"] == sub["id"]
        assert ended["occurred_at"] == renewed["occurred_at"] == z(boundaries[i])
        d = ended["data"]
        assert (d["period_start"], d["period_end"], d["renews"], d["next_period_start"],
                d["next_period_end"]) == (starts[i], ends[i], True, starts[i + 1], ends[i + 1])
        assert (d["subscription"]["current_period_start"],
                d["subscription"]["current_period_end"]) == (starts[i], ends[i])
        assert d["subscription"]["customer_external_id"] == "acme-1"
        assert d["subscription"]["test_clock_id"] == clock["id"]
        s = renewed["data"]["subscription"]
        assert (s["current_period_start"], s["current_period_end"], s["status"]) == (
            starts[i + 1], ends[i + 1], "active")
    advanced = new[-1]
    assert advanced["aggregate_id"] == clock["id"]
    assert advanced["occurred_at"] == z("2026-04-30T12:00:00Z")
    assert advanced["data"] == {"test_clock_id": clock["id"],
                                "previous_time": "2026-01-31T00:00:00Z",
                                "frozen_time": "2026-04-30T12:00:00Z"}

    now = (await api.get(f"/v1/subscriptions/{sub['id']}")).json()
    assert (now["current_period_start"], now["current_period_end"], now["started_at"]) == (
        "2026-04-30T00:00:00Z", "2026-05-31T00:00:00Z", "2026-01-31T00:00:00Z")
    assert (await api.get(f"/v1/subscriptions/{bystander['id']}")).json() == bystander
    assert (await api.get(f"/v1/subscriptions/{wall['id']}")).json() == wall

    # a later subscription on the moved clock starts at the clock's time
    late = await _subscribe(api, "acme-2", clock)
    assert late["started_at"] == "2026-04-30T12:00:00Z"
    assert late["current_period_end"] == "2026-05-30T12:00:00Z"


async def test_a_repeated_advance_is_refused_and_a_retry_replays(host, api, tenant, log_of):
    assert (await api.post("/v1/plans", json=PLAN)).status_code == 201
    clock = await _clock(api, "2026-01-01T00:00:00Z")
    sub = await _subscribe(api, "acme-1", clock)
    url = f"/v1/test_clocks/{clock['id']}/advance"
    body = {"frozen_time": "2026-03-01T00:00:00Z"}
    key = {"Idempotency-Key": "advance-1"}

    first = await api.post(url, json=body, headers=key)
    assert first.status_code == 200, first.text
    count = len(await log_of(tenant["id"]))
    replay = await api.post(url, json=body, headers=key)
    assert replay.status_code == 200 and replay.json() == first.json()
    assert replay.headers["idempotent-replayed"] == "true"
    assert_error(await api.post(url, json={"frozen_time": "2026-04-01T00:00:00Z"},
                                headers=key), 422, "idempotency_key_reused")
    assert_error(await api.post(url, json=body), 400, "parameter_invalid", "frozen_time")
    assert_error(await api.post(url, json={"frozen_time": "2026-02-01T00:00:00Z"}), 400,
                 "parameter_invalid", "frozen_time")
    assert len(await log_of(tenant["id"])) == count

    renewed = await log_of(tenant["id"], ("subscription.renewed",))
    assert [e["data"]["subscription"]["current_period_start"] for e in renewed] == [
        "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"]
    row = await host.pool.fetchrow("SELECT period_index FROM subscriptions WHERE id = $1",
                                   sub["id"])
    assert row["period_index"] == 2


async def test_concurrent_advances_renew_once(api, tenant, log_of):
    assert (await api.post("/v1/plans", json=PLAN)).status_code == 201
    clock = await _clock(api, "2026-01-01T00:00:00Z")
    for i in range(3):
        await _subscribe(api, f"c{i}", clock)
    url = f"/v1/test_clocks/{clock['id']}/advance"
    results = await asyncio.gather(*[
        api.post(url, json={"frozen_time": "2026-07-01T00:00:00Z"}) for _ in range(4)])
    assert sorted(r.status_code for r in results) == [200, 400, 400, 400]
    assert len(await log_of(tenant["id"], ("subscription.renewed",))) == 3 * 6
    assert len(await log_of(tenant["id"], ("test_clock.advanced",))) == 1


async def test_advance_errors(api, live_api):
    assert_error(await api.post("/v1/test_clocks/clk_missing/advance",
                                json={"frozen_time": "2026-01-01T00:00:00Z"}),
                 404, "resource_missing")
    assert_error(await live_api.post("/v1/test_clocks/clk_x/advance",
                                     json={"frozen_time": "2026-01-01T00:00:00Z"}),
                 400, "test_mode_only")
    day_plan = {**PLAN, "code": "daily", "interval": "day"}
    assert (await api.post("/v1/plans", json=day_plan)).status_code == 201
    clock = await _clock(api, "2026-01-01T00:00:00Z")
    await api.post("/v1/customers", json={"external_id": "d", "test_clock": clock["id"]})
    await api.post("/v1/subscriptions", json={"customer": "d", "plan": "daily"})
    assert_error(await api.post(f"/v1/test_clocks/{clock['id']}/advance",
                                json={"frozen_time": "2036-01-01T00:00:00Z"}),
                 400, "parameter_invalid", "frozen_time")
    unchanged = (await api.get(f"/v1/test_clocks/{clock['id']}")).json()
    assert unchanged["frozen_time"] == "2026-01-01T00:00:00Z"


async def test_wall_clock_renewal(host, api, live_api, tenant, log_of):
    """The renewal task's transaction: due subscriptions without a clock renew period by
    period, once, even with several renewers running at the same time."""
    assert (await live_api.post("/v1/plans", json=PLAN)).status_code == 201
    assert (await api.post("/v1/plans", json=PLAN)).status_code == 201
    subs = [await _subscribe(live_api, f"live-{i}", None) for i in range(5)]
    clock = await _clock(api, "2026-01-01T00:00:00Z")
    on_clock = await _subscribe(api, "clocked", clock)
    started = z(subs[0]["started_at"])
    later = started + timedelta(days=95)  # three monthly boundaries, whatever the start day

    async def renewer() -> int:
        total = 0
        while n := await service.renew_due(host.pool, host.store, later, batch_size=2):
            total += n
        return total

    counts = await asyncio.gather(*[renewer() for _ in range(4)])
    assert sum(counts) == 5
    assert await service.renew_due(host.pool, host.store, later, 10) == 0

    renewed = await log_of(tenant["id"], ("subscription.renewed",))
    ended = await log_of(tenant["id"], ("subscription.period_ended",))
    assert len(renewed) == len(ended) == 15
    assert all(e["environment"] == "live" for e in renewed)
    for sub in subs:
        mine = [e for e in renewed if e["aggregate_id"] == sub["id"]]
        assert [e["data"]["subscription"]["current_period_start"] for e in mine] == [
            e["data"]["period_end"] for e in ended if e["aggregate_id"] == sub["id"]]
        starts = [z(e["data"]["subscription"]["current_period_start"]) for e in mine]
        assert starts == sorted(starts) and len(set(starts)) == 3
        now = (await live_api.get(f"/v1/subscriptions/{sub['id']}")).json()
        assert z(now["current_period_start"]) <= later < z(now["current_period_end"])
    assert (await api.get(f"/v1/subscriptions/{on_clock['id']}")).json() == on_clock
    assert datetime.now(UTC) < later  # the real task (wall clock) had nothing to do


async def test_the_renewal_task_renews_due_subscriptions(fresh_database, kafka_bootstrap):
    """The background task, as wired by build(): a backdated wall-clock subscription catches
    up on its own."""
    h = build(settings_for(fresh_database, kafka_bootstrap, renewal_interval_s="0.1"))
    await h.start(serve_http=False)
    try:
        async with client_for(h, ADMIN_TOKEN) as admin:
            tenant = (await admin.post("/admin/v1/tenants", json={"name": "T"})).json()
        async with client_for(h, tenant["keys"]["live"]["secret_key"]) as live:
            assert (await live.post("/v1/plans", json=PLAN)).status_code == 201
            assert (await live.post("/v1/customers", json={"external_id": "a"})).status_code == 201
            auth = AuthContext(tenant["id"], "live", "secret", "key_x")
            customer = await service.get_customer(h.pool, auth, "a")
            plan = await service.get_plan(h.pool, auth, "pro")
            backdated = Subscription.start(
                subscription_id=new_id("sub"), customer=customer, plan=plan,
                now=service.wall_clock() - timedelta(days=95))
            async with h.pool.acquire() as conn, conn.transaction():
                await repository.insert_subscription(conn, backdated)

            async def caught_up():
                sub = (await live.get(f"/v1/subscriptions/{backdated.id}")).json()
                return z(sub["current_period_end"]) > datetime.now(UTC) and sub

            sub = await eventually(caught_up, message="the task renewed the subscription")
        assert z(sub["current_period_start"]) <= datetime.now(UTC)
        assert sub["started_at"] == backdated.started_at.isoformat().replace("+00:00", "Z")
        renewed = await h.pool.fetch(
            "SELECT occurred_at FROM event_log WHERE type = 'subscription.renewed'"
            " AND aggregate_id = $1 ORDER BY seq", backdated.id)
        assert len(renewed) == 3
        assert [r["occurred_at"] for r in renewed] == sorted(r["occurred_at"] for r in renewed)
    finally:
        await h.stop()
