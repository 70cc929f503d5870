"""All SQL of webhook_dispatch, and the row ↔ domain mapping."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from billstream_webhook_dispatch.domain import (
    AttemptOutcome,
    AttemptResult,
    Claim,
    EndpointTarget,
)

#: Channel the delivery worker LISTENs on; NOTIFY is delivered at commit.
DELIVERY_CHANNEL = "billstream_webhook_deliveries"

_RESCHEDULE = """
    status = 'pending', next_attempt_at = now(), cycle_attempts = 0, locked_until = NULL,
    current_attempt_id = NULL, updated_at = now()
"""


async def notify_worker(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_notify($1, '')", DELIVERY_CHANNEL)


# ---------------------------------------------------------------- endpoints


async def insert_endpoint(
    conn: asyncpg.Connection, *, endpoint_id: str, tenant_id: str, environment: str, url: str,
    enabled_events: Sequence[str], description: str | None, secret: str,
) -> asyncpg.Record:
    return await conn.fetchrow(
        "INSERT INTO webhook_endpoints (id, tenant_id, environment, url, enabled_events,"
        " description, secret) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
        endpoint_id, tenant_id, environment, url, list(enabled_events), description, secret,
    )


async def get_endpoint(
    conn: asyncpg.Connection, tenant_id: str, environment: str, endpoint_id: str,
    *, for_update: bool = False,
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM webhook_endpoints WHERE id = $1 AND tenant_id = $2 AND environment = $3"
        + (" FOR UPDATE" if for_update else ""),
        endpoint_id, tenant_id, environment,
    )


async def list_endpoints(
    conn: asyncpg.Connection, tenant_id: str, environment: str, limit: int,
    starting_after: str | None,
) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM webhook_endpoints WHERE tenant_id = $1 AND environment = $2"
        " AND ($3::text IS NULL OR id < $3) ORDER BY id DESC LIMIT $4",
        tenant_id, environment, starting_after, limit,
    )


async def disable_endpoint(conn: asyncpg.Connection, endpoint_id: str) -> asyncpg.Record:
    return await conn.fetchrow(
        "UPDATE webhook_endpoints SET status = 'disabled',"
        " disabled_at = coalesce(disabled_at, now()) WHERE id = $1 RETURNING *",
        endpoint_id,
    )


async def cancel_pending_deliveries(conn: asyncpg.Connection, endpoint_id: str) -> int:
    result = await conn.execute(
        "UPDATE deliveries SET status = 'canceled', next_attempt_at = NULL, updated_at = now()"
        " WHERE endpoint_id = $1 AND status = 'pending'",
        endpoint_id,
    )
    return int(result.split()[-1])


async def enabled_endpoints(
    conn: asyncpg.Connection, tenant_id: str, environment: str
) -> list[EndpointTarget]:
    """The enabled endpoints of a tenant's environment, share-locked so that an endpoint being
    disabled concurrently either waits for this transaction (and then cancels what it created)
    or is seen disabled."""
    rows = await conn.fetch(
        "SELECT id, enabled_events, created_at FROM webhook_endpoints"
        " WHERE tenant_id = $1 AND environment = $2 AND status = 'enabled' FOR SHARE",
        tenant_id, environment,
    )
    return [EndpointTarget(r["id"], r["enabled_events"], r["created_at"]) for r in rows]


# ---------------------------------------------------------------- the public event log


async def insert_event(
    conn: asyncpg.Connection, *, event_id: str, tenant_id: str, environment: str, type: str,
    version: int, source: str, occurred_at: datetime, recorded_at: datetime, body: bytes,
) -> bool:
    """Store a public event; False when it was already stored."""
    inserted = await conn.fetchval(
        "INSERT INTO events (id, tenant_id, environment, type, version, source, occurred_at,"
        " recorded_at, body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        " ON CONFLICT (id) DO NOTHING RETURNING true",
        event_id, tenant_id, environment, type, version, source, occurred_at, recorded_at, body,
    )
    return bool(inserted)


async def list_events(
    conn: asyncpg.Connection, tenant_id: str, environment: str, type: str | None, limit: int,
    starting_after: str | None,
) -> list[bytes]:
    rows = await conn.fetch(
        "SELECT body FROM events WHERE tenant_id = $1 AND environment = $2"
        " AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR id < $4)"
        " ORDER BY id DESC LIMIT $5",
        tenant_id, environment, type, starting_after, limit,
    )
    return [r["body"] for r in rows]


async def get_event(
    conn: asyncpg.Connection, tenant_id: str, environment: str, event_id: str
) -> bytes | None:
    return await conn.fetchval(
        "SELECT body FROM events WHERE id = $1 AND tenant_id = $2 AND environment = $3",
        event_id, tenant_id, environment,
    )


# ---------------------------------------------------------------- deliveries


async def insert_deliveries(
    conn: asyncpg.Connection, *, tenant_id: str, environment: str, event_id: str,
    event_type: str, payload: bytes, targets: Sequence[tuple[str, str]],
) -> int:
    """One pending delivery per (delivery id, endpoint id) in `targets`; an (endpoint, event)
    that already has one is left alone. Returns how many were created."""
    if not targets:
        return 0
    rows = await conn.fetch(
        "INSERT INTO deliveries (id, tenant_id, environment, endpoint_id, event_id, event_type,"
        " payload, next_attempt_at)"
        " SELECT t.id, $3, $4, t.endpoint_id, $5, $6, $7, now()"
        " FROM unnest($1::text[], $2::text[]) AS t(id, endpoint_id)"
        " ON CONFLICT (endpoint_id, event_id) DO NOTHING RETURNING id",
        [t[0] for t in targets], [t[1] for t in targets], tenant_id, environment, event_id,
        event_type, payload,
    )
    return len(rows)


_DELIVERY_COLUMNS = (
    "d.id, d.tenant_id, d.environment, d.endpoint_id, d.event_id, d.event_type, d.status,"
    " d.attempts, d.next_attempt_at, d.locked_until, d.last_status_code, d.last_error,"
    " d.last_attempt_at, d.delivered_at, d.created_at"
)


async def list_deliveries(
    conn: asyncpg.Connection, tenant_id: str, environment: str, *, endpoint_id: str | None,
    event_id: str | None, status: str | None, limit: int, starting_after: str | None,
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {_DELIVERY_COLUMNS} FROM deliveries d"
        " WHERE d.tenant_id = $1 AND d.environment = $2"
        " AND ($3::text IS NULL OR d.endpoint_id = $3) AND ($4::text IS NULL OR d.event_id = $4)"
        " AND ($5::text IS NULL OR d.status = $5) AND ($6::text IS NULL OR d.id < $6)"
        " ORDER BY d.id DESC LIMIT $7",
        tenant_id, environment, endpoint_id, event_id, status, starting_after, limit,
    )


async def get_delivery(
    conn: asyncpg.Connection, tenant_id: str, environment: str, delivery_id: str,
    *, for_update: bool = False,
) -> asyncpg.Record | None:
    """The delivery, with its endpoint's status and whether its lease has expired."""
    return await conn.fetchrow(
        f"SELECT {_DELIVERY_COLUMNS}, e.status AS endpoint_status,"
        " coalesce(d.locked_until <= now(), true) AS lease_expired"
        " FROM deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id"
        " WHERE d.id = $1 AND d.tenant_id = $2 AND d.environment = $3"
        + (" FOR UPDATE OF d" if for_update else ""),
        delivery_id, tenant_id, environment,
    )


