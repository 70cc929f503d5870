"""The delivery worker: claims due deliveries, POSTs them signed, records the outcome.

Each attempt is three steps, and no database transaction stays open across the HTTP call:

1. claim (one short transaction): due deliveries are row-locked with `FOR UPDATE SKIP LOCKED`
   (replicas claim disjoint sets), marked `sending` with a lease (`locked_until`) and get an
   open attempt record;
2. send: POST the stored body, signed for this attempt (Standard Webhooks), no redirects,
   `delivery_timeout_s` in total;
3. record (a new transaction): close the attempt (status code, error, duration) and settle
   the delivery: delivered, pending again after a backoff, failed or canceled. Only the claim's
   own attempt may settle it.

A worker that dies between 1 and 3 leaves its deliveries `sending`; when the lease expires
they are claimed again (at least once). A worker that is stopped lets its attempts in flight
finish, or interrupts them after `delivery_timeout_s` and makes them due again at once.
Up to `delivery_concurrency` attempts run at a time, several per endpoint included: order is not
guaranteed, receivers deduplicate on `webhook-id` and order by the event's `occurred_at`.
New deliveries wake the worker through `pg_notify`; otherwise it sleeps until the next attempt
is due (at most `delivery_poll_interval_s`).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import asyncpg
import httpx
import structlog
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from billstream_messaging.consumer import TRANSIENT_ERRORS
from billstream_webhook_dispatch import service
from billstream_webhook_dispatch.domain import (
    AttemptOutcome,
    AttemptResult,
    Claim,
    is_public_address,
    webhook_headers,
)
from billstream_webhook_dispatch.repository import DELIVERY_CHANNEL
from billstream_webhook_dispatch.service import DispatchMetrics, dispatch_metrics
from billstream_webhook_dispatch.settings import WebhookDispatchSettings

if TYPE_CHECKING:
    from billstream_messaging import ServiceHost

RESPONSE_BODY_LIMIT = 2048  # bytes of the endpoint's answer kept on the attempt
_MIN_SLEEP_S = 0.01


class WebhookSender(Protocol):
    """The port to the outside world: one POST, never raising for the endpoint's failures."""

    async def send(self, url: str, body: bytes, headers: Mapping[str, str]) -> AttemptResult: ...

    async def aclose(self) -> None: ...


class HttpSender:
    """POSTs with httpx: a total timeout, no redirects (a 3xx is a failed attempt), and only the
    first bytes of the answer read."""

    def __init__(self, *, timeout_s: float, max_connections: int,
                 allow_private: bool = False) -> None:
        self._timeout_s = timeout_s
        self._allow_private = allow_private
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
        )

    async def send(self, url: str, body: bytes, headers: Mapping[str, str]) -> AttemptResult:
        started = time.perf_counter()
        status: int | None = None
        answer: str | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                if not self._allow_private:
                    await _refuse_private_destination(url)
                async with self._client.stream("POST", url, content=body,
                                               headers=dict(headers)) as response:
                    status = response.status_code
                    answer = await _read_prefix(response, RESPONSE_BODY_LIMIT)
        except TimeoutError:
            error = f"timeout: no complete answer within {self._timeout_s:g}s"
        except Exception as exc:  # noqa: BLE001 - any failure to reach the endpoint is an attempt
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if status is not None and not 200 <= status < 300:
            error = f"HTTP {status}"
        duration_ms = round((time.perf_counter() - started) * 1000)
        return AttemptResult(status_code=status, error=error, duration_ms=duration_ms,
                             response_body=answer)

    async def aclose(self) -> None:
        await self._client.aclose()


class DestinationNotAllowed(Exception):
    pass


async def _refuse_private_destination(url: str) -> None:
    """Resolve the endpoint's host now and refuse it if any address is not public (a name that
    points into the network the worker runs in). A resolver answering differently between this
    check and the connection (DNS rebinding) is not covered; an egress proxy is the complete
    answer."""
    host = urlsplit(url).hostname or ""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    addresses = {info[4][0] for info in infos}
    private = sorted(a for a in addresses if not is_public_address(a))
    if private:
        raise DestinationNotAllowed(f"{host} resolves to non-public address {private[0]}")


async def _read_prefix(response: httpx.Response, limit: int) -> str:
    chunks = bytearray()
    async for chunk in response.aiter_bytes():
        chunks += chunk
        if len(chunks) >= limit:
            break
    return bytes(chunks[:limit]).decode("utf-8", "replace").replace("\x00", "")


