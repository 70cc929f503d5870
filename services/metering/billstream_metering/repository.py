"""All of metering's SQL: usage rows, period summaries and the catalog read models."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from billstream_metering.domain import Meter, Totals

Conn = asyncpg.Connection | asyncpg.Pool

_REF_MATCH = "(customer_ref = ANY($3::text[]) OR customer_id = ANY($3::text[]))"


@dataclass(frozen=True, slots=True)
class UsageRow:
    usage_id: str
    tenant_id: str
    environment: str
    customer_ref: str
    customer_id: str | None
    meter: str
    quantity: Decimal
    value: Decimal | None
    ts: datetime
    properties: dict[str, Any] | None  # only while the meter is unknown
    source_seq: int | None = None  # the event's sequence in ingestion's log


@dataclass(frozen=True, slots=True)
class Correction:
    """A `usage.voided` or `usage.amended`, as kept in usage_corrections."""

    correction_id: str
    event_id: str
    tenant_id: str
    environment: str
    usage_id: str
    kind: str  # void | amend
    source: str
    sequence: int
    occurred_at: datetime
    quantity: Decimal | None = None  # amend: the new quantity
    properties: dict[str, Any] | None = None  # amend: the new properties
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class UsageState:
    """A usage row as a correction sees it (locked)."""

    usage_id: str
    meter: str
    quantity: Decimal
    voided: bool
    correction_seq: int | None
    summary_id: str | None


@dataclass(frozen=True, slots=True)
class Customer:
    customer_id: str
    external_id: str | None

    @property
    def refs(self) -> list[str]:
        return [r for r in (self.customer_id, self.external_id) if r]


# ---------------------------------------------------------------- meters


async def get_meter(conn: Conn, tenant_id: str, environment: str, code: str) -> Meter | None:
    row = await conn.fetchrow(
        "SELECT code, aggregation, field FROM meters"
        " WHERE tenant_id = $1 AND environment = $2 AND code = $3",
        tenant_id, environment, code,
    )
    return Meter(row["code"], row["aggregation"], row["field"]) if row else None


async def get_meters(conn: Conn, tenant_id: str, environment: str,
                     codes: Sequence[str]) -> dict[str, Meter]:
    rows = await conn.fetch(
        "SELECT code, aggregation, field FROM meters"
        " WHERE tenant_id = $1 AND environment = $2 AND code = ANY($3::text[])",
        tenant_id, environment, list(codes),
    )
    return {r["code"]: Meter(r["code"], r["aggregation"], r["field"]) for r in rows}


def _meter_lock(tenant_id: str, environment: str, code: str) -> tuple[int, int]:
    return 7_311_102, zlib.crc32(f"{tenant_id}\0{environment}\0{code}".encode()) - 2**31


async def lock_meter(conn: asyncpg.Connection, tenant_id: str, environment: str,
                     code: str) -> None:
    """Serialize "usage for a meter not known yet" with that meter's arrival (transaction
    lock), so a usage row is either seen by the meter's backfill or sees the meter itself."""
    await conn.execute("SELECT pg_advisory_xact_lock($1, $2)",
                       *_meter_lock(tenant_id, environment, code))


async def try_lock_meter_shared(conn: asyncpg.Connection, tenant_id: str, environment: str,
                                code: str) -> bool:
    """lock_meter's lock in share mode, without waiting: False while a transaction holds it
    (learning the meter, or recording usage for it while it is unknown). Holders in share
    mode (period closes) do not exclude one another."""
    return await conn.fetchval("SELECT pg_try_advisory_xact_lock_shared($1, $2)",
                               *_meter_lock(tenant_id, environment, code))


async def insert_meter(conn: asyncpg.Connection, tenant_id: str, environment: str,
                       meter_id: str, meter: Meter) -> None:
    await conn.execute(
        "INSERT INTO meters (tenant_id, environment, code, meter_id, aggregation, field)"
        " VALUES ($1, $2, $3, $4, $5, $6)"
        " ON CONFLICT (tenant_id, environment, code) DO UPDATE"
        " SET meter_id = EXCLUDED.meter_id, aggregation = EXCLUDED.aggregation,"
        "     field = EXCLUDED.field",
        tenant_id, environment, meter.code, meter_id, meter.aggregation, meter.field,
    )


