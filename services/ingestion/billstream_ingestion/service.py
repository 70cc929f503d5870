"""The ingest use case: validate, resolve against the projections, claim idempotency keys and
append the accepted events, in one transaction, before answering.

Order of work for one request (one batch or one event):
  1. validate each event on its own (domain.parse_event): malformed ones are rejected;
  2. meters: the codes not in the projection are waited for once, up to
     `projection_wait_s` (a meter created a moment ago may still be on its way), then their
     events are rejected as `unknown_meter`;
  3. customers: resolved to a `cus_` id when known (unknown customers are accepted, see
     domain); a missing timestamp defaults to "now": the customer's test clock time if it is
     attached to one, else the wall clock;
  4. one transaction: claim the first occurrence of every key (one statement), append a
     `usage.accepted` event per claimed key (COPY for large batches), commit. Accepted events
     are durable before the response is sent; a duplicate is a normal, counted outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from billstream_contracts.events import UsageAccepted
from billstream_ingestion import domain, repository
from billstream_ingestion.domain import Outcome, UsageEvent
from billstream_ingestion.repository import KeyClaim, KnownCustomer
from billstream_ingestion.settings import IngestionSettings
from billstream_messaging import EventStore, NewEvent
from billstream_runtime.http import wait_for
from billstream_runtime.ids import new_id

_RETRIES = 3


@dataclass(frozen=True, slots=True)
class Scope:
    tenant_id: str
    environment: str


async def ingest(
    pool: asyncpg.Pool,
    store: EventStore,
    settings: IngestionSettings,
    scope: Scope,
    raw_events: Sequence[Any],
    now: datetime | None = None,
) -> list[Outcome]:
    """One outcome per raw event, in request order."""
    now = now or datetime.now(UTC)
    outcomes: list[Outcome] = []
    valid: list[UsageEvent] = []
    for index, raw in enumerate(raw_events):
        parsed = domain.parse_event(index, raw, max_properties_bytes=settings.max_properties_bytes)
        if isinstance(parsed, Outcome):
            outcomes.append(parsed)
        else:
            valid.append(parsed)
    if not valid:
        return outcomes

    valid, unknown = await _check_meters(pool, settings, scope, valid)
    outcomes += [
        domain.rejected(ev.index, ev.idempotency_key, "unknown_meter",
                        f"No such meter: '{ev.meter}'", "meter")
        for ev in unknown
    ]
    if not valid:
        return outcomes

    customers = await repository.known_customers(
        pool, scope.tenant_id, scope.environment, {ev.customer for ev in valid})
    firsts = domain.first_per_key(valid)
    usage_ids = {ev.idempotency_key: new_id("use") for ev in firsts}
    claims = [KeyClaim(ev.idempotency_key, ev.payload_hash, usage_ids[ev.idempotency_key])
              for ev in firsts]

    for attempt in range(1, _RETRIES + 1):
        try:
            async with pool.acquire() as conn, conn.transaction():
                claimed = await repository.claim_keys(
                    conn, scope.tenant_id, scope.environment, claims)
                accepted = [
                    _accepted_event(scope, ev, usage_ids[ev.idempotency_key],
                                    customers.get(ev.customer), now)
                    for ev in firsts if claimed[ev.idempotency_key][2]
                ]
                await store.append(conn, accepted)
            break
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
            if attempt == _RETRIES:
                raise
    return outcomes + domain.resolve_outcomes(valid, claimed)


async def _check_meters(pool, settings, scope, events):
    codes = {ev.meter for ev in events}
    known = await repository.known_meters(pool, scope.tenant_id, scope.environment, codes)
    if codes - known:
        async def all_known():
            nonlocal known
            known = await repository.known_meters(pool, scope.tenant_id, scope.environment,
                                                  codes)
            return codes <= known

        await wait_for(all_known, settings.projection_wait_s)
    good = [ev for ev in events if ev.meter in known]
    bad = [ev for ev in events if ev.meter not in known]
    return good, bad


def default_timestamp(customer: KnownCustomer | None, now: datetime) -> datetime:
    """'Now' for an event sent without a timestamp: its customer's test clock time when the
    customer is attached to one, else the wall clock."""
    if customer is not None and customer.clock_time is not None:
        return customer.clock_time
    return now


def _accepted_event(scope: Scope, ev: UsageEvent, usage_id: str,
                    customer: KnownCustomer | None, now: datetime) -> NewEvent:
    timestamp = ev.timestamp or default_timestamp(customer, now)
    customer_id = customer.customer_id if customer else None
    data = UsageAccepted(
        usage_id=usage_id, idempotency_key=ev.idempotency_key, customer=ev.customer,
        customer_id=customer_id, meter=ev.meter, quantity=domain.format_decimal(ev.quantity),
        timestamp=timestamp, properties=ev.properties,
    )
    return NewEvent(
        data=data, tenant_id=scope.tenant_id, environment=scope.environment,
        aggregate_type="customer", aggregate_id=customer_id or ev.customer,
        occurred_at=timestamp,
    )
