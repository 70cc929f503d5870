"""Metering against real PostgreSQL and broker: usage rows from usage.accepted (each event
once), GET /v1/usage, period summaries that sweep late usage, rebuild by replay."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from billstream_contracts.topics import USAGE_ACCEPTED
from billstream_metering.bootstrap import build
from billstream_runtime.ids import new_id
from billstream_testing.events import (
    AnyCaseEnvironmentEnvelope,
    envelope,
    publish,
    publish_records,
    relay_headers,
)
from billstream_testing.fixtures import unique
from billstream_testing.waiting import eventually
from metering_harness import (
    closed,
    Metering,
    metering_settings,
    period_ended,
    plan,
    amend,
    usage,
    void,
)

pytestmark = pytest.mark.integration

JAN = datetime(2026, 1, 1, tzinfo=UTC)
FEB = datetime(2026, 2, 1, tzinfo=UTC)
MAR = datetime(2026, 3, 1, tzinfo=UTC)
APR = datetime(2026, 4, 1, tzinfo=UTC)


async def test_usage_query_counts_each_event_once(metering: Metering):
    await metering.create_meter("api_calls")
    await metering.create_meter("peak", aggregation="max")
    await metering.create_meter("hits", aggregation="count")
    cus = await metering.create_customer("acme-1")
    events = [usage("acme-1", "api_calls", "1", JAN + timedelta(minutes=i), customer_id=cus)
              for i in range(1400)]
    events += [usage(cus, "api_calls", "50", JAN + timedelta(days=3), customer_id=cus)
               for _ in range(2)]  # sent by cus_ id
    events += [usage("acme-1", "api_calls", "0.25", JAN + timedelta(days=9)) for _ in range(98)]
    events += [
        usage("acme-1", "api_calls", "7", FEB, customer_id=cus),             # `to` is exclusive
        usage("acme-1", "api_calls", "7", JAN - timedelta(seconds=1)),       # before `from`
        usage("other", "api_calls", "7", JAN + timedelta(days=1)),           # another customer
        usage("acme-1", "peak", "3.5", JAN + timedelta(days=1)),
        usage("acme-1", "peak", "2", JAN + timedelta(days=2)),
        usage("acme-1", "hits", "9", JAN + timedelta(days=2)),
        usage("acme-1", "hits", "9", JAN + timedelta(days=3)),
    ]
    envs = [envelope(e, tenant_id=metering.tenant_id, source="ingestion",
                     aggregate_type="customer", aggregate_id=e.customer) for e in events]
    # Duplicates: the same envelopes redelivered, and the same usage in a new envelope.
    again = [envelope(e, tenant_id=metering.tenant_id, source="ingestion",
                      aggregate_type="customer", aggregate_id=e.customer) for e in events[:50]]
    await publish(metering.bootstrap, USAGE_ACCEPTED, *envs, *envs[:100], *again)
    await metering.wait_for_usage_rows(len(events))

    window = {"from_": "2026-01-01T00:00:00Z", "to": "2026-02-01T00:00:00Z"}
    r = await metering.get_usage(customer="acme-1", meter="api_calls", **window)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "object": "usage", "customer": "acme-1", "customer_id": cus, "meter": "api_calls",
        "aggregation": "sum", "from": "2026-01-01T00:00:00Z", "to": "2026-02-01T00:00:00Z",
        "value": "1524.5", "event_count": 1500,
    }
    by_id = (await metering.get_usage(customer=cus, meter="api_calls", **window)).json()
    assert (by_id["value"], by_id["event_count"], by_id["customer"]) == ("1524.5", 1500, cus)
    everything = (await metering.get_usage(customer="acme-1", meter="api_calls")).json()
    assert (everything["value"], everything["from"], everything["to"]) == ("1538.5", None, None)
    peak = (await metering.get_usage(customer="acme-1", meter="peak", **window)).json()
    assert (peak["aggregation"], peak["value"], peak["event_count"]) == ("max", "3.5", 2)
    hits = (await metering.get_usage(customer="acme-1", meter="hits", **window)).json()
    assert (hits["aggregation"], hits["value"], hits["event_count"]) == ("count", "2", 2)
    ghost = (await metering.get_usage(customer="ghost", meter="api_calls")).json()
    assert (ghost["customer_id"], ghost["value"], ghost["event_count"]) == (None, "0", 0)

    r = await metering.get_usage(customer="acme-1", meter="nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "meter"
    r = await metering.get_usage(customer="acme-1", meter="api_calls", from_="January")
    assert r.status_code == 400 and r.json()["error"]["param"] == "from"
    r = await metering.get_usage(customer="acme-1", meter="api_calls", from_=window["to"],
                                 to=window["from_"])
    assert r.status_code == 400
    r = await metering.get_usage(meter="api_calls")
    assert r.status_code == 400 and r.json()["error"]["code"] == "parameter_missing"
    publishable = await metering.add_key("publishable")
    async with metering.client(publishable) as c:
        # usage is merchant data: publishable keys only read entitlements and start checkouts
        r = await c.get("/v1/usage", params={"customer": "acme-1", "meter": "hits"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "secret_key_required"


async def test_usage_batches_count_each_usage_once(metering: Metering):
    """Ingestion logs usage as `usage.batch_accepted`: every usage of a batch is kept once,
    across a redelivered batch and a usage repeated in another batch; a meter's field is read
    per usage; a correction keyed like its batch applies."""
    from billstream_contracts.events import UsageBatchAccepted

    await metering.create_meter("api_calls")
    await metering.create_meter("tokens", field="tokens")
    cus = await metering.create_customer("acme-b")

    def batch(usages):
        data = UsageBatchAccepted(usages=list(usages))
        return envelope(data, tenant_id=metering.tenant_id, source=metering.source,
                        aggregate_type="usage_batch", aggregate_id=new_id("evt"),
                        sequence=next(metering.sequence))

    calls = [usage("acme-b", "api_calls", "2", JAN + timedelta(minutes=i), customer_id=cus)
             for i in range(700)]
    tokens = [usage("acme-b", "tokens", "1", JAN, properties={"tokens": n}) for n in (5, 7)]
    first, second = batch(calls[:400] + tokens), batch(calls[400:])
    repeat = batch(calls[390:410])  # usage already kept, in another envelope
    await metering.publish_log(first, second, first, repeat)
    await metering.wait_for_usage_rows(702)
    r = (await metering.get_usage(customer="acme-b", meter="api_calls")).json()
    assert (r["value"], r["event_count"]) == ("1400", 700)
    t = (await metering.get_usage(customer=cus, meter="tokens")).json()
    assert (t["value"], t["event_count"]) == ("12", 2)
    await metering.publish_log(metering.log_envelope(void(calls[0]), calls[0]))
    await metering.wait_for_corrections(1, "applied")
    r = (await metering.get_usage(customer="acme-b", meter="api_calls")).json()
    assert (r["value"], r["event_count"]) == ("1398", 699)


async def test_customer_and_meter_arriving_after_their_usage(metering: Metering):
    await metering.publish_usage(
        usage("late-co", "tokens", "1", JAN, properties={"tokens": 120}),
        usage("late-co", "tokens", "1", JAN, properties={"tokens": "0.5"}),
        usage("late-co", "tokens", "1", JAN, properties={}),
    )
    await metering.wait_for_usage_rows(3)
    await metering.create_meter("tokens", field="tokens")
    cus = await metering.create_customer("late-co")
    r = (await metering.get_usage(customer=cus, meter="tokens")).json()
    assert (r["customer_id"], r["value"], r["event_count"]) == (cus, "120.5", 3)
    rows = await metering.host.pool.fetch(
        "SELECT customer_id, properties FROM usage_records WHERE tenant_id = $1",
        metering.tenant_id)
    assert {(row["customer_id"], row["properties"]) for row in rows} == {(cus, None)}
    # Known meter from the start: the field is read as the usage arrives.
    await metering.publish_usage(usage("late-co", "tokens", "1", FEB,
                                       properties={"tokens": "2.25"}))
    await metering.wait_for_usage_rows(4)
    r = (await metering.get_usage(customer="late-co", meter="tokens")).json()
    assert (r["value"], r["event_count"]) == ("122.75", 4)
    assert await metering.host.pool.fetchval(  # attributed here though ingestion sent no id
        "SELECT count(*) FROM usage_records WHERE customer_id = $1", cus) == 4


async def test_usage_with_a_nul_in_its_properties_is_applied(metering: Metering):
    """Ingestion accepted such usage before it refused NUL; jsonb cannot store it, and the
    event used to be dead-lettered (its usage never billed) whenever its meter was unknown."""
    code = unique("tok")
    await metering.publish_usage(
        usage("nul-co", code, "1", JAN, properties={"tokens": 4, "note": "a\x00b",
                                                    "k\x00": 1}))
    await metering.wait_for_usage_rows(1)
    await metering.create_meter(code, field="tokens")
    cus = await metering.create_customer("nul-co")
    r = (await metering.get_usage(customer=cus, meter=code)).json()
    assert (r["value"], r["event_count"]) == ("4", 1)


@pytest.mark.parametrize("props, reason", [({"tokens": 4, "note": "a\x00b"}, None),
                                           ({"tokens": 4}, "typo\x00")])
async def test_an_amend_with_a_nul_is_applied(metering: Metering, props, reason):
    """Text and jsonb refuse NUL; a correction carrying one must not stop the consumer (and,
    dead-lettered, hold every close of the log)."""
    code = unique("api")
    await metering.create_meter(code)
    cus = await metering.create_customer(unique("acme-nul"))
    original = usage(cus, code, "2", JAN + timedelta(days=1), customer_id=cus)
    await metering.publish_usage(original)
    await metering.publish_corrections(original, amend(original, "3", props, reason=reason))
    await metering.publish_close(period_ended(cus, None, plan(code), JAN, FEB,
                                              subscription_id=new_id("sub")))
    [summary] = await metering.summaries(1)
    assert summary["data"]["usage"] == [
        {"charge_id": f"ch_{code}", "meter": code, "quantity": "3", "usage_count": 1}]


async def test_period_summaries_sweep_late_usage_once(metering: Metering):
    await metering.create_meter("api_calls")
    await metering.create_meter("seats", aggregation="max")
    await metering.create_meter("unused_meter")  # a plan's meters exist (subscription checks)
    cus = await metering.create_customer("acme-2")
    pro = plan("api_calls", "seats", "unused_meter")
    sub = new_id("sub")
    await metering.publish_usage(
        usage("acme-2", "api_calls", "100", JAN + timedelta(days=1), customer_id=cus),
        usage(cus, "api_calls", "0.5", JAN + timedelta(days=2), customer_id=cus),
        usage("acme-2", "api_calls", "1000", JAN - timedelta(days=1)),  # before started_at
        usage("acme-2", "seats", "4", JAN + timedelta(days=3)),
        usage("acme-2", "seats", "6", JAN + timedelta(days=4)),
        usage("acme-2", "storage", "9", JAN + timedelta(days=4)),  # not in the plan
        usage("acme-2", "api_calls", "5", FEB + timedelta(days=1)),  # next period
        usage("someone-else", "api_calls", "77", JAN + timedelta(days=1)),
    )
    await metering.wait_for_usage_rows(8)
    first = await metering.publish_close(
        period_ended(cus, "acme-2", pro, JAN, FEB, subscription_id=sub))
    [s1] = await metering.summaries(1)
    assert (s1["aggregate_type"], s1["aggregate_id"], s1["topic"]) == (
        "subscription", sub, "billstream.metering.events")
    assert s1["occurred_at"] == FEB
    data = s1["data"]
    assert data["subscription"]["subscription_id"] == sub
    assert (data["period_start"], data["period_end"], data["renews"]) == (
        "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", True)
    assert (data["next_period_start"], data["next_period_end"]) == (
        "2026-02-01T00:00:00Z", "2026-03-04T00:00:00Z")
    assert data["usage"] == [
        {"charge_id": "ch_api_calls", "meter": "api_calls", "quantity": "100.5",
         "usage_count": 2},
        {"charge_id": "ch_seats", "meter": "seats", "quantity": "6", "usage_count": 2},
        {"charge_id": "ch_unused_meter", "meter": "unused_meter", "quantity": "0",
         "usage_count": 0},
    ]

    # Late usage of January arrives after January was summarized; February has usage too.
    await metering.publish_usage(
        usage("acme-2", "api_calls", "20", JAN + timedelta(days=20), customer_id=cus),
        usage("acme-2", "seats", "2", FEB + timedelta(days=2)),
        usage("acme-2", "api_calls", "3", MAR + timedelta(days=1)),  # after the 2nd period
    )
    await metering.wait_for_usage_rows(11)
    # A redelivery of January's close is answered by nothing.
    await metering.redeliver(first)
    await metering.publish_close(
        period_ended(cus, "acme-2", pro, FEB, MAR, subscription_id=sub, started_at=JAN))
    s1_again, s2 = await metering.summaries(2)
    assert s1_again["id"] == s1["id"]
    assert s2["data"]["period_start"] == "2026-02-01T00:00:00Z"
    assert s2["data"]["usage"] == [
        {"charge_id": "ch_api_calls", "meter": "api_calls", "quantity": "25", "usage_count": 2},
        {"charge_id": "ch_seats", "meter": "seats", "quantity": "2", "usage_count": 1},
        {"charge_id": "ch_unused_meter", "meter": "unused_meter", "quantity": "0",
         "usage_count": 0},
    ]
    assert s2["causation_id"] is not None and s2["causation_id"] != s1["causation_id"]
    # Each swept row is billed by exactly one summary.
    counts = await metering.host.pool.fetch(
        "SELECT summary_id, count(*) AS n FROM usage_records WHERE tenant_id = $1"
        " GROUP BY summary_id ORDER BY n", metering.tenant_id)
    assert sorted(r["n"] for r in counts) == [3, 4, 4]  # 2 summaries; unswept: 4

    # A plan without usage charges, and a period without usage, still get their summary.
    bare = period_ended(cus, "acme-2", plan(), MAR, APR, subscription_id=new_id("sub"))
    await metering.publish_close(bare)
    all_summaries = await metering.summaries(3)
    assert len(all_summaries) == 3  # the replayed January end emitted nothing
    s3 = all_summaries[-1]
    assert s3["data"]["usage"] == []
    assert s3["data"]["subscription"]["subscription_id"] == bare.subscription.subscription_id


async def test_rebuilding_usage_never_bills_twice(fresh_database, kafka_bootstrap):
    group = unique("g")
    host = build(metering_settings(fresh_database, kafka_bootstrap, group))
    await host.start(serve_http=False)
    svc = Metering(host, kafka_bootstrap, unique("ten"), "")
    try:
        svc.key = await svc.add_key()
        await svc.create_meter("api_calls")
        cus = await svc.create_customer("acme-3")
        pro = plan("api_calls")
        sub = new_id("sub")
        await svc.publish_usage(*[usage("acme-3", "api_calls", "10", JAN + timedelta(hours=i))
                                  for i in range(5)])
        await svc.wait_for_usage_rows(5)
        await svc.publish_close(period_ended(cus, "acme-3", pro, JAN, FEB, subscription_id=sub))
        await svc.summaries(1)
    finally:
        await host.stop()

    assert await build(metering_settings(fresh_database, kafka_bootstrap, group)).rebuild(
        "usage") == 2
    host = build(metering_settings(fresh_database, kafka_bootstrap, group))
    await host.start(serve_http=False)
    svc.host = host
    try:
        await svc.wait_for_usage_rows(5)  # replayed from the topic
        assert await host.pool.fetchval(
            "SELECT count(*) FROM usage_records WHERE tenant_id = $1 AND summary_id IS NULL",
            svc.tenant_id) == 0
        await svc.publish_usage(usage("acme-3", "api_calls", "1", FEB + timedelta(days=1)))
        await svc.wait_for_usage_rows(6)
        await svc.publish_close(period_ended(cus, "acme-3", pro, FEB, MAR,
                                             subscription_id=sub, started_at=JAN))
        _, s2 = await svc.summaries(2)
        assert s2["data"]["usage"][0]["quantity"] == "1"
        assert s2["data"]["usage"][0]["usage_count"] == 1
    finally:
        await host.stop()


async def test_a_close_waits_for_every_usage_event_before_it_in_the_log(metering):
    """The close of January arrives before usage that ingestion accepted (and acknowledged)
    before it: metering holds the close until that usage is applied, then bills it all in
    January."""
    await metering.create_meter("api_calls")
    cus = await metering.create_customer("acme-9")
    sub = new_id("sub")
    early = [envelope(usage("acme-9", "api_calls", "7", JAN + timedelta(days=d), customer_id=cus),
                      tenant_id=metering.tenant_id, source=metering.source,
                      aggregate_type="customer", aggregate_id=f"{cus}-{d}",
                      sequence=next(metering.sequence))
             for d in range(6)]
    await metering.publish_close(period_ended(cus, "acme-9", plan("api_calls"), JAN, FEB,
                                              subscription_id=sub))

    async def waiting():
        return await metering.host.pool.fetchval(
            "SELECT count(*) FROM pending_closes WHERE source = $1", metering.source)

    await eventually(waiting, message="the close is held back")
    assert await metering.host.pool.fetchval(
        "SELECT count(*) FROM period_summaries WHERE tenant_id = $1", metering.tenant_id) == 0
    await publish(metering.bootstrap, USAGE_ACCEPTED, *reversed(early))
    [summary] = await metering.summaries(1)
    assert summary["data"]["usage"] == [
        {"charge_id": "ch_api_calls", "meter": "api_calls", "quantity": "42", "usage_count": 6}]
    assert await waiting() == 0


@pytest.mark.parametrize("run", [1, 2])  # twice in one process: nothing stale is kept
async def test_a_dead_lettered_usage_event_holds_its_close_until_it_is_redriven(metering, run):
    """Usage that metering cannot apply (a bug, a bad deploy) is dead-lettered so that the
    partition moves on, but it was accepted: the period close of its tenant right after it
    waits (it used to bill the period without it), says why, and bills it once the event is
    redriven. Another tenant's close, and this tenant's in the other environment, after it in
    the same log go ahead."""
    from billstream_metering import service

    await metering.create_meter("api_calls")
    cus = await metering.create_customer("acme-dl")
    consumer = next(c for c in metering.host.consumers if c.name.endswith(".usage"))
    applies = consumer.handlers["usage.accepted"]
    good, bad, late = (usage("acme-dl", "api_calls", q, JAN + timedelta(days=d), customer_id=cus)
                       for q, d in (("2", 1), ("5", 2), ("3", 3)))

    async def broken(ctx):
        if ctx.envelope.data["usage_id"] == bad.usage_id:
            raise RuntimeError("cannot apply this one")
        await applies(ctx)

    consumer.handlers["usage.accepted"] = broken
    await metering.publish_usage(good, bad)
    bad_seq = 2  # this log's second event; the close is the third (it requires 1..2)
    close = await metering.publish_close(period_ended(cus, "acme-dl", plan("api_calls"), JAN,
                                                      FEB, subscription_id=new_id("sub")))
    await metering.publish_usage(late)  # after the close in the log: the next period's
    others = [(unique("ten"), "test"), (metering.tenant_id, "live")]
    for tenant, environment in others:
        sub = new_id("sub")
        await publish(metering.bootstrap, USAGE_ACCEPTED, envelope(
            closed(period_ended(new_id("cus"), None, plan(), JAN, FEB, subscription_id=sub)),
            tenant_id=tenant, environment=environment, source=metering.source,
            aggregate_type="customer", aggregate_id=sub, occurred_at=FEB,
            sequence=next(metering.sequence)))
    pool = metering.host.pool
    # (its own dead letter: the topic holds earlier tests' events too)
    await metering.wait_for("SELECT 1 FROM dead_letters WHERE consumer = $1 AND"
                            " position($2::bytea IN payload) > 0", consumer.name,
                            bad.usage_id.encode())
    await metering.wait_for("SELECT 1 FROM pending_closes WHERE event_id = $1", close.id)
    await metering.wait_for_usage_rows(2)
    summarized = ("SELECT data FROM event_log WHERE tenant_id = $1 AND environment = $2"
                  " AND type = 'usage.period_summarized'")
    for tenant, environment in others:  # not held
        await metering.wait_for(summarized, tenant, environment)
    # Every event of the log but one is applied, and the close is pending: it stays so.
    await service.close_due_periods(pool, metering.host.store, consumer.name)
    assert await pool.fetchval("SELECT 1 FROM pending_closes WHERE event_id = $1", close.id)
    assert await pool.fetchval(summarized, metering.tenant_id, "test") is None
    assert (bad_seq, metering.tenant_id, "test") in service._HELD.values()  # logged, once

    consumer.handlers["usage.accepted"] = applies  # the fix is deployed
    done = await metering.host.redrive("usage")
    assert done.applied >= 1 and done.dead_lettered_again == 0
    await metering.wait_for(summarized, metering.tenant_id, "test")
    summary = await pool.fetchval(summarized, metering.tenant_id, "test")
    assert summary["usage"] == [
        {"charge_id": "ch_api_calls", "meter": "api_calls", "quantity": "7", "usage_count": 2}]
    assert await pool.fetchval("SELECT status FROM inbox WHERE consumer = $1 AND sequence = $2"
                               " AND source = $3", consumer.name, bad_seq,
                               metering.source) == "applied"
    again = await metering.host.redrive("usage")  # nothing left
    assert (again.applied, again.dead_lettered_again) == (0, 0)
    await metering.wait_for_usage_rows(3)


async def test_usage_metering_cannot_read_holds_the_closes_after_it(metering, monkeypatch):
    """A usage record metering cannot read as an envelope (a producer bug, a version it does
    not know yet) still takes its place in the source's progress: ingestion's relay names the
    event in the record's headers. It used to leave a hole that stopped every close of the
    source without a word on why. Now it is dead-lettered under its event id, the closes after it
    wait (every tenant's: whose usage it is cannot be read) and the wait is logged; once a
    version that reads it is deployed, `redrive usage` applies it and the close bills it."""
    from billstream_messaging import consumer as consumer_module
    from billstream_metering import service

    await metering.create_meter("api_calls")
    cus = await metering.create_customer("acme-mf")
    consumer = next(c for c in metering.host.consumers if c.name.endswith(".usage"))
    await metering.publish_usage(
        usage("acme-mf", "api_calls", "2", JAN + timedelta(days=1), customer_id=cus))
    unread = metering.log_envelope(
        usage("acme-mf", "api_calls", "5", JAN + timedelta(days=2), customer_id=cus))
    value = {**orjson.loads(unread.model_dump_json()), "environment": "TEST"}
    await publish_records(metering.bootstrap, USAGE_ACCEPTED,
                          (unread.key.encode(), orjson.dumps(value), relay_headers(unread)))
    close = await metering.publish_close(period_ended(cus, "acme-mf", plan("api_calls"), JAN,
                                                      FEB, subscription_id=new_id("sub")))
    other = unique("ten")
    sub = new_id("sub")
    other_close = envelope(
        closed(period_ended(new_id("cus"), None, plan(), JAN, FEB, subscription_id=sub)),
        tenant_id=other, source=metering.source, aggregate_type="customer", aggregate_id=sub,
        occurred_at=FEB, sequence=next(metering.sequence))
    await metering.publish_log(other_close)
    pool = metering.host.pool
    await metering.wait_for("SELECT 1 FROM dead_letters WHERE consumer = $1 AND event_id = $2",
                            consumer.name, unread.id)
    for env in (close, other_close):
        await metering.wait_for("SELECT 1 FROM inbox WHERE consumer = $1 AND event_id = $2",
                                consumer.name, env.id)
    await service.close_due_periods(pool, metering.host.store, consumer.name)
    assert await pool.fetchval("SELECT seq FROM source_watermarks WHERE source = $1",
                               metering.source) == other_close.sequence  # no hole
    pending = await pool.fetch("SELECT event_id FROM pending_closes WHERE source = $1",
                               metering.source)
    assert {r["event_id"] for r in pending} == {close.id, other_close.id}
    assert service._HELD[unread.id] == (unread.sequence, None, None)  # logged, once

    monkeypatch.setattr(consumer_module, "Envelope", AnyCaseEnvironmentEnvelope)  # the fix, deployed
    done = await metering.host.redrive("usage")
    assert done.applied >= 1 and done.dead_lettered_again == 0
    summarized = ("SELECT data FROM event_log WHERE tenant_id = $1 AND environment = 'test'"
                  " AND type = 'usage.period_summarized'")
    await metering.wait_for(summarized, other)
    await metering.wait_for(summarized, metering.tenant_id)
    summary = await pool.fetchval(summarized, metering.tenant_id)
    assert summary["usage"] == [
        {"charge_id": "ch_api_calls", "meter": "api_calls", "quantity": "7", "usage_count": 2}]


async def test_a_close_waits_for_its_meters_to_be_known(metering):
    """Metering applied the usage and the close before the catalog told it about the meter
    (the catalog consumer lags, or is being rebuilt). The close waits for `meter.created`:
    summarized before it, a `max` meter was billed as a sum, and the rows' values were then
    recomputed, so the usage query no longer agreed with the invoice."""
    from billstream_metering import service

    cus = await metering.create_customer("acme-mx")
    code = unique("peak")
    await metering.publish_usage(*(usage("acme-mx", code, q, JAN + timedelta(days=d),
                                         customer_id=cus)
                                   for d, q in enumerate(("3", "7", "5"))))
    close = await metering.publish_close(period_ended(cus, "acme-mx", plan(code), JAN, FEB,
                                                      subscription_id=new_id("sub")))
    pool = metering.host.pool
    await metering.wait_for_usage_rows(3)
    await metering.wait_for("SELECT 1 FROM pending_closes WHERE event_id = $1", close.id)
    consumer = next(c.name for c in metering.host.consumers if c.name.endswith(".usage"))
    await service.close_due_periods(pool, metering.host.store, consumer)
    waits = "SELECT waits_for_meters FROM pending_closes WHERE event_id = $1"
    assert await pool.fetchval(waits, close.id) == [code]  # passed over until it comes

    await metering.create_meter(code, aggregation="max")
    [summary] = await metering.summaries(1)
    assert summary["data"]["usage"] == [
        {"charge_id": f"ch_{code}", "meter": code, "quantity": "7", "usage_count": 3}]
    r = (await metering.get_usage(customer=cus, meter=code, from_="2026-01-01T00:00:00Z",
                                  to="2026-02-01T00:00:00Z")).json()
    assert (r["value"], r["event_count"]) == ("7", 3)


async def test_closes_waiting_for_a_meter_are_looked_at_once_until_it_comes(metering,
                                                                          monkeypatch):
    """At a month end with the catalog consumer behind, thousands of closes may wait: each is
    looked at (and logged) once, not again on every pass of every replica."""
    from billstream_metering import service

    code, source, n = unique("late"), unique("src"), 300
    cus = await metering.create_customer("acme-many")
    mine = {new_id("evt") for _ in range(n)}
    looked, logged = [], []
    checks = service._waits_for_meters

    async def counted(conn, scope, data, event_id):
        if event_id in mine:  # (earlier tests' closes come again on the shared topic)
            looked.append(event_id)
        return await checks(conn, scope, data, event_id)

    monkeypatch.setattr(service, "_waits_for_meters", counted)
    monkeypatch.setattr(service.log, "warning", lambda event, **kw: logged.append(
        kw.get("event_id")) if event == "period_close_waits_for_meter" else None)
    async with metering.host.pool.acquire() as conn:  # (the background task counts too)
        await conn.executemany(
            "INSERT INTO pending_closes (event_id, tenant_id, environment, source,"
            " required_seq, data) VALUES ($1, $2, 'test', $3, 0, $4)",
            [(event_id, metering.tenant_id, source, closed(period_ended(
                cus, "acme-many", plan(code), JAN, FEB, subscription_id=new_id("sub")
            )).model_dump(mode="json")) for event_id in mine])
    consumer = next(c.name for c in metering.host.consumers if c.name.endswith(".usage"))
    for _ in range(2):
        await service.close_due_periods(metering.host.pool, metering.host.store, consumer)
    # each once, over both passes (the background task may take some)
    assert sorted(looked) == sorted(mine)
    assert sorted(e for e in logged if e in mine) == sorted(mine)
    await metering.create_meter(code)
    await eventually(lambda: _eq(metering.host.pool.fetchval(
        "SELECT count(*) FROM pending_closes WHERE source = $1", source), 0),
        message="every close summarized once its meter came")


async def test_a_close_never_waits_on_a_meter_lock_a_batch_holds(metering):
    """A catalog batch learning meters b then a, and a close of a plan with a and b that
    metering knows neither of: the close used to wait for b's lock holding a's, and the two
    deadlocked. It now passes the close over for this pass, unmarked, and bills it later."""
    from billstream_contracts.events import MeterCreated
    from billstream_metering import service

    a, b = sorted((unique("ma"), unique("mb")))
    cus = await metering.create_customer("acme-lock")
    close_id, source = new_id("evt"), unique("src")
    pool = metering.host.pool
    scope = service.Scope(metering.tenant_id, "test")
    consumer = next(c.name for c in metering.host.consumers if c.name.endswith(".usage"))
    async with pool.acquire() as catalog, catalog.transaction():
        for code in (b, a):
            await service.learn_meter(catalog, scope, MeterCreated(
                meter_id=new_id("mtr"), code=code, aggregation="sum",
                created_at=datetime.now(UTC)))
            if code == b:  # b's lock held: a pass neither waits for it nor marks the close
                await pool.execute(  # (only now: before, a pass would mark it, rightly)
                    "INSERT INTO pending_closes (event_id, tenant_id, environment, source,"
                    " required_seq, data) VALUES ($1, $2, 'test', $3, 0, $4)", close_id,
                    metering.tenant_id, source,
                    closed(period_ended(cus, "acme-lock", plan(a, b), JAN, FEB,
                                        subscription_id=new_id("sub"))).model_dump(mode="json"))
                await asyncio.wait_for(
                    service.close_due_periods(pool, metering.host.store, consumer), 20)
                row = await pool.fetchrow(
                    "SELECT waits_for_meters FROM pending_closes WHERE event_id = $1", close_id)
                assert row is not None and row["waits_for_meters"] is None
    await eventually(lambda: _eq(pool.fetchval(
        "SELECT count(*) FROM pending_closes WHERE event_id = $1", close_id), 0),
        message="the close summarized once both meters are known")


async def _eq(awaitable, expected) -> bool:
    return await awaitable == expected


async def test_a_later_close_waits_for_an_earlier_one_being_summarized(metering):
    """Two replicas: while one holds January's close, the other must not take February's."""
    from billstream_metering import repository

    await metering.create_meter("api_calls")
    cus = await metering.create_customer("acme-r")
    sub, pro = new_id("sub"), plan("api_calls")
    pool = metering.host.pool
    async with pool.acquire() as conn:
        for start, end in ((JAN, FEB), (FEB, MAR)):
            period = period_ended(cus, "acme-r", pro, start, end, subscription_id=sub)
            await conn.execute(
                "INSERT INTO pending_closes (event_id, tenant_id, environment, source,"
                " required_seq, data) VALUES ($1, $2, 'test', 'replicas', $3, $4)",
                new_id("evt"), metering.tenant_id, 1 if start == JAN else 2,
                closed(period).model_dump(mode="json"))
    async with pool.acquire() as a, a.transaction():
        january = await repository.claim_due_close(a, "replicas", 10)
        assert january["required_seq"] == 1
        async with pool.acquire() as b, b.transaction():
            assert await repository.claim_due_close(b, "replicas", 10) is None
        await repository.delete_pending_close(a, january["event_id"])
    async with pool.acquire() as b, b.transaction():
        assert (await repository.claim_due_close(b, "replicas", 10))["required_seq"] == 2
