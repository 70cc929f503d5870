"""All SQL of the subscription service, and row ↔ domain mapping. Functions take the
connection of the caller's transaction; nothing here commits."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeAlias

import asyncpg

from billstream_subscription.domain import (
    ApiKey,
    Charge,
    Customer,
    Meter,
    Plan,
    Subscription,
    Tenant,
    TestClock,
)

Conn: TypeAlias = "asyncpg.Connection | asyncpg.Pool"


def _page(sql: str, args: list[Any], limit: int, starting_after: str | None,
          column: str = "id") -> tuple[str, list[Any]]:
    """Newest first, `limit + 1` rows (for has_more), older than `starting_after`."""
    if starting_after:
        args.append(starting_after)
        sql += f" AND {column} < ${len(args)}"
    args.append(limit + 1)
    sql += f" ORDER BY {column} DESC LIMIT ${len(args)}"
    return sql, args


# ---------------------------------------------------------------- tenants and keys


def _tenant(row: asyncpg.Record) -> Tenant:
    return Tenant(row["id"], row["name"], row["created_at"])


async def insert_tenant(conn: Conn, tenant: Tenant) -> None:
    await conn.execute("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)",
                       tenant.id, tenant.name, tenant.created_at)


async def get_tenant(conn: Conn, tenant_id: str) -> Tenant | None:
    row = await conn.fetchrow("SELECT * FROM tenants WHERE id = $1", tenant_id)
    return _tenant(row) if row else None


async def list_tenants(conn: Conn, limit: int, starting_after: str | None) -> list[Tenant]:
    sql, args = _page("SELECT * FROM tenants WHERE true", [], limit, starting_after)
    return [_tenant(r) for r in await conn.fetch(sql, *args)]


def _api_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(row["key_id"], row["tenant_id"], row["environment"], row["kind"],
                  row["key_hash"], row["key_prefix"], row["created_at"], row["revoked_at"])


async def insert_api_keys(conn: Conn, keys: Sequence[ApiKey]) -> None:
    await conn.executemany(
        "INSERT INTO api_keys (key_id, tenant_id, environment, kind, key_hash, key_prefix,"
        " created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        [(k.key_id, k.tenant_id, k.environment, k.kind, k.key_hash, k.key_prefix, k.created_at)
         for k in keys],
    )


async def get_api_key(conn: Conn, key_id: str, *, for_update: bool = False) -> ApiKey | None:
    row = await conn.fetchrow(
        "SELECT * FROM api_keys WHERE key_id = $1" + (" FOR UPDATE" if for_update else ""),
        key_id,
    )
    return _api_key(row) if row else None


async def list_api_keys(conn: Conn, tenant_id: str, limit: int,
                        starting_after: str | None) -> list[ApiKey]:
    sql, args = _page("SELECT * FROM api_keys WHERE tenant_id = $1", [tenant_id], limit,
                      starting_after, column="key_id")
    return [_api_key(r) for r in await conn.fetch(sql, *args)]


async def revoke_api_key(conn: Conn, key_id: str, at: datetime) -> None:
    await conn.execute(
        "UPDATE api_keys SET revoked_at = $2 WHERE key_id = $1 AND revoked_at IS NULL",
        key_id, at,
    )


# ---------------------------------------------------------------- test clocks


def _clock(row: asyncpg.Record) -> TestClock:
    return TestClock(row["id"], row["tenant_id"], row["environment"], row["name"],
                     row["frozen_time"], row["status"], row["created_at"])


async def insert_clock(conn: Conn, clock: TestClock) -> None:
    await conn.execute(
        "INSERT INTO test_clocks (id, tenant_id, environment, name, frozen_time, status,"
        " created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        clock.id, clock.tenant_id, clock.environment, clock.name, clock.frozen_time,
        clock.status, clock.created_at,
    )


async def get_clock(conn: Conn, tenant_id: str, environment: str, clock_id: str, *,
                    for_update: bool = False) -> TestClock | None:
    row = await conn.fetchrow(
        "SELECT * FROM test_clocks WHERE id = $1 AND tenant_id = $2 AND environment = $3"
        + (" FOR UPDATE" if for_update else ""),
        clock_id, tenant_id, environment,
    )
    return _clock(row) if row else None


async def list_clocks(conn: Conn, tenant_id: str, environment: str, limit: int,
                      starting_after: str | None) -> list[TestClock]:
    sql, args = _page("SELECT * FROM test_clocks WHERE tenant_id = $1 AND environment = $2",
                      [tenant_id, environment], limit, starting_after)
    return [_clock(r) for r in await conn.fetch(sql, *args)]


async def clock_time_for_share(conn: Conn, clock_id: str) -> datetime:
    """A clock's time, share-locked until the caller commits (an advance waits for it)."""
    return await conn.fetchval(
        "SELECT frozen_time FROM test_clocks WHERE id = $1 FOR SHARE", clock_id)


async def update_clock_time(conn: Conn, clock: TestClock) -> None:
    await conn.execute("UPDATE test_clocks SET frozen_time = $2 WHERE id = $1",
                       clock.id, clock.frozen_time)


# ---------------------------------------------------------------- customers