async def reschedule_delivery(conn: asyncpg.Connection, delivery_id: str) -> None:
    await conn.execute(f"UPDATE deliveries SET {_RESCHEDULE} WHERE id = $1", delivery_id)


async def replay_endpoint(
    conn: asyncpg.Connection, *, tenant_id: str, environment: str, endpoint_id: str,
    event_ids: Sequence[str], new_ids: Sequence[str],
) -> int:
    """(Re)schedule a delivery to `endpoint_id` of each of `event_ids` (with `new_ids` for the
    ones to create): create the missing ones, reschedule the others unless an attempt is in
    flight. Returns how many were scheduled."""
    rows = await conn.fetch(
        "INSERT INTO deliveries (id, tenant_id, environment, endpoint_id, event_id, event_type,"
        " payload, next_attempt_at)"
        " SELECT u.id, $3, $4, $5, ev.id, ev.type, ev.body, now()"
        " FROM unnest($1::text[], $2::text[]) AS u(id, event_id)"
        " JOIN events ev ON ev.id = u.event_id"
        f" ON CONFLICT (endpoint_id, event_id) DO UPDATE SET {_RESCHEDULE}"
        " WHERE deliveries.status <> 'sending' OR deliveries.locked_until <= now()"
        " RETURNING deliveries.id",
        list(new_ids), list(event_ids), tenant_id, environment, endpoint_id,
    )
    return len(rows)