async def pending_usage(conn: asyncpg.Connection, tenant_id: str, environment: str,
                        code: str) -> list[tuple[str, Decimal, dict[str, Any]]]:
    """(usage_id, quantity, properties) of the rows recorded before their meter was known."""
    rows = await conn.fetch(
        "SELECT usage_id, quantity, properties FROM usage_records"
        " WHERE tenant_id = $1 AND environment = $2 AND meter = $3 AND properties IS NOT NULL",
        tenant_id, environment, code,
    )
    return [(r["usage_id"], r["quantity"], r["properties"]) for r in rows]


async def set_values(conn: asyncpg.Connection, values: Sequence[tuple[str, Decimal | None]]
                     ) -> None:
    """Set the values of rows recorded before their meter was known; drop their properties."""
    await conn.execute(
        """
        UPDATE usage_records u SET value = v.value, properties = NULL
          FROM unnest($1::text[], $2::numeric[]) AS v(usage_id, value)
         WHERE u.usage_id = v.usage_id
        """,
        [v[0] for v in values], [v[1] for v in values],
    )


# ---------------------------------------------------------------- customers


async def upsert_customer(conn: asyncpg.Connection, tenant_id: str, environment: str,
                          customer: Customer) -> None:
    await conn.execute(
        "INSERT INTO customers (tenant_id, environment, customer_id, external_id)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, environment, customer_id)"
        " DO UPDATE SET external_id = EXCLUDED.external_id",
        tenant_id, environment, customer.customer_id, customer.external_id,
    )


async def attribute_usage(conn: asyncpg.Connection, tenant_id: str, environment: str,
                          customer: Customer) -> None:
    """Usage recorded before the customer was known gets its cus_ id."""
    await conn.execute(
        "UPDATE usage_records SET customer_id = $4"
        " WHERE tenant_id = $1 AND environment = $2 AND customer_ref = ANY($3::text[])"
        " AND customer_id IS NULL",
        tenant_id, environment, customer.refs, customer.customer_id,
    )


async def find_customer(conn: Conn, tenant_id: str, environment: str,
                        ref: str) -> Customer | None:
    """The customer a ref names: its cus_ id first, else its external id."""
    row = await conn.fetchrow(
        "SELECT customer_id, external_id FROM customers"
        " WHERE tenant_id = $1 AND environment = $2 AND (customer_id = $3 OR external_id = $3)"
        " ORDER BY (customer_id = $3) DESC LIMIT 1",
        tenant_id, environment, ref,
    )
    return Customer(row["customer_id"], row["external_id"]) if row else None


# ---------------------------------------------------------------- usage


async def insert_usage(conn: asyncpg.Connection, row: UsageRow) -> tuple[bool, bool]:
    """Insert one usage row (a redelivered event is a no-op). The cus_ id is the one ingestion
    resolved, else the one known here. A row whose event was already summarized before a
    rebuild keeps its summary. Returns (inserted, whether corrections of it are pending)."""
    found = await conn.fetchrow(
        """
        WITH inserted AS (
            INSERT INTO usage_records (usage_id, tenant_id, environment, customer_ref,
                                       customer_id, meter, quantity, value, ts, properties,
                                       summary_id, source_seq)
            VALUES ($1, $2, $3, $4,
                    coalesce($5, (SELECT customer_id FROM customers
                                   WHERE tenant_id = $2 AND environment = $3
                                     AND (customer_id = $4 OR external_id = $4)
                                   ORDER BY (customer_id = $4) DESC LIMIT 1)),
                    $6, $7, $8, $9, $10,
                    (SELECT summary_id FROM usage_summary_items WHERE usage_id = $1), $11)
            ON CONFLICT (usage_id) DO NOTHING
            RETURNING true
        )
        SELECT EXISTS (SELECT 1 FROM inserted) AS inserted,
               EXISTS (SELECT 1 FROM usage_corrections
                        WHERE usage_id = $1 AND status = 'pending') AS pending
        """,
        row.usage_id, row.tenant_id, row.environment, row.customer_ref, row.customer_id,
        row.meter, row.quantity, row.value, row.ts, row.properties, row.source_seq,
    )
    return found["inserted"], found["pending"]


