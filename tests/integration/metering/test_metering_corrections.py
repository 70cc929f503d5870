"""Metering applies usage corrections (`usage.voided`, `usage.amended` on ingestion's log):
usage totals and period summaries follow them, each once, in log order whatever the arrival
order, never changing what was billed; a rebuild by replay ends with the same totals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from billstream_metering import service
from billstream_metering.bootstrap import build
from billstream_runtime.ids import new_id
from billstream_testing.events import envelope
from billstream_testing.fixtures import unique
from metering_harness import (
    amend,
    Metering,
    metering_settings,
    period_ended,
    plan,
    usage,
    void,
)

pytestmark = pytest.mark.integration

JAN = datetime(2026, 1, 1, tzinfo=UTC)
FEB = datetime(2026, 2, 1, tzinfo=UTC)
MAR = datetime(2026, 3, 1, tzinfo=UTC)


async def totals(metering: Metering, customer: str, meter: str, **window) -> tuple[str, int]:
    r = await metering.get_usage(customer=customer, meter=meter, **window)
    assert r.status_code == 200, r.text
    return r.json()["value"], r.json()["event_count"]


async def test_a_void_drops_the_event_from_every_aggregate(metering: Metering):
    await metering.create_meter("api_calls")
    await metering.create_meter("peak", aggregation="max")
    await metering.create_meter("hits", aggregation="count")
    cus = await metering.create_customer("void-co")
    calls = [usage("void-co", "api_calls", q, JAN + timedelta(days=i), customer_id=cus)
             for i, q in enumerate(("1", "2", "4"))]
    peaks = [usage("void-co", "peak", q, JAN, customer_id=cus) for q in ("3.5", "2")]
    hits = [usage("void-co", "hits", "9", JAN, customer_id=cus) for _ in range(2)]
    await metering.publish_usage(*calls, *peaks, *hits)
    await metering.wait_for_usage_rows(7)
    assert await totals(metering, "void-co", "api_calls") == ("7", 3)

    [voided] = await metering.publish_corrections(calls[1], void(calls[1], reason="test"))
    await metering.publish_corrections(peaks[0], void(peaks[0]))
    await metering.publish_corrections(hits[0], void(hits[0]))
    await metering.wait_for_corrections(3, "applied")

    assert await totals(metering, "void-co", "api_calls") == ("5", 2)
    assert await totals(metering, cus, "api_calls") == ("5", 2)
    assert await totals(metering, "void-co", "peak") == ("2", 1)
    assert await totals(metering, "void-co", "hits") == ("1", 1)
    # The original row stays, with its quantity; the history says what happened.
    row = await metering.usage_row(calls[1].usage_id)
    assert (row["quantity"], row["value"], row["summary_id"]) == (Decimal(2), Decimal(2), None)
    assert row["voided_at"] == voided.occurred_at
    assert row["correction_id"] == voided.data["correction_id"]
    [history] = await metering.corrections(calls[1].usage_id)
    assert (history["kind"], history["status"], history["reason"], history["event_id"]) == (
        "void", "applied", "test", voided.id)
    assert history["previous_quantity"] == Decimal(2)


async def test_an_amended_quantity_replaces_the_original(metering: Metering):
    await metering.create_meter("api_calls")
    cus = await metering.create_customer("amend-co")
    events = [usage("amend-co", "api_calls", q, JAN, customer_id=cus) for q in ("1", "2", "4")]
    await metering.publish_usage(*events)
    await metering.wait_for_usage_rows(3)
    await metering.publish_corrections(events[1], amend(events[1], "10.5"))
    await metering.wait_for_corrections(1, "applied")

    assert await totals(metering, "amend-co", "api_calls") == ("15.5", 3)
    row = await metering.usage_row(events[1].usage_id)
    assert (row["quantity"], row["value"], row["original_quantity"]) == (
        Decimal("10.5"), Decimal("10.5"), Decimal(2))
    [history] = await metering.corrections(events[1].usage_id)
    assert (history["kind"], history["quantity"], history["previous_quantity"]) == (
        "amend", Decimal("10.5"), Decimal(2))

    # A second amend replaces the first; the accepted quantity stays the original.
    await metering.publish_corrections(events[1], amend(events[1], "3"))
    await metering.wait_for_corrections(2, "applied")
    assert await totals(metering, "amend-co", "api_calls") == ("8", 3)
    row = await metering.usage_row(events[1].usage_id)
    assert (row["quantity"], row["original_quantity"]) == (Decimal(3), Decimal(2))
    assert [h["previous_quantity"] for h in await metering.corrections(events[1].usage_id)] == [
        Decimal(2), Decimal("10.5")]


async def test_amended_properties_give_a_field_meter_its_new_value(metering: Metering):
    await metering.create_meter("tokens", field="tokens")
    cus = await metering.create_customer("props-co")
    known = [usage("props-co", "tokens", "1", JAN, customer_id=cus, properties={"tokens": 100}),
             usage("props-co", "tokens", "1", JAN, customer_id=cus, properties={"tokens": 7})]
    # A meter not known here yet: the amended properties are kept to compute its value later.
    later = usage("props-co", "words", "1", JAN, customer_id=cus, properties={"words": 40})
    await metering.publish_usage(*known, later)
    await metering.wait_for_usage_rows(3)
    await metering.publish_corrections(known[0], amend(known[0], "1", {"tokens": "2.5"}))
    await metering.publish_corrections(known[1], amend(known[1], "1", {"other": 1}))
    await metering.publish_corrections(later, amend(later, "1", {"words": 12}))
    await metering.wait_for_corrections(3, "applied")

    # 2.5 + an event without a usable number (counted, no value)
    assert await totals(metering, "props-co", "tokens") == ("2.5", 2)
    assert (await metering.usage_row(known[0].usage_id))["properties"] is None
    assert (await metering.usage_row(later.usage_id))["properties"] == {"words": 12}
    await metering.create_meter("words", field="words")
    assert await totals(metering, "props-co", "words") == ("12", 1)


async def test_a_voided_event_is_never_billed(metering: Metering):
    await metering.create_meter("api_calls")
    cus = await metering.create_customer("bill-co")
    pro, sub = plan("api_calls"), new_id("sub")
    events = [usage("bill-co", "api_calls", q, JAN + timedelta(days=1), customer_id=cus)
              for q in ("10", "20", "5")]
    await metering.publish_usage(*events)
    await metering.publish_corrections(events[1], void(events[1]))
    await metering.publish_corrections(events[2], amend(events[2], "7"))
    # The close follows the corrections in the log: it waits for them.
    await metering.publish_close(period_ended(cus, "bill-co", pro, JAN, FEB, subscription_id=sub))
    [s1] = await metering.summaries(1)
    assert s1["data"]["usage"] == [
        {"charge_id": "ch_api_calls", "meter": "api_calls", "quantity": "17", "usage_count": 2}]
    assert (await metering.usage_row(events[1].usage_id))["summary_id"] is None

    # The voided January event is not swept as late usage by the next period either.
    await metering.publish_close(period_ended(cus, "bill-co", pro, FEB, MAR,
                                              subscription_id=sub, started_at=JAN))
    _, s2 = await metering.summaries(2)
    assert s2["data"]["usage"] == [
        {"charge_id": "ch_api_calls", "meter": "api_calls", "quantity": "0", "usage_count": 0}]
    assert (await metering.usage_row(events[1].usage_id))["summary_id"] is None


async def test_a_redelivered_correction_applies_once(metering: Metering):
    await metering.create_meter("api_calls")
    cus = await metering.create_customer("again-co")
    events = [usage("again-co", "api_calls", q, JAN, customer_id=cus) for q in ("1", "2", "4")]
    await metering.publish_usage(*events)
    await metering.wait_for_usage_rows(3)
    first, second = await metering.publish_corrections(
        events[0], amend(events[0], "5"), amend(events[0], "9"))
    [voided] = await metering.publish_corrections(events[1], void(events[1]))
    await metering.wait_for_corrections(3, "applied")

    # The same envelopes twice each, and the first amend re-sent in a new envelope (same
    # correction, same log position): none of them may bring the first amend back.
    resent = envelope(first.data, type=first.type, tenant_id=first.tenant_id,
                      source=first.source, aggregate_type=first.aggregate_type,
                      aggregate_id=first.aggregate_id, sequence=first.sequence)
    await metering.publish_log(first, voided, first, voided, resent)
    # A later event with the same key (same partition, after them): once it is applied, so are
    # the redeliveries.
    marker = usage("again-co", "api_calls", "100", JAN, customer_id=cus)
    await metering.publish_usage(marker)
    await metering.wait_for_usage_rows(4)

    assert await totals(metering, "again-co", "api_calls") == ("113", 3)
    history = await metering.corrections(events[0].usage_id)
    assert [(h["correction_id"], h["status"]) for h in history] == [
        (first.data["correction_id"], "applied"), (second.data["correction_id"], "applied")]
    assert len(await metering.corrections(events[1].usage_id)) == 1


async def test_corrections_win_in_log_order_whatever_the_arrival_order(metering: Metering):
    await metering.create_meter("api_calls")
    cus = await metering.create_customer("order-co")
    amended = usage("order-co", "api_calls", "1", JAN, customer_id=cus)
    voided = usage("order-co", "api_calls", "1", JAN, customer_id=cus)
    await metering.publish_usage(amended, voided)
    await metering.wait_for_usage_rows(2)
    lower = metering.log_envelope(amend(amended, "5"), amended)
    higher = metering.log_envelope(amend(amended, "9"), amended)
    void_first = metering.log_envelope(void(voided), voided)
    amend_after = metering.log_envelope(amend(voided, "50"), voided)
    # Delivered in reverse sequence order.
    await metering.publish_log(higher, lower, amend_after, void_first)
    await metering.wait_for_corrections(4)

    assert await totals(metering, "order-co", "api_calls") == ("9", 1)
    row = await metering.usage_row(amended.usage_id)
    assert (row["quantity"], row["correction_id"], row["correction_seq"]) == (
        Decimal(9), higher.data["correction_id"], higher.sequence)
    assert [h["status"] for h in await metering.corrections(amended.usage_id)] == [
        "superseded", "applied"]
    # A void is final, even after an amend of a higher sequence was applied.
    assert (await metering.usage_row(voided.usage_id))["voided_at"] is not None


async def test_a_correction_of_billed_usage_leaves_the_billed_period_unchanged(
        metering: Metering):
    await metering.create_meter("api_calls")
    cus = await metering.create_customer("late-fix-co")
    pro, sub = plan("api_calls"), new_id("sub")
    events = [usage("late-fix-co", "api_calls", q, JAN + timedelta(days=2), customer_id=cus)
              for q in ("10", "20")]
    await metering.publish_usage(*events)
    await metering.publish_close(period_ended(cus, "late-fix-co", pro, JAN, FEB,
                                              subscription_id=sub))
    [s1] = await metering.summaries(1)
    assert s1["data"]["usage"][0]["quantity"] == "30"

    # Ingestion refuses these; metering is defensive: recorded, refused, logged.
    await metering.publish_corrections(events[0], amend(events[0], "100"))
    await metering.publish_corrections(events[1], void(events[1]))
    await metering.wait_for_corrections(2, "billed")

    january = {"from_": "2026-01-01T00:00:00Z", "to": "2026-02-01T00:00:00Z"}
    assert await totals(metering, "late-fix-co", "api_calls", **january) == ("30", 2)
    for event, quantity in zip(events, (Decimal(10), Decimal(20))):
        row = await metering.usage_row(event.usage_id)
        assert (row["quantity"], row["voided_at"], row["correction_id"]) == (
            quantity, None, None)
        assert row["summary_id"] is not None
    # Nothing is billed again, or taken back, in the next period.
    await metering.publish_close(period_ended(cus, "late-fix-co", pro, FEB, MAR,
                                              subscription_id=sub, started_at=JAN))
    s1_again, s2 = await metering.summaries(2)
    assert s1_again["data"] == s1["data"]
    assert s2["data"]["usage"] == [
        {"charge_id": "ch_api_calls", "meter": "api_calls", "quantity": "0", "usage_count": 0}]


async def test_a_correction_arriving_before_its_usage_waits_for_it(metering: Metering):
    await metering.create_meter("api_calls")
    cus = await metering.create_customer("early-co")
    amended = usage("early-co", "api_calls", "1", JAN, customer_id=cus)
    voided = usage("early-co", "api_calls", "2", JAN, customer_id=cus)
    kept = usage("early-co", "api_calls", "4", JAN, customer_id=cus)
    originals = [metering.log_envelope(u) for u in (amended, voided, kept)]
    corrections = [metering.log_envelope(amend(amended, "6"), amended),
                   metering.log_envelope(void(voided), voided)]
    await metering.publish_log(*corrections)
    await metering.wait_for_corrections(2, "pending")
    await metering.publish_log(*originals)
    await metering.wait_for_usage_rows(3)
    await metering.wait_for_corrections(2, "applied")
    assert await totals(metering, "early-co", "api_calls") == ("10", 2)
    assert (await metering.usage_row(amended.usage_id))["original_quantity"] == Decimal(1)


async def test_rebuilding_usage_replays_corrections_to_the_same_totals(fresh_database,
                                                                     kafka_bootstrap):
    group = unique("g")
    host = build(metering_settings(fresh_database, kafka_bootstrap, group))
    await host.start(serve_http=False)
    svc = Metering(host, kafka_bootstrap, unique("ten"), "")
    pro, sub = plan("api_calls"), new_id("sub")

    async def snapshot() -> tuple:
        rows = await svc.host.pool.fetch(
            "SELECT usage_id, quantity, value, original_quantity, voided_at, summary_id,"
            "       correction_id FROM usage_records WHERE tenant_id = $1 ORDER BY usage_id",
            svc.tenant_id)
        history = await svc.host.pool.fetch(
            "SELECT correction_id, status, previous_quantity FROM usage_corrections"
            " WHERE tenant_id = $1 ORDER BY correction_id", svc.tenant_id)
        usage_totals = [await totals(svc, "rb-co", "api_calls", **window) for window in (
            {}, {"from_": "2026-01-01T00:00:00Z", "to": "2026-02-01T00:00:00Z"})]
        return [dict(r) for r in rows], [dict(r) for r in history], usage_totals

    try:
        svc.key = await svc.add_key()
        await svc.create_meter("api_calls")
        cus = await svc.create_customer("rb-co")
        jan = [usage("rb-co", "api_calls", "10", JAN + timedelta(hours=i), customer_id=cus)
               for i in range(5)]
        feb = usage("rb-co", "api_calls", "1", FEB + timedelta(days=1), customer_id=cus)
        await svc.publish_usage(*jan)
        await svc.publish_corrections(jan[0], amend(jan[0], "50"), amend(jan[0], "60"))
        await svc.publish_corrections(jan[1], void(jan[1]))
        await svc.publish_close(period_ended(cus, "rb-co", pro, JAN, FEB, subscription_id=sub))
        [s1] = await svc.summaries(1)
        assert s1["data"]["usage"][0]["quantity"] == "90"  # 60 + 3 × 10
        # After the close: refused (billed), and corrections of unbilled usage.
        await svc.publish_corrections(jan[2], amend(jan[2], "99"))
        await svc.publish_corrections(jan[0], amend(jan[0], "70"))
        await svc.publish_corrections(jan[3], void(jan[3]))
        await svc.publish_usage(feb)
        await svc.publish_corrections(feb, amend(feb, "3"))
        await svc.wait_for_usage_rows(6)
        await svc.wait_for_corrections(7)
        before = await snapshot()
        assert before[2] == [("93", 5), ("90", 4)]
    finally:
        await host.stop()

    assert await build(metering_settings(fresh_database, kafka_bootstrap, group)).rebuild(
        "usage") == 2
    host = build(metering_settings(fresh_database, kafka_bootstrap, group))
    await host.start(serve_http=False)
    svc.host = host
    try:
        await svc.wait_for_usage_rows(6)  # replayed from the topic
        await svc.wait_for_corrections(7)
        assert await snapshot() == before
        await svc.publish_close(period_ended(cus, "rb-co", pro, FEB, MAR,
                                             subscription_id=sub, started_at=JAN))
        _, s2 = await svc.summaries(2)
        assert s2["data"]["usage"][0]["quantity"] == "3"
        assert s2["data"]["usage"][0]["usage_count"] == 1
    finally:
        await host.stop()


async def test_a_pending_correction_applies_as_its_usage_row_is_inserted(metering: Metering):
    """The insert path itself, in one transaction (the close task's reconciliation cannot see
    uncommitted rows, so only record_usage can have applied it)."""
    await metering.create_meter("api_calls")
    original = usage("direct-co", "api_calls", "2", JAN)
    correction = amend(original, "8")
    env = metering.log_envelope(correction, original)
    scope = service.Scope(metering.tenant_id, "test")
    async with metering.host.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            assert await service.correct_usage(conn, env, correction) == "pending"
            await service.record_usage(conn, scope, original)
            row = await conn.fetchrow("SELECT quantity, original_quantity, correction_id"
                                      " FROM usage_records WHERE usage_id = $1",
                                      original.usage_id)
            assert tuple(row) == (Decimal(8), Decimal(2), correction.correction_id)
            assert await conn.fetchval(
                "SELECT status FROM usage_corrections WHERE correction_id = $1",
                correction.correction_id) == "applied"
        finally:
            await tx.rollback()


async def test_a_correction_racing_its_usage_row_is_applied_by_the_close_task(
        metering: Metering):
    """A correction and its usage applied at the same time (two partitions, two consumers):
    neither transaction sees the other's row; the close task's reconciliation applies it."""
    await metering.create_meter("api_calls")
    original = usage("race-co", "api_calls", "2", JAN)
    correction = void(original)
    env = metering.log_envelope(correction, original)
    scope = service.Scope(metering.tenant_id, "test")
    pool = metering.host.pool
    async with pool.acquire() as a, pool.acquire() as b:
        tx_a, tx_b = a.transaction(), b.transaction()
        await tx_a.start()
        await tx_b.start()
        assert await service.correct_usage(a, env, correction) == "pending"
        await service.record_usage(b, scope, original)
        await tx_b.commit()
        await tx_a.commit()
    await metering.wait_for_corrections(1, "applied")
    assert await totals(metering, "race-co", "api_calls") == ("0", 0)


async def test_a_close_bills_only_the_usage_before_it_in_the_log(metering: Metering):
    """Usage accepted after a close (backdated into its period) is the next close's, even when
    metering applied it before the close task ran: which close bills an event is a fact of the
    log, which is what lets ingestion refuse corrections of billed usage exactly."""
    from metering_harness import closed

    await metering.create_meter("api_calls")
    cus = await metering.create_customer("order-co")
    pro, sub = plan("api_calls"), new_id("sub")
    before = usage("order-co", "api_calls", "10", JAN + timedelta(days=4), customer_id=cus)
    after = usage("order-co", "api_calls", "3", JAN + timedelta(days=5), customer_id=cus)
    await metering.publish_usage(before)
    jan = period_ended(cus, "order-co", pro, JAN, FEB, subscription_id=sub)
    close = envelope(closed(jan), tenant_id=metering.tenant_id, source=metering.source,
                     aggregate_type="customer", aggregate_id=cus, occurred_at=FEB,
                     sequence=next(metering.sequence))
    await metering.publish_log(metering.log_envelope(after))  # after the close in the log...
    await metering.wait_for_usage_rows(2)  # ...but applied before metering sees the close
    await metering.publish_log(close)
    [s1] = await metering.summaries(1)
    assert s1["data"]["usage"] == [
        {"charge_id": "ch_api_calls", "meter": "api_calls", "quantity": "10", "usage_count": 1}]
    await metering.publish_close(period_ended(cus, "order-co", pro, FEB, MAR,
                                              subscription_id=sub, started_at=JAN))
    _, s2 = await metering.summaries(2)
    assert s2["data"]["usage"] == [
        {"charge_id": "ch_api_calls", "meter": "api_calls", "quantity": "3", "usage_count": 1}]