class DeliveryWorker:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        settings: WebhookDispatchSettings,
        sender: WebhookSender,
        metrics: DispatchMetrics,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._sender = sender
        self._metrics = metrics
        self._policy = settings.retry_policy()
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._in_flight: dict[asyncio.Task, Claim] = {}
        self._log = structlog.get_logger("billstream.webhooks")
        self._tracer = trace.get_tracer("billstream.webhooks")

    async def run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            await self._give_back()
            raise
        finally:
            if self._listener is not None:
                await _close_quietly(self._listener)

    async def _listen(self) -> None:
        """(Re)open the LISTEN connection; without it the worker still polls."""
        if self._listener is not None and not self._listener.is_closed():
            return
        self._listener = await asyncpg.connect(self._settings.database_url)
        await self._listener.add_listener(DELIVERY_CHANNEL, lambda *_: self._wake.set())

    async def _loop(self) -> None:
        limit = self._settings.delivery_concurrency
        backoff = 0.2
        while True:
            self._wake.clear()
            free = limit - len(self._in_flight)
            timeout = self._settings.delivery_poll_interval_s  # a finishing attempt wakes us
            try:
                await self._listen()
                if free > 0:
                    claims = await service.claim_due(self._pool, free,
                                                     self._settings.delivery_lease_s)
                    for claim in claims:
                        self._start(claim)
                    if claims:
                        continue  # maybe more are due
                    timeout = await self._idle_timeout()
                backoff = 0.2
            except TRANSIENT_ERRORS as exc:  # the database is away: attempts in flight go on
                self._log.warning("webhook_worker_db_error", error=repr(exc), retry_in_s=backoff)
                timeout, backoff = backoff, min(backoff * 2, 5.0)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            except TimeoutError:
                pass

    async def _idle_timeout(self) -> float:
        poll = self._settings.delivery_poll_interval_s
        due_in = await service.seconds_until_next_due(self._pool)
        if due_in is None:
            return poll
        return min(max(due_in, _MIN_SLEEP_S), poll)

    def _start(self, claim: Claim) -> None:
        task = asyncio.create_task(self._attempt(claim), name=f"webhook-{claim.delivery_id}")
        self._in_flight[task] = claim
        self._metrics.in_flight.set(len(self._in_flight))
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._in_flight.pop(task, None)
        self._metrics.in_flight.set(len(self._in_flight))
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            self._log.error("webhook_attempt_crashed", error=repr(task.exception()))

    async def _attempt(self, claim: Claim) -> None:
        with self._tracer.start_as_current_span(
            "webhook POST", kind=SpanKind.CLIENT,
            attributes={"billstream.delivery_id": claim.delivery_id,
                        "billstream.event_id": claim.event_id,
                        "billstream.endpoint_id": claim.endpoint_id,
                        "billstream.attempt": claim.attempt_number},
        ) as span:
            headers = webhook_headers(claim.secret, claim.event_id, int(time.time()),
                                      claim.payload)
            result = await self._sender.send(claim.url, claim.payload, headers)
            span.set_attribute("http.status_code", result.status_code or 0)
            self._metrics.attempt_seconds.observe(result.duration_ms / 1000)
            outcome = await self._record(claim, result)
        label = _outcome_label(outcome)
        self._metrics.attempts.labels(label).inc()
        log = self._log.info if label == "delivered" else self._log.warning
        log("webhook_attempt", delivery_id=claim.delivery_id, event_id=claim.event_id,
            endpoint_id=claim.endpoint_id, attempt=claim.attempt_number, outcome=label,
            status_code=result.status_code, error=result.error, duration_ms=result.duration_ms,
            retry_in_s=outcome.retry_in_s if outcome else None)

    async def _record(self, claim: Claim, result: AttemptResult) -> AttemptOutcome | None:
        """Record the result; a database hiccup is retried a few times, after which the lease
        expiry makes the delivery go out again."""
        delay = 0.1
        for attempt in range(5):
            try:
                return await service.record_result(self._pool, claim, result, self._policy)
            except TRANSIENT_ERRORS:
                if attempt == 4:
                    raise
                await asyncio.sleep(delay)
                delay *= 2
        return None

    async def _give_back(self) -> None:
        """Stopping: let the attempts in flight finish (up to `delivery_timeout_s`, so that a
        graceful restart sends nothing twice), interrupt the rest and make their deliveries due
        again at once rather than after their lease."""
        tasks = list(self._in_flight)
        if not tasks:
            return
        claims = {t: self._in_flight[t] for t in tasks}
        _done, unfinished = await asyncio.wait(tasks, timeout=self._settings.delivery_timeout_s)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        if unfinished:
            try:
                await asyncio.wait_for(service.release_claims(
                    self._pool, [claims[t].attempt_id for t in unfinished]), 5.0)
            except Exception as exc:  # noqa: BLE001 - the leases will expire instead
                self._log.warning("webhook_release_failed", error=repr(exc))


def _outcome_label(outcome: AttemptOutcome | None) -> str:
    if outcome is None:
        return "superseded"
    return {"pending": "retry"}.get(outcome.status, outcome.status)


async def _close_quietly(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 2.0)
    except Exception:  # noqa: BLE001
        conn.terminate()


async def deliver_webhooks(host: ServiceHost) -> None:
    """Background task: the delivery worker (restarted by the host if it fails)."""
    settings: WebhookDispatchSettings = host.settings  # type: ignore[assignment]
    assert host.pool is not None
    injected: WebhookSender | None = getattr(host.app.state, "webhook_sender", None)
    sender = injected or HttpSender(timeout_s=settings.delivery_timeout_s,
                                    max_connections=settings.delivery_concurrency,
                                    allow_private=settings.allow_private_destinations)
    worker = DeliveryWorker(pool=host.pool, settings=settings, sender=sender,
                            metrics=dispatch_metrics(host.metrics))
    try:
        await worker.run()
    finally:
        if injected is None:
            await sender.aclose()