async def event_ids_since(
    conn: asyncpg.Connection, tenant_id: str, environment: str, since: datetime,
    enabled_events: Sequence[str],
) -> list[str]:
    rows = await conn.fetch(
        "SELECT id FROM events WHERE tenant_id = $1 AND environment = $2 AND recorded_at >= $3"
        " AND ('*' = ANY($4::text[]) OR type = ANY($4::text[])) ORDER BY id",
        tenant_id, environment, since, list(enabled_events),
    )
    return [r["id"] for r in rows]


async def list_attempts(
    conn: asyncpg.Connection, tenant_id: str, environment: str, delivery_id: str, limit: int,
    starting_after: str | None,
) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT a.*, d.endpoint_id, d.event_id FROM delivery_attempts a"
        " JOIN deliveries d ON d.id = a.delivery_id"
        " WHERE a.delivery_id = $1 AND a.tenant_id = $2 AND a.environment = $3"
        " AND ($4::text IS NULL OR a.id < $4) ORDER BY a.id DESC LIMIT $5",
        delivery_id, tenant_id, environment, starting_after, limit,
    )


# ---------------------------------------------------------------- the delivery worker


async def due_delivery_ids(conn: asyncpg.Connection, limit: int) -> list[str]:
    """Deliveries due now, or whose sender's lease expired, row-locked (SKIP LOCKED: several
    workers claim disjoint sets)."""
    rows = await conn.fetch(
        "SELECT id FROM deliveries"
        " WHERE (status = 'pending' AND next_attempt_at <= now())"
        "    OR (status = 'sending' AND locked_until <= now())"
        " ORDER BY next_attempt_at, event_id LIMIT $1 FOR UPDATE SKIP LOCKED",
        limit,
    )
    return [r["id"] for r in rows]


async def claim(
    conn: asyncpg.Connection, delivery_ids: Sequence[str], attempt_ids: Sequence[str],
    lease_s: float,
) -> list[Claim]:
    """Mark the (locked) deliveries `sending` under a lease and open an attempt record each.
    An attempt left open by a worker that died is closed as lost; the deliveries of an
    endpoint disabled meanwhile are canceled instead."""
    ids = list(delivery_ids)
    await conn.execute(
        "UPDATE delivery_attempts SET finished_at = now(),"
        " error = 'lost: the worker sending this attempt stopped before recording its result'"
        " WHERE delivery_id = ANY($1::text[]) AND finished_at IS NULL",
        ids,
    )
    await conn.execute(
        "UPDATE deliveries d SET status = 'canceled', next_attempt_at = NULL,"
        " locked_until = NULL, current_attempt_id = NULL, updated_at = now()"
        " FROM webhook_endpoints e"
        " WHERE d.id = ANY($1::text[]) AND e.id = d.endpoint_id AND e.status <> 'enabled'",
        ids,
    )
    rows = await conn.fetch(
        "UPDATE deliveries d SET status = 'sending', attempts = d.attempts + 1,"
        " cycle_attempts = d.cycle_attempts + 1,"
        " locked_until = now() + make_interval(secs => $3), current_attempt_id = u.attempt_id,"
        " last_attempt_at = now(), updated_at = now()"
        " FROM unnest($1::text[], $2::text[]) AS u(id, attempt_id), webhook_endpoints e"
        " WHERE d.id = u.id AND e.id = d.endpoint_id AND e.status = 'enabled'"
        " RETURNING d.id, u.attempt_id, d.attempts, d.cycle_attempts, d.event_id, d.endpoint_id,"
        " d.tenant_id, d.environment, e.url, e.secret, d.payload",
        ids, list(attempt_ids), lease_s,
    )
    if not rows:
        return []
    await conn.executemany(
        "INSERT INTO delivery_attempts (id, delivery_id, tenant_id, environment, number)"
        " VALUES ($1, $2, $3, $4, $5)",
        [(r["attempt_id"], r["id"], r["tenant_id"], r["environment"], r["attempts"])
         for r in rows],
    )
    return [
        Claim(
            delivery_id=r["id"], attempt_id=r["attempt_id"], attempt_number=r["attempts"],
            cycle_attempts=r["cycle_attempts"], event_id=r["event_id"],
            endpoint_id=r["endpoint_id"], url=r["url"], secret=r["secret"],
            payload=bytes(r["payload"]),
        )
        for r in rows
    ]


