"""The ingest use case, shared by every input (HTTP native, CloudEvents, the Kafka topic):
validate, resolve against the projections, check the time window, claim idempotency keys and
append the accepted events, in one transaction, before anything is acknowledged.

Order of work for one batch of one tenant and environment:
  1. `prepare` (reads only):
     - validate each event on its own (domain.parse_event): malformed ones are rejected;
     - meters: codes not in the projection are waited for once, up to `projection_wait_s` (a
       meter created a moment ago may still be on its way), then rejected as `unknown_meter`;
     - customers: resolved to a `cus_` id when known (unknown customers are accepted, see
       domain); "now" is the customer's test clock time when it is attached to one, else the
       wall clock; a missing timestamp defaults to it;
     - meters and customers are read through the process's catalog.CatalogCache (kept
       while the scope's catalog version stands);
     - the window: timestamps before `now - dedup_window` or after `now + future_tolerance`
       are rejected (`timestamp_out_of_window`);
  2. `encode` (CPU only, before a connection is taken): usage ids, the usage JSON, its split
     into batch events and the key claims;
  3. `write` (one transaction, possibly for several prepared batches — the Kafka path writes a
     whole poll at once): claim the first occurrence of every key (COPY, or one statement),
     append the claimed usage as `usage.batch_accepted` events (one log row per tenant batch
     of up to `accepted_batch_max_bytes`), commit. Accepted events are durable before the
     answer or the offset commit; a duplicate is a normal outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import orjson

from billstream_contracts.events import UsageBatchAccepted
from billstream_ingestion import domain, repository
from billstream_ingestion.catalog import CatalogCache, CatalogView
from billstream_ingestion.domain import Outcome, UsageEvent
from billstream_ingestion.repository import KeyClaim, KnownCustomer
from billstream_ingestion.settings import IngestionSettings
from billstream_messaging import EventStore, NewEvent
from billstream_runtime.db import pg_micros
from billstream_runtime.http import wait_for
from billstream_runtime.ids import new_ids

_RETRIES = 3
_BATCH_TYPE = UsageBatchAccepted.event_type
_BATCH_VERSION = UsageBatchAccepted.version
#: A `usage.batch_accepted` holds at most this much usage JSON, well under a Kafka record's
#: usual 1 MiB limit (settings.accepted_batch_max_bytes).
DEFAULT_MAX_BATCH_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Scope:
    tenant_id: str
    environment: str


@dataclass(slots=True)
class Prepared:
    """One tenant's batch after the read-only checks: the outcomes decided so far and the
    valid events, each with its resolved customer and timestamp."""

    scope: Scope
    outcomes: list[Outcome] = field(default_factory=list)
    valid: list[UsageEvent] = field(default_factory=list)
    customers: dict[str, KnownCustomer] = field(default_factory=dict)
    timestamps: dict[int, datetime] = field(default_factory=dict)  # by event index
    encoded: Encoded | None = None  # set by `encode`


@dataclass(slots=True)
class Encoded:
    """What `write` sends for a prepared batch, made before any connection is taken: the
    first occurrence of each key, its usage JSON, the batch events they are split into
    (`chunks`: [start, stop) ranges of `firsts`, one per id of `event_ids`), and the claims."""

    firsts: list[UsageEvent]
    usages: list[bytes]
    chunks: list[tuple[int, int]]
    event_ids: list[str]
    claims: list[KeyClaim]
    max_batch_bytes: int  # what `chunks` were split by


async def ingest(
    pool: asyncpg.Pool,
    store: EventStore,
    settings: IngestionSettings,
    scope: Scope,
    raw_events: Sequence[Any],
    now: datetime | None = None,
    *,
    indices: Sequence[int] | None = None,
    catalog: CatalogCache | None = None,
) -> list[Outcome]:
    """One outcome per raw event (request order not guaranteed; summarize sorts)."""
    prepared = await prepare(pool, settings, scope, raw_events, now, indices=indices,
                             catalog=catalog)
    if not prepared.valid:
        return prepared.outcomes
    encode(prepared, settings.accepted_batch_max_bytes)  # no connection held meanwhile
    for attempt in range(1, _RETRIES + 1):
        try:
            async with pool.acquire() as conn, conn.transaction():
                outcomes = await write(conn, store, [prepared],
                                       max_batch_bytes=settings.accepted_batch_max_bytes)
            return outcomes
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
            if attempt == _RETRIES:
                raise
    raise AssertionError("unreachable")


async def prepare(
    pool: asyncpg.Pool,
    settings: IngestionSettings,
    scope: Scope,
    raw_events: Sequence[Any],
    now: datetime | None = None,
    *,
    indices: Sequence[int] | None = None,
    known_unknown_meters: frozenset[str] = frozenset(),
    catalog: CatalogCache | None = None,
    yield_every: int = 0,
) -> Prepared:
    """The read-only half of ingest: validation, meters, customers and the time window.
    Outcomes carry `indices[i]` for `raw_events[i]` (default: the position). Unknown meters
    are waited for up to `projection_wait_s`, except `known_unknown_meters` (found unknown a
    moment ago by the caller). Meters and customers come from `catalog` where it remembers
    them at the scope's current version (catalog.py), else from the read models.
    `yield_every` > 0 lets the event loop run after every that many events (see
    `encode_cooperatively`)."""
    now = now or datetime.now(UTC)
    prepared = Prepared(scope)
    outcomes = prepared.outcomes
    valid: list[UsageEvent] = []
    max_props = settings.max_properties_bytes
    for i, (index, raw) in enumerate(zip(
            indices if indices is not None else range(len(raw_events)), raw_events,
            strict=True)):
        if yield_every and i and i % yield_every == 0:
            await asyncio.sleep(0)
        parsed = domain.parse_event(index, raw, max_properties_bytes=max_props)
        if type(parsed) is UsageEvent:
            valid.append(parsed)
        else:
            outcomes.append(parsed)
    if not valid:
        return prepared

    view = (await catalog.view(pool, scope) if catalog is not None
            else CatalogView.uncached(scope))
    valid, unknown = await _check_meters(pool, view, valid, settings.projection_wait_s,
                                         known_unknown_meters)
    outcomes += [
        domain.rejected(ev.index, ev.idempotency_key, "unknown_meter",
                        f"No such meter: '{ev.meter}'", "meter")
        for ev in unknown
    ]
    if not valid:
        return prepared

    refs = {ev.customer for ev in valid}
    customers = await view.known_customers(pool, refs)
    window = timedelta(days=settings.dedup_window_days)
    future = timedelta(seconds=settings.future_tolerance_s)
    customers = await _clocks_caught_up(pool, scope, valid, customers, refs, future,
                                        settings.projection_wait_s)
    in_window = []
    timestamps = prepared.timestamps
    # the window around the wall clock, for every event of a customer on no test clock
    clocked = {ref for ref, known in customers.items() if known.clock_time is not None}
    earliest, latest = now - window, now + future
    for i, ev in enumerate(valid):
        if yield_every and i and i % yield_every == 0:
            await asyncio.sleep(0)
        if ev.customer not in clocked:
            timestamp = ev.timestamp or now
            if earliest <= timestamp <= latest:
                timestamps[ev.index] = timestamp
                in_window.append(ev)
                continue
            event_now = now
        else:
            event_now = default_timestamp(customers.get(ev.customer), now)
            timestamp = ev.timestamp or event_now
        error = domain.window_error(timestamp, event_now, window, future)
        if error is not None:
            outcomes.append(domain.rejected(ev.index, ev.idempotency_key, error.code,
                                            error.message, error.param))
            continue
        timestamps[ev.index] = timestamp
        in_window.append(ev)
    prepared.valid = in_window
    prepared.customers = customers
    return prepared


def encode(prepared: Prepared, max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES) -> None:
    """See `_encode`, run in one go."""
    for _ in _encode(prepared, max_batch_bytes, 0):
        pass


async def encode_cooperatively(prepared: Prepared, max_batch_bytes: int,
                               yield_every: int) -> None:
    """`encode`, letting the event loop run after every `yield_every` events: the Kafka
    input encodes a poll while the poll before is being written on the same loop, and each of
    that write's round trips (a transaction holding the log's head lock among them) would
    otherwise wait for the whole poll's encoding."""
    for _ in _encode(prepared, max_batch_bytes, yield_every):
        await asyncio.sleep(0)


