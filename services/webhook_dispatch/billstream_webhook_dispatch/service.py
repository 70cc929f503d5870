"""Use cases of webhook_dispatch: each opens its transaction (or runs in the consumer's), loads,
asks the domain, writes, commits. webhook_dispatch emits no events of its own: its state
(endpoints, deliveries, attempts) is local bookkeeping that no other service reacts to."""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from prometheus_client import Counter, Gauge, Histogram

from billstream_contracts import Envelope, all_event_types, is_public
from billstream_runtime.auth import AuthContext
from billstream_runtime.errors import InvalidRequest, NotFound
from billstream_runtime.http import wait_for
from billstream_runtime.ids import new_id
from billstream_runtime.metrics import Metrics
from billstream_webhook_dispatch import repository as repo
from billstream_webhook_dispatch.domain import (
    AttemptOutcome,
    AttemptResult,
    Claim,
    RetryPolicy,
    after_attempt,
    encode_body,
    new_secret,
    public_event,
    recipients,
    retry_refusal,
    validate_description,
    validate_enabled_events,
    validate_url,
)
from billstream_webhook_dispatch.schemas import WebhookEndpointCreate


@functools.cache
def public_event_types() -> tuple[str, ...]:
    """Every event type that is public in at least one version, sorted."""
    return tuple(sorted({t for (t, _v), model in all_event_types().items() if model.public}))


# ---------------------------------------------------------------- metrics


@dataclass(frozen=True, slots=True)
class DispatchMetrics:
    public_events: Counter
    deliveries_created: Counter
    attempts: Counter
    attempt_seconds: Histogram
    in_flight: Gauge


def dispatch_metrics(metrics: Metrics) -> DispatchMetrics:
    """The service's own metrics, registered once on the host's registry."""
    existing = metrics.custom.get("webhook_dispatch")
    if isinstance(existing, DispatchMetrics):
        return existing
    r = metrics.registry
    made = DispatchMetrics(
        public_events=Counter(
            "billstream_webhook_public_events_total",
            "Consumed events by outcome (stored, duplicate, not_public)", ["outcome"], registry=r,
        ),
        deliveries_created=Counter(
            "billstream_webhook_deliveries_created_total", "Deliveries created", registry=r,
        ),
        attempts=Counter(
            "billstream_webhook_attempts_total",
            "Delivery attempts by outcome (delivered, retry, failed, canceled, superseded)",
            ["outcome"], registry=r,
        ),
        attempt_seconds=Histogram(
            "billstream_webhook_attempt_seconds", "Duration of one delivery attempt", registry=r,
        ),
        in_flight=Gauge(
            "billstream_webhook_attempts_in_flight", "Delivery attempts in flight", registry=r,
            multiprocess_mode="livesum",  # of every worker
        ),
    )
    metrics.custom["webhook_dispatch"] = made
    return made


# ---------------------------------------------------------------- the public event log


async def record_public_event(
    conn: asyncpg.Connection, envelope: Envelope, metrics: DispatchMetrics | None = None
) -> int:
    """In the consumer's transaction: store a public event in the log and create a delivery
    per subscribed endpoint. Returns how many deliveries were created."""
    if not is_public(envelope.type, envelope.version):
        if metrics:
            metrics.public_events.labels("not_public").inc()
        return 0
    body = encode_body(public_event(
        event_id=envelope.id, event_type=envelope.type, version=envelope.version,
        environment=envelope.environment, occurred_at=envelope.occurred_at,
        recorded_at=envelope.recorded_at, data=envelope.data,
    ))
    stored = await repo.insert_event(
        conn, event_id=envelope.id, tenant_id=envelope.tenant_id,
        environment=envelope.environment, type=envelope.type, version=envelope.version,
        source=envelope.source, occurred_at=envelope.occurred_at,
        recorded_at=envelope.recorded_at, body=body,
    )
    if not stored:  # already in the log (same id from another path): reuse its exact bytes
        body = bytes(await repo.get_event(conn, envelope.tenant_id, envelope.environment,
                                          envelope.id) or body)
    endpoints = await repo.enabled_endpoints(conn, envelope.tenant_id, envelope.environment)
    targets = recipients(endpoints, envelope.type, envelope.recorded_at)
    created = await repo.insert_deliveries(
        conn, tenant_id=envelope.tenant_id, environment=envelope.environment,
        event_id=envelope.id, event_type=envelope.type, payload=body,
        targets=[(new_id("wd"), endpoint_id) for endpoint_id in targets],
    )
    if created:
        await repo.notify_worker(conn)
    if metrics:
        metrics.public_events.labels("stored" if stored else "duplicate").inc()
        metrics.deliveries_created.inc(created)
    return created


