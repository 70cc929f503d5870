"""All SQL of payments, and row ↔ domain mapping."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from billstream_payments.domain import Customer, Payment, PaymentMethod

Conn = asyncpg.Connection | asyncpg.Pool

# ---------------------------------------------------------------------------------- projection


async def upsert_customer(conn: Conn, *, customer_id: str, tenant_id: str, environment: str,
                          test_clock_id: str | None, created_at: datetime) -> None:
    await conn.execute(
        "INSERT INTO customers (customer_id, tenant_id, environment, test_clock_id, created_at)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (customer_id) DO NOTHING",
        customer_id, tenant_id, environment, test_clock_id, created_at,
    )


async def set_test_clock(conn: Conn, *, test_clock_id: str, tenant_id: str, environment: str,
                         frozen_time: datetime) -> None:
    """Keep the latest frozen time (advances only move forward)."""
    await conn.execute(
        "INSERT INTO test_clocks (test_clock_id, tenant_id, environment, frozen_time)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (test_clock_id) DO UPDATE"
        " SET frozen_time = GREATEST(test_clocks.frozen_time, EXCLUDED.frozen_time)",
        test_clock_id, tenant_id, environment, frozen_time,
    )


async def get_customer(conn: Conn, tenant_id: str, environment: str, customer_id: str,
                       *, for_update: bool = False) -> Customer | None:
    row = await conn.fetchrow(
        "SELECT * FROM customers WHERE customer_id = $1 AND tenant_id = $2 AND environment = $3"
        + (" FOR UPDATE" if for_update else ""),
        customer_id, tenant_id, environment,
    )
    if row is None:
        return None
    return Customer(row["customer_id"], row["tenant_id"], row["environment"],
                    row["test_clock_id"])


async def clock_time(conn: Conn, test_clock_id: str) -> datetime | None:
    return await conn.fetchval(
        "SELECT frozen_time FROM test_clocks WHERE test_clock_id = $1", test_clock_id)


# ---------------------------------------------------------------------------------- methods


async def has_methods(conn: Conn, customer: Customer) -> bool:
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM payment_methods WHERE tenant_id = $1"
        " AND environment = $2 AND customer_id = $3)",
        customer.tenant_id, customer.environment, customer.customer_id,
    ))


async def insert_method(conn: Conn, pm: PaymentMethod) -> None:
    await conn.execute(
        "INSERT INTO payment_methods (id, tenant_id, environment, customer_id, gateway_token,"
        " type, brand, last4, is_default, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        pm.payment_method_id, pm.tenant_id, pm.environment, pm.customer_id, pm.gateway_token,
        pm.type, pm.brand, pm.last4, pm.is_default, pm.created_at,
    )


async def default_method(conn: Conn, tenant_id: str, environment: str,
                         customer_id: str) -> PaymentMethod | None:
    row = await conn.fetchrow(
        "SELECT * FROM payment_methods WHERE tenant_id = $1 AND environment = $2"
        " AND customer_id = $3 AND is_default",
        tenant_id, environment, customer_id,
    )
    return _method(row) if row else None


async def list_methods(conn: Conn, tenant_id: str, environment: str, customer_id: str, *,
                       starting_after: str | None, limit: int) -> list[PaymentMethod]:
    rows = await conn.fetch(
        "SELECT * FROM payment_methods WHERE tenant_id = $1 AND environment = $2"
        " AND customer_id = $3 AND ($4::text IS NULL OR id < $4) ORDER BY id DESC LIMIT $5",
        tenant_id, environment, customer_id, starting_after, limit,
    )
    return [_method(r) for r in rows]


def _method(row: asyncpg.Record) -> PaymentMethod:
    return PaymentMethod(
        payment_method_id=row["id"], tenant_id=row["tenant_id"],
        environment=row["environment"], customer_id=row["customer_id"],
        gateway_token=row["gateway_token"], type=row["type"], brand=row["brand"],
        last4=row["last4"], is_default=row["is_default"], created_at=row["created_at"],
    )


# ---------------------------------------------------------------------------------- payments


async def insert_pending(conn: Conn, p: Payment, test_clock_id: str | None) -> bool:
    """Record a pending payment; False if the invoice already has one."""
    inserted = await conn.fetchval(
        "INSERT INTO payments (id, tenant_id, environment, invoice_id, customer_id, amount,"
        " currency, status, test_clock_id, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8, $9)"
        " ON CONFLICT ON CONSTRAINT payments_one_per_invoice DO NOTHING RETURNING id",
        p.payment_id, p.tenant_id, p.environment, p.invoice_id, p.customer_id, p.amount,
        p.currency, test_clock_id, p.created_at,
    )
    return inserted is not None


async def notify(conn: Conn, channel: str) -> None:
    await conn.execute("SELECT pg_notify($1, '')", channel)


async def claim_pending(conn: asyncpg.Connection, limit: int, lease_s: float) -> list[Payment]:
    """Lease up to `limit` pending payments that no other collector holds. The lease (not a
    row lock held across the gateway call) keeps transactions short; a collector that dies
    mid-charge lets its lease expire and the retry reuses the same idempotency key."""
    rows = await conn.fetch(
        """
        UPDATE payments SET locked_until = now() + make_interval(secs => $2)
         WHERE id IN (
            SELECT id FROM payments
             WHERE status = 'pending' AND (locked_until IS NULL OR locked_until < now())
             ORDER BY id
             LIMIT $1
             FOR UPDATE SKIP LOCKED)
        RETURNING *
        """,
        limit, lease_s,
    )
    return sorted((_payment(r) for r in rows), key=lambda p: p.payment_id)


async def renew_lease(conn: asyncpg.Connection, payment_id: str, lease_s: float) -> bool:
    """Extend this collector's lease on one payment right before charging it; False when the
    lease already lapsed (another collector may hold the payment now: leave it to them)."""
    return bool(await conn.fetchval(
        "UPDATE payments SET locked_until = now() + make_interval(secs => $2)"
        " WHERE id = $1 AND status = 'pending' AND locked_until > now() RETURNING true",
        payment_id, lease_s,
    ))


async def settle(conn: asyncpg.Connection, p: Payment) -> bool:
    """Record the outcome of a pending payment; False if it was already settled."""
    done = await conn.fetchval(
        "UPDATE payments SET status = $2, payment_method_id = $3, failure_code = $4,"
        " failure_message = $5, gateway_charge_id = $6, settled_at = now(), locked_until = NULL"
        " WHERE id = $1 AND status = 'pending' RETURNING id",
        p.payment_id, p.status, p.payment_method_id, p.failure_code, p.failure_message,
        p.gateway_charge_id,
    )
    return done is not None


async def release(conn: Conn, payment_id: str, retry_in_s: float) -> None:
    await conn.execute(
        "UPDATE payments SET locked_until = now() + make_interval(secs => $2)"
        " WHERE id = $1 AND status = 'pending'",
        payment_id, retry_in_s,
    )


async def get_payment(conn: Conn, tenant_id: str, environment: str,
                      payment_id: str) -> Payment | None:
    row = await conn.fetchrow(
        "SELECT * FROM payments WHERE id = $1 AND tenant_id = $2 AND environment = $3",
        payment_id, tenant_id, environment,
    )
    return _payment(row) if row else None


async def list_payments(conn: Conn, tenant_id: str, environment: str, *,
                        invoice_id: str | None, customer_id: str | None,
                        starting_after: str | None, limit: int) -> list[Payment]:
    rows = await conn.fetch(
        """
        SELECT * FROM payments
         WHERE tenant_id = $1 AND environment = $2
           AND ($3::text IS NULL OR invoice_id = $3)
           AND ($4::text IS NULL OR customer_id = $4)
           AND ($5::text IS NULL OR id < $5)
         ORDER BY id DESC LIMIT $6
        """,
        tenant_id, environment, invoice_id, customer_id, starting_after, limit,
    )
    return [_payment(r) for r in rows]


def _payment(row: asyncpg.Record) -> Payment:
    return Payment(
        payment_id=row["id"], tenant_id=row["tenant_id"], environment=row["environment"],
        invoice_id=row["invoice_id"], customer_id=row["customer_id"], amount=row["amount"],
        currency=row["currency"], status=row["status"], created_at=row["created_at"],
        payment_method_id=row["payment_method_id"], failure_code=row["failure_code"],
        failure_message=row["failure_message"], gateway_charge_id=row["gateway_charge_id"],
    )