def _encode(prepared: Prepared, max_batch_bytes: int, yield_every: int) -> Iterator[None]:
    """The CPU half of `write`, which needs no database: each first occurrence of a key gets
    a usage id and its usage JSON, the JSON is split into batch events of at most
    `max_batch_bytes`, and each key's claim names the batch event that would hold it (its
    size decides which; corrections find the usage through it). Callers run it before taking
    a connection (the Kafka input, while the poll before is being written). Yields after every
    `yield_every` events (never when it is 0)."""
    firsts = domain.first_per_key(prepared.valid)
    usage_ids = new_ids("use", len(firsts))
    customers = prepared.customers
    timestamps = prepared.timestamps
    step = yield_every or len(firsts) or 1
    usages: list[bytes] = []
    for start in range(0, len(firsts), step):
        if start:
            yield
        usages += [
            _usage_json(ev, usage_id, customers.get(ev.customer), timestamps[ev.index])
            for ev, usage_id in zip(firsts[start:start + step],
                                    usage_ids[start:start + step], strict=True)
        ]
    chunks = _chunks(usages, max_batch_bytes)
    event_ids = new_ids("evt", len(chunks))
    chunk_of = []  # the event id of each first's batch
    for event_id, (start, stop) in zip(event_ids, chunks, strict=True):
        chunk_of += [event_id] * (stop - start)
    claims: list[KeyClaim] = []
    for start in range(0, len(firsts), step):
        if yield_every:
            yield
        claims += [
            KeyClaim(ev.idempotency_key, ev.payload_hash, usage_id, event_id, ev.customer,
                     pg_micros(timestamps[ev.index]))
            for ev, usage_id, event_id in zip(firsts[start:start + step],
                                              usage_ids[start:start + step],
                                              chunk_of[start:start + step], strict=True)
        ]
    prepared.encoded = Encoded(firsts, usages, chunks, event_ids, claims, max_batch_bytes)