async def list_events(pool: asyncpg.Pool, auth: AuthContext, type: str | None, limit: int,
                      starting_after: str | None) -> list[bytes]:
    return await repo.list_events(pool, auth.tenant_id, auth.environment, type, limit,
                                  starting_after)


async def get_event(pool: asyncpg.Pool, auth: AuthContext, event_id: str,
                    wait_s: float) -> bytes:
    async def fetch():
        return await repo.get_event(pool, auth.tenant_id, auth.environment, event_id)

    # The event may be committed by its source and not yet consumed here.
    body = await wait_for(fetch, wait_s) if event_id.startswith("evt_") else None
    if body is None:
        raise NotFound("event", event_id, param="id")
    return bytes(body)


# ---------------------------------------------------------------- endpoints


async def create_endpoint(
    pool: asyncpg.Pool, auth: AuthContext, req: WebhookEndpointCreate,
    *, allow_private: bool = False,
) -> asyncpg.Record:
    url = validate_url(req.url, allow_private=allow_private)
    enabled_events = validate_enabled_events(req.enabled_events, public_event_types())
    description = validate_description(req.description)
    return await repo.insert_endpoint(
        pool, endpoint_id=new_id("we"), tenant_id=auth.tenant_id,
        environment=auth.environment, url=url, enabled_events=enabled_events,
        description=description, secret=new_secret(),
    )


async def list_endpoints(pool: asyncpg.Pool, auth: AuthContext, limit: int,
                         starting_after: str | None) -> list[asyncpg.Record]:
    return await repo.list_endpoints(pool, auth.tenant_id, auth.environment, limit,
                                     starting_after)


async def get_endpoint(pool: asyncpg.Pool, auth: AuthContext,
                       endpoint_id: str) -> asyncpg.Record:
    row = await repo.get_endpoint(pool, auth.tenant_id, auth.environment, endpoint_id)
    if row is None:
        raise NotFound("webhook_endpoint", endpoint_id, param="id")
    return row


async def disable_endpoint(pool: asyncpg.Pool, auth: AuthContext,
                           endpoint_id: str) -> asyncpg.Record:
    """Disable an endpoint (idempotent) and cancel its pending deliveries. An attempt in flight
    finishes; if it fails, its delivery is canceled rather than retried."""
    async with pool.acquire() as conn, conn.transaction():
        row = await repo.get_endpoint(conn, auth.tenant_id, auth.environment, endpoint_id,
                                      for_update=True)
        if row is None:
            raise NotFound("webhook_endpoint", endpoint_id, param="id")
        row = await repo.disable_endpoint(conn, endpoint_id)
        await repo.cancel_pending_deliveries(conn, endpoint_id)
        return row


async def replay_endpoint(pool: asyncpg.Pool, auth: AuthContext, endpoint_id: str,
                          since: datetime) -> int:
    """Send again to this endpoint every stored event created since `since` that it subscribes
    to, delivered or not, including events older than the endpoint."""
    async with pool.acquire() as conn, conn.transaction():
        endpoint = await repo.get_endpoint(conn, auth.tenant_id, auth.environment, endpoint_id,
                                           for_update=True)
        if endpoint is None:
            raise NotFound("webhook_endpoint", endpoint_id, param="id")
        if endpoint["status"] != "enabled":
            raise InvalidRequest("endpoint_disabled",
                                 "The webhook endpoint is disabled; it cannot replay events")
        event_ids = await repo.event_ids_since(conn, auth.tenant_id, auth.environment, since,
                                               endpoint["enabled_events"])
        enqueued = await repo.replay_endpoint(
            conn, tenant_id=auth.tenant_id, environment=auth.environment,
            endpoint_id=endpoint_id, event_ids=event_ids,
            new_ids=[new_id("wd") for _ in event_ids],
        )
        if enqueued:
            await repo.notify_worker(conn)
        return enqueued


