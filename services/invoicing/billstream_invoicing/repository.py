"""All SQL of invoicing, and row ↔ domain mapping."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from billstream_invoicing.domain import Invoice, InvoiceDraft, Line, format_number
from billstream_runtime.ids import new_id


class _AlreadyInvoiced(Exception):
    """Raised inside the creation savepoint so that the number taken is given back."""


async def create_invoice(
    conn: asyncpg.Connection,
    draft: InvoiceDraft,
    *,
    tenant_id: str,
    environment: str,
    customer_id: str,
    subscription_id: str,
    issued_at: datetime,
    test_clock_id: str | None,
) -> Invoice | None:
    """Number and store a new open invoice; None if this (subscription, period_start, kind)
    is already invoiced. The number and the invoice commit or roll back together (a
    savepoint), so numbers stay gapless."""
    invoice_id = new_id("inv")
    try:
        async with conn.transaction():
            n = await conn.fetchval(
                "INSERT INTO invoice_number_counters (tenant_id, environment, last_number)"
                " VALUES ($1, $2, 1) ON CONFLICT (tenant_id, environment)"
                " DO UPDATE SET last_number = invoice_number_counters.last_number + 1"
                " RETURNING last_number",
                tenant_id, environment,
            )
            inserted = await conn.fetchval(
                """
                INSERT INTO invoices (id, tenant_id, environment, number, kind, customer_id,
                    subscription_id, status, currency, subtotal, total, amount_due, amount_paid,
                    period_start, period_end, issued_at, test_clock_id, created_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, 'open', $8, $9, $10, $10, 0, $11, $12,
                        $13, $14, $13)
                ON CONFLICT ON CONSTRAINT invoices_once_per_period DO NOTHING
                RETURNING id
                """,
                invoice_id, tenant_id, environment, format_number(n), draft.kind, customer_id,
                subscription_id, draft.currency, draft.subtotal, draft.total,
                draft.period.start, draft.period.end, issued_at, test_clock_id,
            )
            if inserted is None:
                raise _AlreadyInvoiced
            await conn.executemany(
                "INSERT INTO invoice_lines (id, invoice_id, position, type, description,"
                " charge_id, quantity, unit_price, amount, period_start, period_end)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                [
                    (new_id("il"), invoice_id, pos, ln.type, ln.description, ln.charge_id,
                     ln.quantity, ln.unit_price, ln.amount, ln.period.start, ln.period.end)
                    for pos, ln in enumerate(draft.lines)
                ],
            )
    except _AlreadyInvoiced:
        return None
    return await get(conn, tenant_id, environment, invoice_id)


async def mark_paid(conn: asyncpg.Connection, invoice: Invoice, payment_id: str) -> None:
    await conn.execute(
        "UPDATE invoices SET status = $2, amount_paid = $3, paid_at = $4, payment_id = $5"
        " WHERE id = $1",
        invoice.invoice_id, invoice.status, invoice.amount_paid, invoice.paid_at, payment_id,
    )


async def record_payment_outcome(
    conn: asyncpg.Connection, *, payment_id: str, outcome: str, invoice_id: str, amount: int,
    failure_code: str | None, occurred_at: datetime,
) -> bool:
    """True if this payment outcome is new; False if it was already applied."""
    inserted = await conn.fetchval(
        "INSERT INTO invoice_payment_outcomes (payment_id, outcome, invoice_id, amount,"
        " failure_code, occurred_at) VALUES ($1, $2, $3, $4, $5, $6)"
        " ON CONFLICT DO NOTHING RETURNING payment_id",
        payment_id, outcome, invoice_id, amount, failure_code, occurred_at,
    )
    return inserted is not None


async def get(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, environment: str, invoice_id: str,
    *, for_update: bool = False,
) -> Invoice | None:
    row = await conn.fetchrow(
        "SELECT * FROM invoices WHERE id = $1 AND tenant_id = $2 AND environment = $3"
        + (" FOR UPDATE" if for_update else ""),
        invoice_id, tenant_id, environment,
    )
    if row is None:
        return None
    lines = await conn.fetch(
        "SELECT * FROM invoice_lines WHERE invoice_id = $1 ORDER BY position", invoice_id
    )
    return _invoice(row, lines)


async def list_invoices(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, environment: str, *,
    customer_id: str | None, subscription_id: str | None, status: str | None,
    starting_after: str | None, limit: int,
) -> list[Invoice]:
    """Newest first; up to `limit` invoices (ask for one more to learn `has_more`)."""
    rows = await conn.fetch(
        """
        SELECT * FROM invoices
         WHERE tenant_id = $1 AND environment = $2
           AND ($3::text IS NULL OR customer_id = $3)
           AND ($4::text IS NULL OR subscription_id = $4)
           AND ($5::text IS NULL OR status = $5)
           AND ($6::text IS NULL OR id < $6)
         ORDER BY id DESC
         LIMIT $7
        """,
        tenant_id, environment, customer_id, subscription_id, status, starting_after, limit,
    )
    if not rows:
        return []
    lines = await conn.fetch(
        "SELECT * FROM invoice_lines WHERE invoice_id = ANY($1::text[])"
        " ORDER BY invoice_id, position",
        [r["id"] for r in rows],
    )
    by_invoice: dict[str, list[asyncpg.Record]] = {}
    for ln in lines:
        by_invoice.setdefault(ln["invoice_id"], []).append(ln)
    return [_invoice(r, by_invoice.get(r["id"], [])) for r in rows]


def _invoice(row: asyncpg.Record, lines: list[asyncpg.Record]) -> Invoice:
    return Invoice(
        invoice_id=row["id"], tenant_id=row["tenant_id"], environment=row["environment"],
        number=row["number"], kind=row["kind"], customer_id=row["customer_id"],
        subscription_id=row["subscription_id"], status=row["status"], currency=row["currency"],
        subtotal=row["subtotal"], total=row["total"], amount_due=row["amount_due"],
        amount_paid=row["amount_paid"], period_start=row["period_start"],
        period_end=row["period_end"], issued_at=row["issued_at"], paid_at=row["paid_at"],
        test_clock_id=row["test_clock_id"], created_at=row["created_at"],
        lines=tuple(
            Line(
                line_id=ln["id"], type=ln["type"], description=ln["description"],
                charge_id=ln["charge_id"], quantity=ln["quantity"], unit_price=ln["unit_price"],
                amount=ln["amount"], period_start=ln["period_start"],
                period_end=ln["period_end"],
            )
            for ln in lines
        ),
    )