async def write(conn: asyncpg.Connection, store: EventStore, batches: Sequence[Prepared],
                *, max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
                list_accepted: bool = True) -> list[Outcome]:
    """In the caller's transaction: claim the keys of every prepared batch and append the newly
    claimed usage as `usage.batch_accepted` events (one per tenant batch, split so that none
    holds more than `max_batch_bytes` of JSON; see `encode`, done here for a batch not
    encoded yet, or encoded for another size). Returns every outcome of every batch. Usage
    whose key turns out to be taken is left out of its batch event. A batch written again
    (a retry after a failed transaction) keeps its encoding, so its ids: none of them was
    committed. With `list_accepted` False, only the outcomes of events not accepted are
    returned (the Kafka input reports those and counts the rest: every event it wrote that
    has no outcome here was accepted)."""
    outcomes: list[Outcome] = []
    appended: list[NewEvent] = []
    for prepared in batches:
        outcomes += prepared.outcomes
        if not prepared.valid:
            continue
        if prepared.encoded is None or prepared.encoded.max_batch_bytes != max_batch_bytes:
            encode(prepared, max_batch_bytes)
        scope = prepared.scope
        firsts, usages, chunks, event_ids, claims = (
            prepared.encoded.firsts, prepared.encoded.usages, prepared.encoded.chunks,
            prepared.encoded.event_ids, prepared.encoded.claims)
        claimed = await repository.claim_keys(conn, scope.tenant_id, scope.environment, claims)
        if claimed is None:
            # every key was new: every first occurrence won, each batch event holds its range
            appended += [_batch_event(scope, event_id, usages[start:stop])
                         for event_id, (start, stop) in zip(event_ids, chunks, strict=True)]
            if len(firsts) == len(prepared.valid):  # and no key came twice: all accepted
                if list_accepted:
                    outcomes += [Outcome(ev.index, ev.idempotency_key, "accepted", c.usage_id)
                                 for ev, c in zip(firsts, claims, strict=True)]
                continue
            claimed = {c.idempotency_key: (c.payload_hash, c.usage_id, True) for c in claims}
        else:
            for event_id, (start, stop) in zip(event_ids, chunks, strict=True):
                won = [usages[i] for i in range(start, stop)
                       if claimed[firsts[i].idempotency_key][2]]
                if won:
                    appended.append(_batch_event(scope, event_id, won))
        resolved = domain.resolve_outcomes(prepared.valid, claimed)
        outcomes += (resolved if list_accepted
                     else [o for o in resolved if o.status != "accepted"])
    if appended:
        await store.append(conn, appended, returning=False)
    return outcomes


