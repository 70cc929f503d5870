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
    UsageAccepted,
    UsageAmended,
    UsageBatchAccepted,
    UsagePeriodClosed,
    UsagePeriodSummarized,
    UsageVoided,
)
from billstream_contracts import Envelope
from billstream_messaging import (
    Cause,
    EventStore,
    NewEvent,
    dead_letter_payloads,
    unapplied_dead_letters,
)
from billstream_metering import domain, repository
from billstream_metering.domain import Meter, RecordState, Totals
from billstream_metering.repository import Correction, Customer, UsageRow, UsageState
from billstream_runtime.ids import new_id

log = structlog.get_logger("billstream.metering")


@dataclass(frozen=True, slots=True)
class Scope:
    tenant_id: str
    environment: str


# ---------------------------------------------------------------- usage


async def record_usage_batch(conn: asyncpg.Connection, scope: Scope, data: UsageBatchAccepted,
                             source_seq: int | None = None) -> None:
    """Keep every usage of a `usage.batch_accepted` (each as record_usage does), looking each
    meter up once."""
    meters: dict[str, Meter | None] = {}
    for usage in data.usages:
        await record_usage(conn, scope, usage, source_seq, meters)


async def record_usage(conn: asyncpg.Connection, scope: Scope,
                       data: UsageAccepted, source_seq: int | None = None,
                       meters: dict[str, Meter | None] | None = None) -> None:
    """Keep one accepted usage event (idempotent on usage_id), then apply the corrections of it
    that arrived first (pending). `meters` caches the meters looked up (a known one only)."""
    quantity = Decimal(data.quantity)
    meter = meters.get(data.meter) if meters is not None else None
    if meter is None:
        meter = await _meter(conn, scope, data.meter)
        if meters is not None and meter is not None:
            meters[data.meter] = meter
    inserted, pending = await repository.insert_usage(conn, UsageRow(
        usage_id=data.usage_id, tenant_id=scope.tenant_id, environment=scope.environment,
        customer_ref=data.customer, customer_id=data.customer_id, meter=data.meter,
        quantity=quantity, value=domain.usage_value(quantity, data.properties, meter),
        ts=data.timestamp, properties=domain.stored_properties(data.properties, meter),
        source_seq=source_seq,
    ))
    if inserted and pending:
        for correction in await repository.pending_corrections(
                conn, scope.tenant_id, scope.environment, data.usage_id):
            await _apply_correction(conn, correction)


async def _meter(conn: asyncpg.Connection, scope: Scope, code: str) -> Meter | None:
    meter = await repository.get_meter(conn, scope.tenant_id, scope.environment, code)
    if meter is None:
        # The meter's creation may still be on its way on the other topic: serialize with it,
        # then look again; if still unknown, keep the properties to compute the value later.
        await repository.lock_meter(conn, scope.tenant_id, scope.environment, code)
        meter = await repository.get_meter(conn, scope.tenant_id, scope.environment, code)
    return meter


# ---------------------------------------------------------------- corrections
#
# `usage.voided` / `usage.amended` follow their usage on ingestion's log (higher sequence, same
# partition key), and ingestion only corrects usage that no period close before them bills, so
# normally the row is here and unbilled, and the close waits for the correction (watermark).
# Defensive cases:
# - the row has not arrived (a replay, or the two on different partitions): the correction is
#   recorded as pending and applied when the row is inserted; if both were applied at the same
#   time by two consumers, neither sees the other, and `apply_orphaned_corrections` (the close
#   task, every poll and before every sweep) applies it;
# - several corrections of one event, in any arrival order: `domain.correction_outcome` makes
#   the result that of log order (a void is final; the amend with the highest sequence wins);
# - the row was billed already: the correction is recorded as `billed`, logged as a warning and
#   not applied, so the totals of a billed period never change.


def _correction(envelope: Envelope, data: UsageVoided | UsageAmended) -> Correction:
    amend = isinstance(data, UsageAmended)
    return Correction(
        correction_id=data.correction_id, event_id=envelope.id, tenant_id=envelope.tenant_id,
        environment=envelope.environment, usage_id=data.usage_id,
        kind="amend" if amend else "void", source=envelope.source, sequence=envelope.sequence,
        # (stored as text and jsonb, which refuse NUL: ingestion refuses it, and its log must
        # never stop this consumer; only what can be a meter's value is of use here)
        occurred_at=envelope.occurred_at,
        reason=data.reason.replace("\x00", "") if data.reason else data.reason,
        quantity=Decimal(data.quantity) if amend else None,
        properties=domain.value_properties(data.properties) if amend else None,
    )


async def correct_usage(conn: asyncpg.Connection, envelope: Envelope,
                        data: UsageVoided | UsageAmended) -> str:
    """Record a correction and apply it to its usage row; returns what became of it
    (applied, superseded, billed, pending, or duplicate)."""
    correction = _correction(envelope, data)
    if not await repository.insert_correction(conn, correction):
        return "duplicate"  # the same correction in another envelope
    return await _apply_correction(conn, correction)