async def seconds_until_next_due(conn: asyncpg.Connection) -> float | None:
    """Seconds until the earliest scheduled attempt or lease expiry (negative: overdue), or
    None when nothing is scheduled."""
    return await conn.fetchval(
        "SELECT extract(epoch FROM min(t) - now())::float8 FROM ("
        "  SELECT min(next_attempt_at) AS t FROM deliveries WHERE status = 'pending'"
        "  UNION ALL"
        "  SELECT min(locked_until) FROM deliveries WHERE status = 'sending') AS due"
    )


async def endpoint_enabled(conn: asyncpg.Connection, endpoint_id: str) -> bool:
    return await conn.fetchval(
        "SELECT status = 'enabled' FROM webhook_endpoints WHERE id = $1", endpoint_id
    ) or False


async def record_attempt(
    conn: asyncpg.Connection, attempt_id: str, result: AttemptResult
) -> None:
    await conn.execute(
        "UPDATE delivery_attempts SET finished_at = now(), status_code = $2, error = $3,"
        " duration_ms = $4, response_body = $5 WHERE id = $1",
        attempt_id, result.status_code, result.error, result.duration_ms, result.response_body,
    )


async def settle(
    conn: asyncpg.Connection, claim_: Claim, result: AttemptResult, outcome: AttemptOutcome
) -> bool:
    """Apply an attempt's outcome, unless the delivery was taken over meanwhile (its lease
    expired and it was claimed again, or it was rescheduled). False when it was."""
    settled = await conn.fetchval(
        "UPDATE deliveries SET status = $3,"
        " next_attempt_at = CASE WHEN $4::float8 IS NULL THEN NULL"
        "                        ELSE now() + make_interval(secs => $4::float8) END,"
        " locked_until = NULL,"
        " current_attempt_id = NULL, last_status_code = $5, last_error = $6,"
        " delivered_at = CASE WHEN $3 = 'delivered' THEN now() ELSE delivered_at END,"
        " updated_at = now()"
        " WHERE id = $1 AND current_attempt_id = $2 AND status = 'sending' RETURNING true",
        claim_.delivery_id, claim_.attempt_id, outcome.status, outcome.retry_in_s,
        result.status_code, result.error,
    )
    return bool(settled)


async def release(conn: asyncpg.Connection, attempt_ids: Sequence[str]) -> None:
    """Give back claims a stopping worker could not finish: due again now."""
    if not attempt_ids:
        return
    await conn.execute(
        "UPDATE delivery_attempts SET finished_at = now(),"
        " error = 'interrupted: the worker stopped before a response'"
        " WHERE id = ANY($1::text[]) AND finished_at IS NULL",
        list(attempt_ids),
    )
    await conn.execute(
        "UPDATE deliveries SET status = 'pending', next_attempt_at = now(), locked_until = NULL,"
        " current_attempt_id = NULL, updated_at = now()"
        " WHERE current_attempt_id = ANY($1::text[]) AND status = 'sending'",
        list(attempt_ids),
    )