async def _clocks_caught_up(pool, scope, events, customers, refs, future: timedelta,
                            wait_s: float) -> dict[str, KnownCustomer]:
    """Read-your-writes for test clocks: an event dated after its customer's clock time (as
    this service knows it) may follow a clock advance that has not reached the projection
    yet — a script advances the clock, then sends that period's usage. Such events wait, once,
    up to `wait_s` for the projection to show the clock at their time before the window is
    judged."""
    def ahead(known: dict[str, KnownCustomer]) -> bool:
        if all(customer.clock_time is None for customer in known.values()):
            return False
        for ev in events:
            customer = known.get(ev.customer)
            if (customer is not None and customer.clock_time is not None
                    and ev.timestamp is not None and ev.timestamp > customer.clock_time + future):
                return True
        return False

    if wait_s <= 0 or not ahead(customers):
        return customers

    async def caught_up() -> bool:
        nonlocal customers
        customers = await repository.known_customers(pool, scope.tenant_id, scope.environment,
                                                     refs)
        return not ahead(customers)

    await wait_for(caught_up, wait_s)
    return customers


async def _check_meters(pool, view: CatalogView, events, wait_s: float,
                        no_wait: frozenset[str] = frozenset()):
    codes = {ev.meter for ev in events}
    known = await view.known_meters(pool, codes)
    if codes - known - no_wait:
        async def all_known():
            nonlocal known
            known = await view.known_meters(pool, codes)
            return not (codes - known - no_wait)

        if wait_s > 0:
            await wait_for(all_known, wait_s)
    good = [ev for ev in events if ev.meter in known]
    bad = [ev for ev in events if ev.meter not in known]
    return good, bad


def default_timestamp(customer: KnownCustomer | None, now: datetime) -> datetime:
    """'Now' for an event sent without a timestamp: its customer's test clock time when the
    customer is attached to one, else the wall clock."""
    if customer is not None and customer.clock_time is not None:
        return customer.clock_time
    return now


def _usage_json(ev: UsageEvent, usage_id: str, customer: KnownCustomer | None,
                timestamp: datetime) -> bytes:
    """One usage of a `usage.batch_accepted`, as the UsageAccepted contract's JSON (the hot
    path skips the model; tests check the two agree).

    msgspec writes it, not orjson, although both write the same bytes for these values (UTC
    datetimes with "Z", text unescaped past ASCII; tests check that too): orjson starts each
    result in a buffer of a kilobyte or more, which costs about 1 µs more per result that is
    kept (as these are, until the poll or request is written) than per one freed at once:
    5,000 short results kept took orjson 6.0 ms and msgspec 0.18 ms (bench/README.md)."""
    return _ENCODE({
        "usage_id": usage_id,
        "idempotency_key": ev.idempotency_key,
        "customer": ev.customer,
        "customer_id": customer.customer_id if customer else None,
        "meter": ev.meter,
        "quantity": ev.quantity_text,
        "timestamp": timestamp,
        "properties": ev.properties,
    })


_ENCODE = msgspec.json.Encoder().encode


def _chunks(encoded: Sequence[bytes], max_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of `encoded` whose JSON array fits in `max_bytes` (a single
    larger item gets a range of its own)."""
    chunks = []
    start, size = 0, 2
    for i, item in enumerate(encoded):
        grown = size + len(item) + 1
        if grown > max_bytes and i > start:
            chunks.append((start, i))
            start, grown = i, 2 + len(item) + 1
        size = grown
    chunks.append((start, len(encoded)))
    return chunks


def _batch_event(scope: Scope, event_id: str, usages: list[bytes]) -> NewEvent:
    return NewEvent(
        data=orjson.Fragment(b'{"usages":[' + b",".join(usages) + b"]}"),
        type=_BATCH_TYPE, version=_BATCH_VERSION,
        tenant_id=scope.tenant_id, environment=scope.environment,
        # a batch spans customers: keyed by its own id, batches spread over the partitions
        aggregate_type="usage_batch", aggregate_id=event_id,
        occurred_at=datetime.now(UTC), id=event_id,
    )