async def _apply_correction(conn: asyncpg.Connection, c: Correction) -> str:
    meter: Meter | None = None
    code: str | None = None
    if c.kind == "amend":
        # The meter (and its lock when unknown) before the row lock: learn_meter takes them in
        # that order too, so the two never deadlock.
        code = await repository.usage_meter(conn, c.tenant_id, c.environment, c.usage_id)
        if code is not None:
            meter = await _meter(conn, Scope(c.tenant_id, c.environment), code)
    row = await repository.lock_usage(conn, c.tenant_id, c.environment, c.usage_id)
    if row is None or (c.kind == "amend" and code is None):
        # No row yet; or (amend) it committed between the two reads: the close task's
        # reconciliation applies the correction then.
        log.info("usage_correction_pending", correction_id=c.correction_id, usage_id=c.usage_id)
        return "pending"
    state = RecordState(
        voided=row.voided, correction_seq=row.correction_seq, billed=row.summary_id is not None,
        billed_correction_seq=(await repository.billed_correction_seq(conn, row.usage_id)
                               if row.summary_id else None),
    )
    outcome = domain.correction_outcome(c.kind, c.sequence, state)  # type: ignore[arg-type]
    if outcome == "billed":
        log.warning("usage_correction_of_billed_usage", correction_id=c.correction_id,
                    usage_id=c.usage_id, kind=c.kind, summary_id=row.summary_id)
    elif outcome == "applied":
        if c.kind == "void":
            await repository.void_usage(conn, row.usage_id, c)
        else:
            await _amend(conn, c, row, meter)
    await repository.decide_correction(conn, c.correction_id, outcome, row.quantity)
    return outcome


async def _amend(conn: asyncpg.Connection, c: Correction, row: UsageState,
                 meter: Meter | None) -> None:
    assert c.quantity is not None
    await repository.amend_usage(
        conn, row.usage_id, c, c.quantity, domain.usage_value(c.quantity, c.properties, meter),
        domain.stored_properties(c.properties, meter),
    )


async def apply_orphaned_corrections(conn: asyncpg.Connection) -> int:
    """Apply pending corrections whose usage row has arrived (see above); returns how many."""
    orphans = await repository.orphaned_corrections(conn)
    for correction in orphans:
        await _apply_correction(conn, correction)
    return len(orphans)


# ---------------------------------------------------------------- catalog


async def learn_customer(conn: asyncpg.Connection, scope: Scope, data: CustomerCreated) -> None:
    customer = Customer(data.customer_id, data.external_id)
    await repository.upsert_customer(conn, scope.tenant_id, scope.environment, customer)
    await repository.attribute_usage(conn, scope.tenant_id, scope.environment, customer)


async def learn_meter(conn: asyncpg.Connection, scope: Scope, data: MeterCreated) -> None:
    meter = Meter(data.code, data.aggregation, data.field)
    await repository.lock_meter(conn, scope.tenant_id, scope.environment, meter.code)
    await repository.insert_meter(conn, scope.tenant_id, scope.environment, data.meter_id, meter)
    await repository.meter_arrived(conn, scope.tenant_id, scope.environment, meter.code)
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
    """Summarize every pending period close whose preceding usage has all been applied and
    whose plan's meters are all known here (a meter's aggregation decides the quantity: a
    close that ran before `meter.created` reached metering would bill a placeholder sum).
    Each close commits alone, with its summary and event; returns how many were closed."""
    closed = 0
    async with pool.acquire() as conn, conn.transaction():
        await apply_orphaned_corrections(conn)
    async with pool.acquire() as conn:
        sources = await repository.pending_sources(conn)
    for source in sources:
        async with pool.acquire() as conn, conn.transaction():
            watermark = await repository.advance_watermark(conn, consumer, source)
            held = await _held_by_dead_letters(conn, consumer, source)
        # One walk through the source's due closes in log order: each claim starts where the
        # last one stood, so closes passed over (held, waiting, busy, another replica's) cost
        # the pass once each. (READ COMMITTED: _waits_for_meters relies on each statement
        # seeing what committed before it.)
        after = (-1, "")
        while True:
            async with pool.acquire() as conn, conn.transaction(isolation="read_committed"):
                row = await repository.claim_due_close(conn, source, watermark, held, after)
                if row is None:
                    break
                after = (row["required_seq"], row["event_id"])
                data = UsagePeriodClosed.model_validate(row["data"])
                scope = Scope(row["tenant_id"], row["environment"])
                if await _waits_for_meters(conn, scope, data, row["event_id"]) is not False:
                    continue  # waits for a meter (marked), or its lock is busy: next pass
                await summarize_period(
                    conn, store, scope, data,
                    Cause(row["event_id"], row["correlation_id"]),
                    close_seq=row["required_seq"] + 1,
                )
                await repository.delete_pending_close(conn, row["event_id"])
                closed += 1
    return closed


