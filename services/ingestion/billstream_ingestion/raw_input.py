"""The Kafka input: producers write usage straight to `billstream.usage.raw`; ingestion
consumes it with the same rules as HTTP (service.prepare / service.write) and reports every
event that was not accepted on `billstream.usage.rejected`.

One poll (up to `raw_max_records` records, any tenants) is handled as a unit, in two halves
that overlap with the polls before and after (the next poll is decoded and prepared while this
one is written; writes and offset commits keep the order of the polls):
  1. decode each record (raw_records.decode) and authenticate its API key;
  2. prepare per tenant and environment (validation, meters, customers, time window) and
     encode what the write sends (usage JSON, batch events, key claims);
  3. one PostgreSQL transaction claims the keys and appends the accepted events;
  4. after the commit, a record per rejected or duplicate event is produced to
     `billstream.usage.rejected` and acknowledged by the broker (acks=all);
  5. only then are the offsets committed.
A crash anywhere before 5 redelivers the poll: events committed in 3 come back as duplicates
(reported as such), so nothing acknowledged is lost and nothing is counted twice; a rejection
may be reported twice (at least once). Failures of the database or the broker are retried with
a backoff, never skipped; any other failure rewinds the partitions to the poll's first records.

Backpressure: while the relay's backlog is over `max_relay_lag_bytes` (admission.Admission),
the consumer pauses its partitions and resumes below it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from typing import TYPE_CHECKING

import structlog
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
)
from aiokafka.errors import CommitFailedError, IllegalStateError

from billstream_contracts.topics import USAGE_REJECTED
from billstream_ingestion import cloudevents, raw_records, service
from billstream_ingestion.admission import Admission
from billstream_ingestion.domain import Outcome, rejected
from billstream_ingestion.settings import IngestionSettings
from billstream_messaging.consumer import TRANSIENT_ERRORS
from billstream_runtime.errors import ApiError
from billstream_runtime.http import wait_for

if TYPE_CHECKING:
    from billstream_messaging import ServiceHost

log = structlog.get_logger("billstream.ingestion.raw")

#: How long a refused API key is refused without asking (or waiting for) the projection again;
#: and how long after an unknown meter a tenant's events are not waited for again.
_REFUSED_KEY_TTL_S = 10.0
#: A poll is staged while the poll before is written on the same event loop: staging lets the
#: loop run after every this many records, so that each of the write's round trips (one of
#: them under the log's head lock, which the other workers wait for) waits for at most that
#: much of the stage's CPU (about 1-2 ms) instead of all of it (30-50 ms for 5,000 records).
_YIELD_EVERY = 500
_FIRST = itemgetter(0)


class RawInput:
    def __init__(self, host: ServiceHost, admission: Admission) -> None:
        self.host = host
        self.settings: IngestionSettings = host.settings  # type: ignore[assignment]
        self.admission = admission
        self.paused = False
        self._refused_keys: dict[str, tuple[float, ApiError]] = {}  # key → (until, why)
        self._unknown_meter_at: dict[tuple[service.Scope, object], float] = {}

    @property
    def group_id(self) -> str:
        return f"{self.settings.consumer_group_prefix}.ingestion.raw"

    # -- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        settings = self.settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=self.group_id,
            client_id="billstream-ingestion-raw",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=settings.raw_max_records,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024,
            session_timeout_ms=settings.consumer_session_timeout_ms,
            heartbeat_interval_ms=settings.consumer_heartbeat_interval_ms,
            max_poll_interval_ms=600_000,
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5,
            max_batch_size=512 * 1024, enable_idempotence=False,
            client_id="billstream-ingestion-rejected",
        )
        consumer.subscribe([settings.raw_topic], listener=_LogRebalance())
        inflight: _Inflight | None = None
        try:
            await producer.start()
            await consumer.start()
            while True:
                inflight = await self._step(consumer, producer, inflight)
        finally:
            if inflight is not None:  # its transaction rolls back: the poll comes again
                inflight.task.cancel()
                with contextlib.suppress(BaseException):
                    await inflight.task
            await consumer.stop()
            await producer.stop()

    async def _step(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer,
                    inflight: _Inflight | None) -> _Inflight | None:
        """One poll, pipelined: poll N+1 is decoded and prepared (CPU and reads) while poll N
        is written, reported and committed (`inflight`, mostly waiting on PostgreSQL and the
        broker). Writes and offset commits stay strictly in poll order: N+1's write starts
        only after N's offsets are committed. Returns the new in-flight poll."""
        if await self.admission.backlogged():
            await self._settle(consumer, inflight, {})
            if not self.paused:
                consumer.pause(*consumer.assignment())
                self.paused = True
                log.warning("raw_input_paused", reason="relay backlog",
                            lag_bytes=await self.admission.relay_lag())
            await asyncio.sleep(0.2)
            return None
        if self.paused:
            consumer.resume(*consumer.paused())
            self.paused = False
            log.info("raw_input_resumed")
        polled = await consumer.getmany(timeout_ms=500, max_records=self.settings.raw_max_records)
        records = [rec for recs in polled.values() for rec in recs]
        if not records:
            await self._settle(consumer, inflight, {})
            return None
        try:
            staged = await self.stage(records)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - rewind, never commit past unhandled records
            if await self._settle(consumer, inflight, polled):
                _rewind(consumer, polled)  # (when the poll before failed, both are rewound)
            log.error("raw_batch_failed", error=repr(exc), records=len(records))
            await asyncio.sleep(1.0)
            return None
        if not await self._settle(consumer, inflight, polled):
            return None  # the poll before failed and rewound: this one comes again
        return _Inflight(asyncio.create_task(
            self._finish_and_commit(consumer, producer, polled, staged), name="raw-input-write"),
            polled)

    async def _settle(self, consumer: AIOKafkaConsumer, inflight: _Inflight | None,
                      polled: dict) -> bool:
        """Wait for the in-flight poll. If it failed, rewind its partitions and those of
        `polled` (the poll fetched meanwhile) to the first record either holds, and say so.

        The rewind is done here, not by the failed write: the loop fetches while the write
        runs, and a fetch that came after a rewind would already hold the rewound records
        again, past which the consumer's position would then be."""
        if inflight is None or await inflight.task:
            return True
        firsts = {tp: recs[0].offset for tp, recs in polled.items()}
        for tp, recs in inflight.polled.items():
            firsts[tp] = min(recs[0].offset, firsts.get(tp, recs[0].offset))
        _seek(consumer, firsts)
        return False

    async def _finish_and_commit(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer,
                                 polled: dict, staged: Staged) -> bool:
        try:
            await self.finish(staged, producer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - never commit past unhandled records
            # (the loop rewinds this poll and the one fetched behind it: `_settle`)
            log.error("raw_batch_failed", error=repr(exc), records=len(staged.records))
            await asyncio.sleep(1.0)
            return False
        try:
            await consumer.commit({tp: recs[-1].offset + 1 for tp, recs in polled.items()})
        except (CommitFailedError, IllegalStateError) as exc:
            # A rebalance took the partitions: their new owner gets the records again, and
            # the events already committed come back as duplicates.
            log.warning("raw_commit_failed", error=repr(exc))
        return True

    # -- one poll ---------------------------------------------------------------------------
    async def handle(self, records: list[ConsumerRecord], producer: AIOKafkaProducer) -> None:
        """Apply one poll: durable in PostgreSQL, then every non-accepted outcome reported."""
        await self.finish(await self.stage(records), producer)

    async def stage(self, records: list[ConsumerRecord]) -> Staged:
        """The read-only half of a poll: decode, authenticate, prepare per tenant."""
        settings = self.settings
        step = _YIELD_EVERY
        max_bytes = settings.raw_max_record_bytes
        decoded: list[raw_records.Decoded] = []
        for start in range(0, len(records), step):
            if start:  # the write of the poll before runs on the same loop (see _step)
                await asyncio.sleep(0)
            decoded += [raw_records.decode(rec.value, rec.headers, max_bytes)
                        for rec in records[start:start + step]]
        outcomes: dict[int, Outcome] = {}
        # every key that came, records that do not decode included: their reports name the
        # tenant too, so that a producer reading the topic for its own tenant sees them
        scopes = await self._authenticate({d.api_key for d in decoded
                                           if d.api_key is not None})
        # the records of each good key, then of each scope (a tenant may use several keys)
        by_key: dict[str, tuple[list[int], list]] = {
            key: ([], []) for key, scope in scopes.items() if isinstance(scope, service.Scope)}
        for index, d in enumerate(decoded):
            if d.error is not None:
                outcomes[index] = rejected(index, d.idempotency_key, d.error.code,
                                           d.error.message, d.error.param)
                continue
            group = by_key.get(d.api_key or "")
            if group is None:
                refused = scopes.get(d.api_key or "")
                error = refused if isinstance(refused, ApiError) else ApiError(
                    "missing_api_key", f"The record has no {raw_records.API_KEY_HEADER} header")
                outcomes[index] = rejected(index, _key_of(d.raw), error.code, error.message,
                                           raw_records.API_KEY_HEADER)
                continue
            group[0].append(index)
            group[1].append(d.raw)
        groups = _by_scope(by_key, scopes)
        prepared = []
        now = time.monotonic()
        # scopes in a fixed order: two workers' polls claim keys in the same order (no deadlock)
        for scope, (indices, raws) in sorted(groups.items(),
                                             key=lambda g: (g[0].tenant_id, g[0].environment)):
            # meters found unknown a moment ago are not waited for again: a producer with a
            # typo must not slow the whole input down (other meters still are)
            cutoff = now - _REFUSED_KEY_TTL_S
            skip = frozenset(code for (s, code), at in self._unknown_meter_at.items()
                             if s == scope and at > cutoff)
            batch = await service.prepare(self.host.pool, settings, scope, raws,
                                          indices=indices, known_unknown_meters=skip,
                                          catalog=self.host.app.state.catalog,
                                          yield_every=step)
            if batch.valid:  # the CPU half of the write, while the poll before is written
                await service.encode_cooperatively(batch, settings.accepted_batch_max_bytes,
                                                   step)
            if len(self._unknown_meter_at) > 10_000:
                self._unknown_meter_at.clear()
            unknown = [o.index for o in batch.outcomes if o.code == "unknown_meter"]
            if unknown:
                raw_at = dict(zip(indices, raws, strict=True))
                for index in unknown:
                    self._unknown_meter_at[(scope, raw_at[index].get("meter"))] = now
            prepared.append(batch)
        for d in decoded:  # the parsed JSON is not needed any more: a poll waiting to be
            d.raw = None  # written holds only what the write and the reports need
        return Staged(records, decoded, outcomes, scopes, prepared)

    async def finish(self, staged: Staged, producer: AIOKafkaProducer) -> None:
        """The writing half of a poll: one transaction, then the reports."""
        outcomes = staged.outcomes
        for outcome in await self._write(staged.prepared):  # those of events not accepted
            outcomes[outcome.index] = outcome
        await self._report(staged, producer)
        counts = Counter(o.status for o in outcomes.values())
        counts["accepted"] = len(staged.records) - len(outcomes)  # (every other record)
        counter = self.host.metrics.custom.get("usage_events")
        if counter is not None:
            for status, n in counts.items():
                counter.labels("kafka", status).inc(n)

    async def _write(self, prepared: list[service.Prepared]) -> list[Outcome]:
        """The poll's one transaction; the outcomes of its events that were not accepted."""
        if not any(p.valid for p in prepared):
            return [o for p in prepared for o in p.outcomes]
        backoff = 0.2
        while True:
            try:
                async with self.host.pool.acquire() as conn, conn.transaction():
                    return await service.write(
                        conn, self.host.store, prepared,
                        max_batch_bytes=self.settings.accepted_batch_max_bytes,
                        list_accepted=False)
            except TRANSIENT_ERRORS as exc:
                log.warning("raw_write_retry", error=repr(exc), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _report(self, staged: Staged, producer: AIOKafkaProducer) -> None:
        records, decoded = staged.records, staged.decoded
        now = datetime.now(UTC)
        futures = []
        for index, outcome in staged.outcomes.items():  # (none of them accepted)
            rec = records[index]
            if decoded[index].cloudevent:
                outcome = cloudevents.in_cloudevent_terms(outcome)
            scope = staged.scope_of(index)
            report = raw_records.report(
                outcome=outcome, topic=rec.topic, partition=rec.partition, offset=rec.offset,
                key=rec.key, value=rec.value, headers=rec.headers,
                tenant_id=scope.tenant_id if scope else None,
                environment=scope.environment if scope else None, now=now,
                max_echo_bytes=self.settings.raw_max_record_bytes)
            futures.append(await producer.send(USAGE_REJECTED, value=report.value,
                                               key=report.key, headers=report.headers))
        if futures:
            await asyncio.gather(*futures)

    async def _authenticate(self, api_keys: set[str | None]) -> dict[str, object]:
        """Scope per API key, or the ApiError saying why not. A key unknown here is waited for
        once (`projection_wait_s`): it may have been created a moment ago."""
        authenticator = self.host.app.state.authenticator
        result: dict[str, object] = {}
        now = time.monotonic()
        for key in api_keys:  # refused a moment ago: not waited for again (a bad producer
            refused = self._refused_keys.get(key or "")  # must not slow everyone down)
            if refused and refused[0] > now:
                result[key or ""] = refused[1]
        pending = {key for key in api_keys if key is not None and key not in result}

        async def resolve() -> bool:
            for key in pending:
                if isinstance(result.get(key), service.Scope):
                    continue
                try:
                    ctx = await authenticator.authenticate(key)
                except ApiError as err:
                    result[key] = err
                    continue
                if ctx.kind != "secret":
                    result[key] = ApiError("secret_key_required",
                                           "Usage is sent with a secret key (sk_...)")
                else:
                    result[key] = service.Scope(ctx.tenant_id, ctx.environment)
            # (keys refused a moment ago are not waited for: they are not pending)
            return all(isinstance(result.get(key), service.Scope) for key in pending)

        if not await resolve():
            await wait_for(resolve, self.settings.projection_wait_s)
        until = time.monotonic() + _REFUSED_KEY_TTL_S
        if len(self._refused_keys) > 10_000:
            self._refused_keys.clear()
        for key in pending:
            if isinstance(result.get(key), ApiError):
                self._refused_keys[key] = (until, result[key])  # type: ignore[assignment]
        return result


class _LogRebalance(ConsumerRebalanceListener):
    """Partition assignments in the log: a group that takes long to settle shows there."""

    async def on_partitions_revoked(self, revoked) -> None:
        log.info("raw_input_revoked", partitions=sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned) -> None:
        log.info("raw_input_assigned", partitions=sorted(tp.partition for tp in assigned))


@dataclass(slots=True)
class _Inflight:
    """A poll being written: its task (True when committed, False when it failed: the loop
    then rewinds it, `_settle`) and its records by partition."""

    task: asyncio.Task
    polled: dict


@dataclass(slots=True)
class Staged:
    """A poll decoded and prepared, not yet written."""

    records: list[ConsumerRecord]
    decoded: list[raw_records.Decoded]
    outcomes: dict[int, Outcome]  # decided so far (by index in `records`)
    scopes: dict[str, object]  # API key → its Scope, or the ApiError refusing it
    prepared: list[service.Prepared]

    def scope_of(self, index: int) -> service.Scope | None:
        """The tenant and environment of a record whose API key is good, whether its value
        decoded or not (its report names them)."""
        scope = self.scopes.get(self.decoded[index].api_key or "")
        return scope if isinstance(scope, service.Scope) else None


def _by_scope(by_key: dict[str, tuple[list[int], list]],
              scopes: dict[str, object]) -> dict[service.Scope, tuple[list[int], list]]:
    """The records of each scope (indices and raw events) from those of each of its keys: in
    poll order when a scope came with several keys (the first occurrence of an idempotency
    key is the one accepted)."""
    groups: dict[service.Scope, tuple[list[int], list]] = {}
    for key, (indices, raws) in by_key.items():
        scope = scopes[key]
        if not indices or not isinstance(scope, service.Scope):
            continue
        if scope in groups:
            merged = sorted(zip(groups[scope][0] + indices, groups[scope][1] + raws,
                                strict=True), key=_FIRST)
            indices, raws = [i for i, _ in merged], [r for _, r in merged]
        groups[scope] = (indices, raws)
    return groups


def _rewind(consumer: AIOKafkaConsumer, polled: dict) -> None:
    """Fetch these partitions again from the poll's first records."""
    _seek(consumer, {tp: recs[0].offset for tp, recs in polled.items()})


def _seek(consumer: AIOKafkaConsumer, offsets: dict) -> None:
    """Move these partitions to these offsets (those still assigned: a partition a rebalance
    took is read by its new owner from the last committed offset). A seek also drops what
    was fetched ahead for the partition."""
    assigned = consumer.assignment()
    for tp, offset in offsets.items():
        if tp in assigned:
            consumer.seek(tp, offset)


def _key_of(raw) -> str | None:
    key = raw.get("idempotency_key") if isinstance(raw, dict) else None
    return key if isinstance(key, str) else None