async def usage_totals(conn: Conn, tenant_id: str, environment: str, refs: Sequence[str],
                       meter: str, start: datetime | None, end: datetime | None
                       ) -> tuple[Totals, str | None]:
    """Totals of a customer's usage of a meter in [start, end), and the cus_ id the rows carry
    (when the customer is known to ingestion but not yet here). Voided usage counts nowhere."""
    row = await conn.fetchrow(
        f"""
        SELECT sum(value) AS total, count(*) AS n, max(value) AS maximum,
               max(customer_id) AS customer_id
          FROM usage_records
         WHERE tenant_id = $1 AND environment = $2 AND {_REF_MATCH} AND meter = $4
           AND ($5::timestamptz IS NULL OR ts >= $5) AND ($6::timestamptz IS NULL OR ts < $6)
           AND voided_at IS NULL
        """,
        tenant_id, environment, list(refs), meter, start, end,
    )
    return Totals(row["total"], row["n"], row["maximum"]), row["customer_id"]


# ---------------------------------------------------------------- corrections

_CORRECTION_COLUMNS = ("correction_id, event_id, tenant_id, environment, usage_id, kind, source,"
                       " sequence, occurred_at, quantity, properties, reason")


def _correction(row: asyncpg.Record) -> Correction:
    return Correction(**{k: row[k] for k in Correction.__slots__})


async def insert_correction(conn: asyncpg.Connection, c: Correction) -> bool:
    """Record a correction as pending; False when it was recorded already."""
    return bool(await conn.fetchval(
        f"INSERT INTO usage_corrections ({_CORRECTION_COLUMNS})"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        " ON CONFLICT (correction_id) DO NOTHING RETURNING true",
        c.correction_id, c.event_id, c.tenant_id, c.environment, c.usage_id, c.kind, c.source,
        c.sequence, c.occurred_at, c.quantity, c.properties, c.reason,
    ))


async def lock_usage(conn: asyncpg.Connection, tenant_id: str, environment: str,
                     usage_id: str) -> UsageState | None:
    """The usage row, locked until commit (a sweep of it waits, and then sees the correction;
    or it was swept first and this sees its summary)."""
    row = await conn.fetchrow(
        "SELECT usage_id, meter, quantity, voided_at IS NOT NULL AS voided, correction_seq,"
        "       summary_id"
        "  FROM usage_records WHERE usage_id = $1 AND tenant_id = $2 AND environment = $3"
        "   FOR UPDATE",
        usage_id, tenant_id, environment,
    )
    return UsageState(**dict(row)) if row else None


async def usage_meter(conn: asyncpg.Connection, tenant_id: str, environment: str,
                      usage_id: str) -> str | None:
    """The meter of a usage row (it never changes), without locking the row."""
    return await conn.fetchval(
        "SELECT meter FROM usage_records WHERE usage_id = $1 AND tenant_id = $2"
        " AND environment = $3", usage_id, tenant_id, environment)


async def billed_correction_seq(conn: asyncpg.Connection, usage_id: str) -> int | None:
    """The sequence of the last correction a billed row carried when it was swept."""
    return await conn.fetchval(
        "SELECT correction_seq FROM usage_summary_items WHERE usage_id = $1", usage_id)


async def void_usage(conn: asyncpg.Connection, usage_id: str, c: Correction) -> None:
    await conn.execute(
        "UPDATE usage_records SET voided_at = $2, correction_id = $3,"
        " correction_seq = greatest(correction_seq, $4) WHERE usage_id = $1",
        usage_id, c.occurred_at, c.correction_id, c.sequence,
    )


async def amend_usage(conn: asyncpg.Connection, usage_id: str, c: Correction, quantity: Decimal,
                      value: Decimal | None, properties: dict[str, Any] | None) -> None:
    """New quantity, value and properties; the accepted quantity stays in original_quantity."""
    await conn.execute(
        "UPDATE usage_records SET original_quantity = coalesce(original_quantity, quantity),"
        " quantity = $2, value = $3, properties = $4, correction_id = $5, correction_seq = $6"
        " WHERE usage_id = $1",
        usage_id, quantity, value, properties, c.correction_id, c.sequence,
    )


async def decide_correction(conn: asyncpg.Connection, correction_id: str, status: str,
                            previous_quantity: Decimal) -> None:
    await conn.execute(
        "UPDATE usage_corrections SET status = $2, previous_quantity = $3"
        " WHERE correction_id = $1",
        correction_id, status, previous_quantity,
    )