# ---------------------------------------------------------------- deliveries


async def list_deliveries(
    pool: asyncpg.Pool, auth: AuthContext, *, endpoint_id: str | None, event_id: str | None,
    status: str | None, limit: int, starting_after: str | None,
) -> list[asyncpg.Record]:
    return await repo.list_deliveries(
        pool, auth.tenant_id, auth.environment, endpoint_id=endpoint_id, event_id=event_id,
        status=status, limit=limit, starting_after=starting_after,
    )


async def get_delivery(pool: asyncpg.Pool, auth: AuthContext,
                       delivery_id: str) -> asyncpg.Record:
    row = await repo.get_delivery(pool, auth.tenant_id, auth.environment, delivery_id)
    if row is None:
        raise NotFound("webhook_delivery", delivery_id, param="id")
    return row


async def list_attempts(pool: asyncpg.Pool, auth: AuthContext, delivery_id: str, limit: int,
                        starting_after: str | None) -> list[asyncpg.Record]:
    await get_delivery(pool, auth, delivery_id)
    return await repo.list_attempts(pool, auth.tenant_id, auth.environment, delivery_id, limit,
                                    starting_after)


async def retry_delivery(pool: asyncpg.Pool, auth: AuthContext,
                         delivery_id: str) -> asyncpg.Record:
    """Schedule an immediate new attempt (a new cycle of retries), delivered ones included."""
    async with pool.acquire() as conn, conn.transaction():
        row = await repo.get_delivery(conn, auth.tenant_id, auth.environment, delivery_id,
                                      for_update=True)
        if row is None:
            raise NotFound("webhook_delivery", delivery_id, param="id")
        refusal = retry_refusal(row["status"], row["lease_expired"], row["endpoint_status"])
        if refusal is not None:
            raise refusal
        await repo.reschedule_delivery(conn, delivery_id)
        await repo.notify_worker(conn)
        return await repo.get_delivery(conn, auth.tenant_id, auth.environment, delivery_id)


# ---------------------------------------------------------------- the delivery worker


async def claim_due(pool: asyncpg.Pool, limit: int, lease_s: float) -> list[Claim]:
    """Lease up to `limit` due deliveries for one attempt each (a short transaction of its own:
    no transaction stays open across the HTTP call)."""
    async with pool.acquire() as conn, conn.transaction():
        ids = await repo.due_delivery_ids(conn, limit)
        if not ids:
            return []
        return await repo.claim(conn, ids, [new_id("wda") for _ in ids], lease_s)


async def record_result(
    pool: asyncpg.Pool, claim: Claim, result: AttemptResult, policy: RetryPolicy,
    rand: float | None = None,
) -> AttemptOutcome | None:
    """Record an attempt and settle its delivery, in a new transaction. None when the delivery
    was taken over meanwhile (lease expired, or rescheduled): the attempt is still recorded."""
    async with pool.acquire() as conn, conn.transaction():
        await repo.record_attempt(conn, claim.attempt_id, result)
        outcome = after_attempt(
            status_code=result.status_code, cycle_attempts=claim.cycle_attempts, policy=policy,
            endpoint_enabled=await repo.endpoint_enabled(conn, claim.endpoint_id),
            rand=random.random() if rand is None else rand,
        )
        settled = await repo.settle(conn, claim, result, outcome)
        return outcome if settled else None


async def release_claims(pool: asyncpg.Pool, attempt_ids: Sequence[str]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await repo.release(conn, attempt_ids)


async def seconds_until_next_due(pool: asyncpg.Pool) -> float | None:
    return await repo.seconds_until_next_due(pool)
