"""Metering use cases: record usage, learn the catalog, summarize periods, answer usage
queries. Handlers call these with the consumer's connection (the batch transaction); nothing
here commits."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg
import structlog

from billstream_contracts.events import (
    CustomerCreated,
    MeterCreated,
    UsagePeriodClosed,
    UsageAccepted,
    UsagePeriodSummarized,
)
from billstream_contracts import Envelope
from billstream_messaging import Cause, EventStore, NewEvent
from billstream_metering import domain, repository
from billstream_metering.domain import Meter, Totals
from billstream_metering.repository import Customer, UsageRow
from billstream_runtime.ids import new_id

log = structlog.get_logger("billstream.metering")


@dataclass(frozen=True, slots=True)
class Scope:
    tenant_id: str
    environment: str


# ---------------------------------------------------------------- usage


async def record_usage(conn: asyncpg.Connection, scope: Scope, data: UsageAccepted) -> None:
    """Keep one accepted usage event (idempotent on usage_id)."""
    quantity = Decimal(data.quantity)
    meter = await repository.get_meter(conn, scope.tenant_id, scope.environment, data.meter)
    if meter is None:
        # The meter's creation may still be on its way on the other topic: serialize with it,
        # then look again; if still unknown, keep the properties to compute the value later.
        await repository.lock_meter(conn, scope.tenant_id, scope.environment, data.meter)
        meter = await repository.get_meter(conn, scope.tenant_id, scope.environment, data.meter)
    await repository.insert_usage(conn, UsageRow(
        usage_id=data.usage_id, tenant_id=scope.tenant_id, environment=scope.environment,
        customer_ref=data.customer, customer_id=data.customer_id, meter=data.meter,
        quantity=quantity, value=domain.usage_value(quantity, data.properties, meter),
        ts=data.timestamp, properties=None if meter else dict(data.properties),
    ))


# ---------------------------------------------------------------- catalog


async def learn_customer(conn: asyncpg.Connection, scope: Scope, data: CustomerCreated) -> None:
    customer = Customer(data.customer_id, data.external_id)
    await repository.upsert_customer(conn, scope.tenant_id, scope.environment, customer)
    await repository.attribute_usage(conn, scope.tenant_id, scope.environment, customer)


async def learn_meter(conn: asyncpg.Connection, scope: Scope, data: MeterCreated) -> None:
    meter = Meter(data.code, data.aggregation, data.field)
    await repository.lock_meter(conn, scope.tenant_id, scope.environment, meter.code)
    await repository.insert_meter(conn, scope.tenant_id, scope.environment, data.meter_id, meter)
    pending = await repository.pending_usage(conn, scope.tenant_id, scope.environment,
                                             meter.code)
    if pending:
        await repository.set_values(conn, [
            (usage_id, domain.usage_value(quantity, props, meter))
            for usage_id, quantity, props in pending
        ])


# ---------------------------------------------------------------- period summaries


async def record_close(conn: asyncpg.Connection, envelope: Envelope) -> None:
    """A `usage.period_closed` from ingestion's log waits until every event of that log before
    it (sequence < its own) is applied; `close_due_periods` then summarizes the period."""
    await repository.insert_pending_close(
        conn, envelope.id, envelope.tenant_id, envelope.environment, envelope.source,
        envelope.sequence - 1, envelope.correlation_id, envelope.data,
    )


async def close_due_periods(pool: asyncpg.Pool, store: EventStore, consumer: str) -> int:
    """Summarize every pending period close whose preceding usage has all been applied.
    Each close commits alone, with its summary and event; returns how many were closed."""
    closed = 0
    async with pool.acquire() as conn:
        sources = await repository.pending_sources(conn)
    for source in sources:
        async with pool.acquire() as conn, conn.transaction():
            watermark = await repository.advance_watermark(conn, consumer, source)
        while True:
            async with pool.acquire() as conn, conn.transaction():
                row = await repository.claim_due_close(conn, source, watermark)
                if row is None:
                    break
                data = UsagePeriodClosed.model_validate(row["data"])
                await summarize_period(
                    conn, store, Scope(row["tenant_id"], row["environment"]), data,
                    Cause(row["event_id"], row["correlation_id"]),
                )
                await repository.delete_pending_close(conn, row["event_id"])
                closed += 1
    return closed


async def summarize_period(conn: asyncpg.Connection, store: EventStore, scope: Scope,
                           data: UsagePeriodClosed, cause: Cause | None) -> bool:
    """Answer a period close with one `usage.period_summarized`.

    The sweep: every usage row of the subscription's customer (by its `cus_` id or external
    id), for the meters of the plan's usage charges, with `started_at <= ts < period_end` and
    not summarized yet, is marked with this summary and aggregated. Nothing restricts it to
    `period_start`: usage that arrives late — after the period it belongs to was summarized —
    is still unsummarized at the next period end and is billed then, instead of being lost or
    counted twice. (Usage still in flight when the period ends counts as late the same way.)

    Always emitted, even with no usage charges or no usage: invoicing waits for it to bill the
    period. Once per period: a replayed `period_ended` finds its summary and emits nothing.
    """
    sub = data.subscription
    summary_id = new_id("usum")
    if not await repository.claim_summary(
        conn, summary_id, scope.tenant_id, scope.environment, sub.subscription_id,
        sub.customer_id, data.period_start, data.period_end,
    ):
        log.info("period_already_summarized", subscription_id=sub.subscription_id,
                 period_end=domain.format_timestamp(data.period_end))
        return False
    meter_codes = domain.usage_meters(sub.plan.charges)
    totals: dict[str, Totals] = {}
    meters: dict[str, Meter] = {}
    if meter_codes:
        known = await repository.find_customer(conn, scope.tenant_id, scope.environment,
                                               sub.customer_id)
        refs = {sub.customer_id, *([sub.customer_external_id] if sub.customer_external_id
                                   else []), *(known.refs if known else [])}
        meters = await repository.get_meters(conn, scope.tenant_id, scope.environment,
                                             meter_codes)
        for code in set(meter_codes) - set(meters):
            log.warning("summarizing_unknown_meter", meter=code, aggregation="sum",
                        subscription_id=sub.subscription_id)
        totals = await repository.sweep(
            conn, summary_id, scope.tenant_id, scope.environment, sorted(refs), meter_codes,
            sub.started_at, data.period_end)
    summary = UsagePeriodSummarized(
        subscription=sub, period_start=data.period_start, period_end=data.period_end,
        renews=data.renews, next_period_start=data.next_period_start,
        next_period_end=data.next_period_end,
        usage=domain.charge_usage(sub.plan.charges, totals, meters),
    )
    await store.append(conn, [NewEvent(
        data=summary, tenant_id=scope.tenant_id, environment=scope.environment,
        aggregate_type="subscription", aggregate_id=sub.subscription_id,
        occurred_at=data.period_end,
    )], cause=cause)
    return True


# ---------------------------------------------------------------- queries


@dataclass(frozen=True, slots=True)
class UsageAnswer:
    customer_id: str | None
    meter: Meter
    value: Decimal
    event_count: int


async def usage_of(pool: asyncpg.Pool, scope: Scope, customer_ref: str, meter: Meter,
                   start: datetime | None, end: datetime | None) -> UsageAnswer:
    """A customer's usage of a meter in [start, end). The customer may be named by its
    external id or its `cus_` id; when it is known here, usage sent under either counts."""
    known = await repository.find_customer(pool, scope.tenant_id, scope.environment,
                                           customer_ref)
    refs = known.refs if known else [customer_ref]
    totals, row_customer_id = await repository.usage_totals(
        pool, scope.tenant_id, scope.environment, refs, meter.code, start, end)
    return UsageAnswer(
        customer_id=known.customer_id if known else row_customer_id,
        meter=meter, value=domain.aggregate(meter.aggregation, totals),
        event_count=totals.count,
    )