async def pending_corrections(conn: asyncpg.Connection, tenant_id: str, environment: str,
                              usage_id: str) -> list[Correction]:
    """The corrections of `usage_id` waiting for its row, in log order, locked."""
    rows = await conn.fetch(
        f"SELECT {_CORRECTION_COLUMNS} FROM usage_corrections"
        " WHERE usage_id = $1 AND status = 'pending' AND tenant_id = $2 AND environment = $3"
        " ORDER BY sequence FOR UPDATE",
        usage_id, tenant_id, environment,
    )
    return [_correction(r) for r in rows]


async def orphaned_corrections(conn: asyncpg.Connection, limit: int = 1000) -> list[Correction]:
    """Pending corrections whose usage row is here after all (the row and the correction were
    applied concurrently, from two partitions, and neither saw the other), in log order,
    locked; rows another transaction holds are skipped."""
    rows = await conn.fetch(
        f"""
        SELECT {_CORRECTION_COLUMNS} FROM usage_corrections c
         WHERE status = 'pending'
           AND EXISTS (SELECT 1 FROM usage_records u
                        WHERE u.usage_id = c.usage_id AND u.tenant_id = c.tenant_id
                          AND u.environment = c.environment)
         ORDER BY usage_id, sequence LIMIT $1
           FOR UPDATE SKIP LOCKED
        """,
        limit,
    )
    return [_correction(r) for r in rows]


# ---------------------------------------------------------------- period summaries


async def claim_summary(conn: asyncpg.Connection, summary_id: str, tenant_id: str,
                        environment: str, subscription_id: str, customer_id: str,
                        period_start: datetime, period_end: datetime) -> bool:
    """Record the summary of a period; False when that period was summarized already."""
    return bool(await conn.fetchval(
        "INSERT INTO period_summaries (summary_id, tenant_id, environment, subscription_id,"
        " customer_id, period_start, period_end) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        " ON CONFLICT (tenant_id, environment, subscription_id, period_end) DO NOTHING"
        " RETURNING true",
        summary_id, tenant_id, environment, subscription_id, customer_id, period_start,
        period_end,
    ))


async def sweep(conn: asyncpg.Connection, summary_id: str, tenant_id: str, environment: str,
                refs: Sequence[str], meters: Sequence[str], start: datetime,
                end: datetime, before_seq: int | None = None) -> dict[str, Totals]:
    """Mark every not-yet-summarized, not voided usage row of the customer's `meters` with ts
    in [start, end) as billed by `summary_id`, and return its totals per meter. A voided row is
    left out (never marked, never billed: a void is final). Each billed row's item records the
    last correction it carried (see usage_summary_items.correction_seq). With `before_seq`,
    only rows before that position in ingestion's log (the close's) are swept."""
    rows = await conn.fetch(
        f"""
        WITH swept AS (
            UPDATE usage_records SET summary_id = $7
             WHERE tenant_id = $1 AND environment = $2 AND {_REF_MATCH}
               AND meter = ANY($4::text[]) AND ts >= $5 AND ts < $6 AND summary_id IS NULL
               AND voided_at IS NULL
               AND ($8::bigint IS NULL OR source_seq IS NULL OR source_seq < $8)
            RETURNING usage_id, meter, value, correction_seq
        ), items AS (
            INSERT INTO usage_summary_items (usage_id, summary_id, correction_seq)
            SELECT usage_id, $7, correction_seq FROM swept
            ON CONFLICT (usage_id) DO NOTHING
        )
        SELECT meter, sum(value) AS total, count(*) AS n, max(value) AS maximum
          FROM swept GROUP BY meter
        """,
        tenant_id, environment, list(refs), list(meters), start, end, summary_id, before_seq,
    )
    return {r["meter"]: Totals(r["total"], r["n"], r["maximum"]) for r in rows}


# ---------------------------------------------------------------- period closes


async def insert_pending_close(conn: asyncpg.Connection, event_id: str, tenant_id: str,
                               environment: str, source: str, required_seq: int,
                               correlation_id: str | None, data: dict) -> None:
    await conn.execute(
        "INSERT INTO pending_closes (event_id, tenant_id, environment, source, required_seq,"
        " correlation_id, data) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        " ON CONFLICT (event_id) DO NOTHING",
        event_id, tenant_id, environment, source, required_seq, correlation_id, data,
    )


async def pending_sources(conn: Conn) -> list[str]:
    return [r["source"] for r in await conn.fetch("SELECT DISTINCT source FROM pending_closes")]