def _customer(row: asyncpg.Record) -> Customer:
    return Customer(row["id"], row["tenant_id"], row["environment"], row["external_id"],
                    row["name"], row["email"], row["currency"], row["test_clock_id"],
                    row["metadata"], row["created_at"])


async def insert_customer(conn: Conn, c: Customer) -> bool:
    """False when the external id is taken (the unique constraint decides, race-free)."""
    inserted = await conn.fetchval(
        "INSERT INTO customers (id, tenant_id, environment, external_id, name, email, currency,"
        " test_clock_id, metadata, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)"
        " ON CONFLICT ON CONSTRAINT customers_external_id DO NOTHING RETURNING true",
        c.id, c.tenant_id, c.environment, c.external_id, c.name, c.email, c.currency,
        c.test_clock_id, c.metadata, c.created_at,
    )
    return bool(inserted)


async def get_customer(conn: Conn, tenant_id: str, environment: str,
                       ident: str) -> Customer | None:
    """By `cus_` id or by external id (the id wins if both match)."""
    row = await conn.fetchrow(
        "SELECT * FROM customers WHERE tenant_id = $1 AND environment = $2"
        " AND (id = $3 OR external_id = $3) ORDER BY (id = $3) DESC LIMIT 1",
        tenant_id, environment, ident,
    )
    return _customer(row) if row else None


async def list_customers(conn: Conn, tenant_id: str, environment: str, limit: int,
                         starting_after: str | None) -> list[Customer]:
    sql, args = _page("SELECT * FROM customers WHERE tenant_id = $1 AND environment = $2",
                      [tenant_id, environment], limit, starting_after)
    return [_customer(r) for r in await conn.fetch(sql, *args)]


# ---------------------------------------------------------------- meters


def _meter(row: asyncpg.Record) -> Meter:
    return Meter(row["id"], row["tenant_id"], row["environment"], row["code"], row["name"],
                 row["aggregation"], row["field"], row["created_at"])


async def insert_meter(conn: Conn, m: Meter) -> bool:
    inserted = await conn.fetchval(
        "INSERT INTO meters (id, tenant_id, environment, code, name, aggregation, field,"
        " created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)"
        " ON CONFLICT ON CONSTRAINT meters_code DO NOTHING RETURNING true",
        m.id, m.tenant_id, m.environment, m.code, m.name, m.aggregation, m.field, m.created_at,
    )
    return bool(inserted)


async def get_meter(conn: Conn, tenant_id: str, environment: str, ident: str) -> Meter | None:
    """By `mtr_` id or by code."""
    row = await conn.fetchrow(
        "SELECT * FROM meters WHERE tenant_id = $1 AND environment = $2"
        " AND (id = $3 OR code = $3) ORDER BY (id = $3) DESC LIMIT 1",
        tenant_id, environment, ident,
    )
    return _meter(row) if row else None


async def list_meters(conn: Conn, tenant_id: str, environment: str, limit: int,
                      starting_after: str | None) -> list[Meter]:
    sql, args = _page("SELECT * FROM meters WHERE tenant_id = $1 AND environment = $2",
                      [tenant_id, environment], limit, starting_after)
    return [_meter(r) for r in await conn.fetch(sql, *args)]


# ---------------------------------------------------------------- plans


def _charge_json(c: Charge) -> dict[str, Any]:
    return {"charge_id": c.charge_id, "type": c.type, "timing": c.timing,
            "amount": c.amount_str, "meter": c.meter, "model": c.model,
            "unit_price": c.unit_price_str}


def _charge(d: dict[str, Any]) -> Charge:
    return Charge(
        charge_id=d["charge_id"], type=d["type"], timing=d["timing"],
        amount=Decimal(d["amount"]) if d.get("amount") is not None else None,
        meter=d.get("meter"), model=d.get("model"),
        unit_price=Decimal(d["unit_price"]) if d.get("unit_price") is not None else None,
    )


def _plan(row: asyncpg.Record, prefix: str = "") -> Plan:
    return Plan(
        id=row[prefix + "id"], tenant_id=row[prefix + "tenant_id"],
        environment=row[prefix + "environment"], code=row[prefix + "code"],
        name=row[prefix + "name"], currency=row[prefix + "currency"],
        interval=row[prefix + "billing_interval"], interval_count=row[prefix + "interval_count"],
        charges=tuple(_charge(c) for c in row[prefix + "charges"]),
        created_at=row[prefix + "created_at"],
    )


async def insert_plan(conn: Conn, p: Plan) -> bool:
    inserted = await conn.fetchval(
        "INSERT INTO plans (id, tenant_id, environment, code, name, currency, billing_interval,"
        " interval_count, charges, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)"
        " ON CONFLICT ON CONSTRAINT plans_code DO NOTHING RETURNING true",
        p.id, p.tenant_id, p.environment, p.code, p.name, p.currency, p.interval,
        p.interval_count, [_charge_json(c) for c in p.charges], p.created_at,
    )
    return bool(inserted)


