"""Usage API of ingestion.

- `POST /v1/usage/events`: one native event or a batch `{"events": [...]}` of up to 1,000;
  CloudEvents 1.0 in structured (`application/cloudevents+json`), batch
  (`application/cloudevents-batch+json`) and binary (`ce-*` headers) content modes.
- `POST /v1/usage/corrections`: void or amend an accepted event by its idempotency key.
- `GET /v1/usage/events/lookup?idempotency_key=…`: an accepted event as it stands.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from fastapi import APIRouter, Query, Request

from billstream_ingestion import cloudevents, corrections, domain, service
from billstream_ingestion.domain import Outcome
from billstream_ingestion.schemas import (
    UsageCorrection,
    UsageEventObject,
    UsageIngestResult,
    correction_body_openapi,
    request_body_openapi,
)
from billstream_runtime.auth import AuthContext
from billstream_runtime.errors import ApiError, InvalidRequest
from billstream_runtime.http import ORJSONResponse, SecretKey
from billstream_runtime.idempotency import rerunnable

router = APIRouter(tags=["usage"])


@router.post(
    "/v1/usage/events",
    responses={200: {"model": UsageIngestResult}},
    openapi_extra=request_body_openapi(),
    summary="Ingest usage events",
)
@rerunnable  # each event's own key dedups a rerun (a dead request's Idempotency-Key is retaken)
async def ingest_usage(request: Request, ctx: AuthContext = SecretKey):
    """Every event gets exactly one outcome (`accepted`, `duplicate` or `rejected` with a
    code); a batch with bad events still accepts the good ones. Accepted events are durable
    before the answer. Usage for a customer not created yet is accepted (see the docs).
    When the pipeline is behind, the answer is 503 with `Retry-After` and nothing is taken."""
    settings = request.app.state.settings
    body = await _read_body(request, settings.max_body_bytes)
    raw_events, ce_indices, early = _events_of(request, body, settings.max_batch_events)
    admission = request.app.state.admission
    async with admission.admit(len(raw_events)):
        outcomes = early + await service.ingest(
            request.app.state.pool, request.app.state.store, settings,
            service.Scope(ctx.tenant_id, ctx.environment),
            [raw for raw in raw_events if raw is not None],
            indices=[i for i, raw in enumerate(raw_events) if raw is not None],
            catalog=request.app.state.catalog,
        )
    if ce_indices:
        outcomes = [cloudevents.in_cloudevent_terms(o) if o.index in ce_indices else o
                    for o in outcomes]
    result = domain.summarize(outcomes)
    counter = request.app.state.metrics.custom.get("usage_events")
    if counter is not None:
        for status, key in (("accepted", "accepted"), ("duplicate", "duplicates"),
                            ("rejected", "rejected")):
            if result[key]:
                counter.labels("http", status).inc(result[key])
    return ORJSONResponse(result)  # built by the domain; skips re-validating 1,000 results


@router.post(
    "/v1/usage/corrections",
    responses={200: {"model": UsageCorrection}},
    openapi_extra=correction_body_openapi(),
    summary="Void or amend an accepted usage event",
)
async def correct_usage(request: Request, ctx: AuthContext = SecretKey):
    """`{"idempotency_key": "...", "action": "void"}` or `{"idempotency_key": "...",
    "action": "amend", "quantity": "12", "properties": {...}}`. The change flows as a
    compensating event; the original stays in the log. Usage already billed in a closed period
    cannot be corrected (409 `usage_period_closed`)."""
    settings = request.app.state.settings
    body = _parse_json(await _read_body(request, 64 * 1024))
    parsed = corrections.parse_request(body, settings)
    result = await corrections.correct(
        request.app.state.pool, request.app.state.store,
        service.Scope(ctx.tenant_id, ctx.environment), parsed)
    return ORJSONResponse(result)


@router.get(
    "/v1/usage/events/lookup",
    responses={200: {"model": UsageEventObject}},
    summary="An accepted usage event, by idempotency key",
)
async def lookup_usage_event(request: Request, idempotency_key: str = Query(max_length=255),
                             ctx: AuthContext = SecretKey):
    """The event as accepted, its corrections, and its quantity and properties now."""
    return ORJSONResponse(await corrections.usage_event(
        request.app.state.pool, service.Scope(ctx.tenant_id, ctx.environment),
        idempotency_key))


# ---------------------------------------------------------------- request shapes


def _events_of(request: Request, body: bytes, max_events: int
               ) -> tuple[list[Any], set[int], list[Outcome]]:
    """(raw native events — None where an event was rejected while mapping —, the indices of
    events that came as CloudEvents, the rejections made while mapping)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    # binary mode (the body is the event's data), unless the content type says structured
    # or batch mode, which wins over ce-* headers as the HTTP binding has it
    if "ce-specversion" in request.headers and not content_type.startswith(
            cloudevents.EVENT_FORMAT):
        # data that is not JSON is not read: the mapping rejects the event for its
        # datacontenttype, as it would in any mode; JSON that does not parse is a bad body
        declared = request.headers.get("content-type")
        as_json = declared is None or cloudevents.is_json_media_type(declared)
        data = _parse_json(body) if as_json and body.strip() else None
        return _mapped([(partial(cloudevents.from_http_binary, request.headers, data),
                         partial(cloudevents.http_binary_key, request.headers))])
    if content_type == cloudevents.STRUCTURED:
        parsed = _parse_json(body)
        return _mapped([(partial(cloudevents.from_structured, parsed),
                         partial(cloudevents.composed_key, parsed))])
    if content_type == cloudevents.BATCH:
        try:
            batch = cloudevents.split_batch(_parse_json(body), max_events)
        except domain.BodyError as err:
            raise ApiError(err.code, err.message, param=err.param, status=err.status) from err
        return _mapped([(partial(cloudevents.from_structured, ce),
                         partial(cloudevents.composed_key, ce)) for ce in batch])
    parsed = _parse_json(body)
    if (isinstance(parsed, dict) and "idempotency_key" not in parsed and "events" not in parsed
            and cloudevents.lacks_specversion(request.headers.keys())):
        return _mapped([(_no_specversion,
                         partial(cloudevents.http_binary_key, request.headers))])
    try:
        raw_events = domain.split_body(parsed, max_events)
    except domain.BodyError as err:
        raise ApiError(err.code, err.message, param=err.param, status=err.status) from err
    return raw_events, set(), []


def _no_specversion() -> dict[str, Any]:
    raise cloudevents.specversion_missing("ce-specversion")


def _mapped(events: list[tuple[Callable[[], dict[str, Any]], Callable[[], str | None]]]
            ) -> tuple[list[Any], set[int], list[Outcome]]:
    """Each CloudEvent as (its mapping, its composed key): an event rejected while mapping
    still reports its key when its source and id make one."""
    raws: list[Any] = []
    early: list[Outcome] = []
    for index, (to_native, key_of) in enumerate(events):
        try:
            raws.append(to_native())
        except domain.EventError as err:
            raws.append(None)
            early.append(domain.rejected(index, key_of(), err.code, err.message, err.param))
    return raws, set(range(len(events))), early


def _parse_json(body: bytes) -> Any:
    try:
        return domain.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest("invalid_json", f"The body is not valid JSON: {exc}") from exc


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = ApiError("payload_too_large",
                         f"The body is larger than {limit} bytes; send smaller batches",
                         status=413)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_large
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise too_large
    return bytes(chunks)