async def _waits_for_meters(conn: asyncpg.Connection, scope: Scope, data: UsagePeriodClosed,
                            event_id: str) -> bool | None:
    """Whether a meter of the plan's usage charges is not known here yet. The subscription
    service refuses a plan whose meters do not exist, so `meter.created` is on its way (the
    catalog consumer lags, or is being rebuilt): the close is marked as waiting for it (and
    said so, once) until learn_meter clears the mark. The meter's lock orders this with its
    arrival: learn_meter either commits before the second look, or clears the mark after.
    The lock is only tried, in share mode (None when a batch holds it: look again next pass):
    a batch takes meters' locks in its own order, and waiting here could deadlock with it;
    closes do not exclude one another."""
    codes = domain.usage_meters(data.subscription.plan.charges)
    if not codes:
        return False
    known = await repository.get_meters(conn, scope.tenant_id, scope.environment, codes)
    missing = sorted(set(codes) - set(known))
    if not missing:
        return False
    for code in missing:
        if not await repository.try_lock_meter_shared(conn, scope.tenant_id, scope.environment,
                                                      code):
            return None
    known = await repository.get_meters(conn, scope.tenant_id, scope.environment, missing)
    missing = [code for code in missing if code not in known]
    if missing:
        await repository.wait_for_meters(conn, event_id, missing)
        log.warning("period_close_waits_for_meter", event_id=event_id, meters=missing,
                    subscription_id=data.subscription.subscription_id)
    return bool(missing)


#: Dead-lettered events already read: event id -> (sequence, tenant, environment), facts of
#: the event that never change. Per process; an entry per event the usage consumer could
#: not apply (bounded all the same).
_HELD: dict[str, tuple[int, str | None, str | None]] = {}


async def _held_by_dead_letters(conn: asyncpg.Connection, consumer: str,
                                source: str) -> list[tuple[int, str | None, str | None]]:
    """(sequence, tenant, environment) of each event of `source` the usage consumer
    dead-lettered and has not applied since. Its scope's closes after it wait: its usage was
    accepted, and billing those periods without it would bill it never (it used to). Other
    tenants' closes go ahead; all wait if its envelope cannot be read any more (scope None).
    Said once per process and event, with what to do."""
    held = []
    for row in await unapplied_dead_letters(conn, consumer, source):
        known = _HELD.get(row["event_id"])
        if known is None:
            payload = (await dead_letter_payloads(conn, [row["id"]]))[row["id"]]
            try:
                env = Envelope.model_validate_json(payload)
                scope: tuple[str | None, str | None] = (env.tenant_id, env.environment)
            except ValueError:  # (pydantic's ValidationError is one)
                scope = (None, None)
            if len(_HELD) >= 10_000:
                _HELD.clear()
            known = _HELD[row["event_id"]] = (row["sequence"], *scope)
            log.error("period_closes_held_by_dead_letter", source=source, consumer=consumer,
                      sequence=known[0], event_id=row["event_id"], tenant_id=known[1],
                      environment=known[2],
                      held=await repository.held_closes(conn, source, *known[1:], known[0]),
                      fix=f"fix the cause, then run `redrive {consumer.split('.')[-1]}`")
        held.append(known)
    return held


async def summarize_period(conn: asyncpg.Connection, store: EventStore, scope: Scope,
                           data: UsagePeriodClosed, cause: Cause | None,
                           close_seq: int | None = None) -> bool:
    """Answer a period close with one `usage.period_summarized`.

    The sweep: every usage row of the subscription's customer (by its `cus_` id or external
    id), for the meters of the plan's usage charges, with `started_at <= ts < period_end` and
    not summarized yet, is marked with this summary and aggregated, as corrected (amended
    values; voided rows are left out, never billed). Nothing restricts it to
    `period_start`: usage that arrives late — after the period it belongs to was summarized —
    is still unsummarized at the next period end and is billed then, instead of being lost or
    counted twice. (Usage still in flight when the period ends counts as late the same way.)
    Only usage before the close in ingestion's log is swept (`close_seq`): what came after is
    the next close's, however soon metering applied it — a fact of the log, which ingestion
    relies on to refuse corrections of billed usage.

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
        for code in set(meter_codes) - set(meters):  # (close_due_periods waits for them)
            log.warning("summarizing_unknown_meter", meter=code, aggregation="sum",
                        subscription_id=sub.subscription_id)
        # A correction applied concurrently with its usage row is billed with it.
        await apply_orphaned_corrections(conn)
        totals = await repository.sweep(
            conn, summary_id, scope.tenant_id, scope.environment, sorted(refs), meter_codes,
            sub.started_at, data.period_end, close_seq)
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