async def get_plan(conn: Conn, tenant_id: str, environment: str, ident: str) -> Plan | None:
    """By `plan_` id or by code."""
    row = await conn.fetchrow(
        "SELECT * FROM plans WHERE tenant_id = $1 AND environment = $2"
        " AND (id = $3 OR code = $3) ORDER BY (id = $3) DESC LIMIT 1",
        tenant_id, environment, ident,
    )
    return _plan(row) if row else None


async def list_plans(conn: Conn, tenant_id: str, environment: str, limit: int,
                     starting_after: str | None) -> list[Plan]:
    sql, args = _page("SELECT * FROM plans WHERE tenant_id = $1 AND environment = $2",
                      [tenant_id, environment], limit, starting_after)
    return [_plan(r) for r in await conn.fetch(sql, *args)]


# ---------------------------------------------------------------- subscriptions

_SUBSCRIPTION_SELECT = """
SELECT s.id, s.tenant_id, s.environment, s.customer_id, s.status, s.started_at,
       s.period_index, s.current_period_start, s.current_period_end, s.test_clock_id,
       s.created_at, c.external_id AS customer_external_id,
       p.id AS p_id, p.tenant_id AS p_tenant_id, p.environment AS p_environment,
       p.code AS p_code, p.name AS p_name, p.currency AS p_currency,
       p.billing_interval AS p_billing_interval, p.interval_count AS p_interval_count,
       p.charges AS p_charges, p.created_at AS p_created_at
  FROM subscriptions s
  JOIN customers c ON c.id = s.customer_id
  JOIN plans p ON p.id = s.plan_id
"""


def _subscription(row: asyncpg.Record) -> Subscription:
    return Subscription(
        id=row["id"], tenant_id=row["tenant_id"], environment=row["environment"],
        customer_id=row["customer_id"], customer_external_id=row["customer_external_id"],
        plan=_plan(row, "p_"), status=row["status"], started_at=row["started_at"],
        period_index=row["period_index"], current_period_start=row["current_period_start"],
        current_period_end=row["current_period_end"], test_clock_id=row["test_clock_id"],
        created_at=row["created_at"],
    )


async def insert_subscription(conn: Conn, s: Subscription) -> None:
    await conn.execute(
        "INSERT INTO subscriptions (id, tenant_id, environment, customer_id, plan_id, status,"
        " started_at, period_index, current_period_start, current_period_end, test_clock_id,"
        " created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)",
        s.id, s.tenant_id, s.environment, s.customer_id, s.plan.id, s.status, s.started_at,
        s.period_index, s.current_period_start, s.current_period_end, s.test_clock_id,
        s.created_at,
    )


async def get_subscription(conn: Conn, tenant_id: str, environment: str, subscription_id: str,
                           *, for_update: bool = False) -> Subscription | None:
    row = await conn.fetchrow(
        _SUBSCRIPTION_SELECT
        + " WHERE s.id = $1 AND s.tenant_id = $2 AND s.environment = $3"
        + (" FOR UPDATE OF s" if for_update else ""),
        subscription_id, tenant_id, environment,
    )
    return _subscription(row) if row else None


async def list_subscriptions(conn: Conn, tenant_id: str, environment: str, limit: int,
                             starting_after: str | None,
                             customer_id: str | None = None) -> list[Subscription]:
    sql = _SUBSCRIPTION_SELECT + " WHERE s.tenant_id = $1 AND s.environment = $2"
    args: list[Any] = [tenant_id, environment]
    if customer_id is not None:
        args.append(customer_id)
        sql += f" AND s.customer_id = ${len(args)}"
    sql, args = _page(sql, args, limit, starting_after, column="s.id")
    return [_subscription(r) for r in await conn.fetch(sql, *args)]


async def due_on_clock(conn: Conn, clock_id: str, now: datetime) -> list[Subscription]:
    """Renewable subscriptions of the customers attached to a clock whose period has ended
    by `now`, locked for the caller's transaction."""
    rows = await conn.fetch(
        _SUBSCRIPTION_SELECT
        + " WHERE c.test_clock_id = $1 AND s.status IN ('active', 'past_due')"
        "   AND s.current_period_end <= $2 ORDER BY s.id FOR UPDATE OF s",
        clock_id, now,
    )
    return [_subscription(r) for r in rows]


async def due_on_wall_clock(conn: Conn, now: datetime, limit: int) -> list[Subscription]:
    """Renewable subscriptions on the wall clock (no test clock) whose period has ended,
    skipping rows another replica's renewal transaction holds."""
    rows = await conn.fetch(
        _SUBSCRIPTION_SELECT
        + " WHERE s.test_clock_id IS NULL AND s.status IN ('active', 'past_due')"
        "   AND s.current_period_end <= $1"
        " ORDER BY s.current_period_end LIMIT $2 FOR UPDATE OF s SKIP LOCKED",
        now, limit,
    )
    return [_subscription(r) for r in rows]


async def update_subscription(conn: Conn, s: Subscription) -> None:
    await conn.execute(
        "UPDATE subscriptions SET status = $2, period_index = $3, current_period_start = $4,"
        " current_period_end = $5, updated_at = now() WHERE id = $1",
        s.id, s.status, s.period_index, s.current_period_start, s.current_period_end,
    )