async def advance_watermark(conn: asyncpg.Connection, consumer: str, source: str,
                            page: int = 10_000) -> int:
    """Move `source`'s watermark past every sequence the consumer has taken contiguously (its
    inbox holds one row per event, with the source's sequence): applied, skipped or
    dead-lettered. A dead-lettered event was not applied: the closes of its tenant and
    environment after it wait for it apart (service._held_by_dead_letters)."""
    mark = await conn.fetchval("SELECT seq FROM source_watermarks WHERE source = $1", source) or 0
    start = mark
    while True:
        rows = await conn.fetch(
            "SELECT DISTINCT sequence FROM inbox WHERE consumer = $1 AND source = $2"
            " AND sequence > $3 ORDER BY sequence LIMIT $4",
            consumer, source, mark, page,
        )
        for row in rows:
            if row["sequence"] != mark + 1:
                break
            mark += 1
        else:
            if len(rows) == page:
                continue
        break
    if mark != start:
        await conn.execute(
            "INSERT INTO source_watermarks (source, seq) VALUES ($1, $2)"
            " ON CONFLICT (source) DO UPDATE SET seq = EXCLUDED.seq",
            source, mark,
        )
    return mark


async def held_closes(conn: asyncpg.Connection, source: str, tenant_id: str | None,
                      environment: str | None, seq: int) -> int:
    """How many pending closes of `source` a dead-lettered event of the scope (None: of any)
    at `seq` holds."""
    return await conn.fetchval(
        "SELECT count(*) FROM pending_closes WHERE source = $1 AND required_seq >= $4"
        " AND ($2::text IS NULL OR tenant_id = $2 AND environment = $3)",
        source, tenant_id, environment, seq)


async def claim_due_close(conn: asyncpg.Connection, source: str, watermark: int,
                          held: Sequence[tuple[int, str | None, str | None]] = (),
                          after: tuple[int, str] = (-1, "")):
    """The next close after `after` (required_seq, event_id: where this pass stands; what it
    passed over cannot become due again before the next pass) whose preceding usage is
    applied and which waits for no meter, locked for this transaction. `held`: (sequence,
    tenant, environment) of dead-lettered events; a close of that scope after one of them
    waits (its usage was accepted, and is not applied); a scope of None holds every close.
    A close waits while an earlier close of the same subscription is pending (even one
    another replica is summarizing right now, or one that waits for a meter or a dead
    letter): the sweep of a period must not run before its predecessor's."""
    return await conn.fetchrow(
        """
        SELECT p.* FROM pending_closes p
         WHERE p.source = $1 AND p.required_seq <= $2 AND p.waits_for_meters IS NULL
           AND (p.required_seq, p.event_id) > ($6::bigint, $7::text)
           AND NOT EXISTS (
               SELECT 1 FROM unnest($3::bigint[], $4::text[], $5::text[]) AS h(seq, t, e)
                WHERE h.seq <= p.required_seq
                  AND (h.t IS NULL OR h.t = p.tenant_id AND h.e = p.environment))
           AND NOT EXISTS (
               SELECT 1 FROM pending_closes e
                WHERE e.tenant_id = p.tenant_id AND e.environment = p.environment
                  AND e.data -> 'subscription' ->> 'subscription_id'
                      = p.data -> 'subscription' ->> 'subscription_id'
                  AND e.required_seq < p.required_seq)
         ORDER BY p.required_seq, p.event_id LIMIT 1
           FOR UPDATE SKIP LOCKED
        """,
        source, watermark, [h[0] for h in held], [h[1] for h in held], [h[2] for h in held],
        after[0], after[1],
    )


async def wait_for_meters(conn: asyncpg.Connection, event_id: str, codes: list[str]) -> None:
    await conn.execute("UPDATE pending_closes SET waits_for_meters = $2 WHERE event_id = $1",
                       event_id, codes)


async def meter_arrived(conn: asyncpg.Connection, tenant_id: str, environment: str,
                        code: str) -> None:
    """The closes that waited for this meter are looked at again (for the meters they may
    still lack, too)."""
    await conn.execute(
        "UPDATE pending_closes SET waits_for_meters = NULL WHERE tenant_id = $1"
        " AND environment = $2 AND $3 = ANY(waits_for_meters)", tenant_id, environment, code)


async def delete_pending_close(conn: asyncpg.Connection, event_id: str) -> None:
    await conn.execute("DELETE FROM pending_closes WHERE event_id = $1", event_id)
