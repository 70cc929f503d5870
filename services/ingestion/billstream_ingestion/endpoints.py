"""`POST /v1/usage/events`: one native event or a batch of up to 1,000."""

from __future__ import annotations

import json
from decimal import Decimal

from fastapi import APIRouter, Request

from billstream_ingestion import domain, service
from billstream_ingestion.schemas import UsageIngestResult, request_body_openapi
from billstream_runtime.auth import AuthContext
from billstream_runtime.errors import ApiError, InvalidRequest
from billstream_runtime.http import ORJSONResponse, SecretKey

router = APIRouter(tags=["usage"])


@router.post(
    "/v1/usage/events",
    responses={200: {"model": UsageIngestResult}},
    openapi_extra=request_body_openapi(),
    summary="Ingest usage events",
)
async def ingest_usage(request: Request, ctx: AuthContext = SecretKey):
    """Every event gets exactly one outcome (`accepted`, `duplicate` or `rejected` with a
    code); a batch with bad events still accepts the good ones. Accepted events are durable
    before the answer. Usage for a customer not created yet is accepted (see the docs)."""
    settings = request.app.state.settings
    body = await _read_body(request, settings.max_body_bytes)
    try:
        parsed = json.loads(body, parse_float=Decimal, parse_constant=Decimal)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest("invalid_json", f"The body is not valid JSON: {exc}") from exc
    try:
        raw_events = domain.split_body(parsed, settings.max_batch_events)
    except domain.BodyError as err:
        raise ApiError(err.code, err.message, param=err.param, status=err.status) from err
    outcomes = await service.ingest(
        request.app.state.pool, request.app.state.store, settings,
        service.Scope(ctx.tenant_id, ctx.environment), raw_events,
    )
    result = domain.summarize(outcomes)
    counter = request.app.state.metrics.custom.get("usage_events")
    if counter is not None:
        for status, key in (("accepted", "accepted"), ("duplicate", "duplicates"),
                            ("rejected", "rejected")):
            if result[key]:
                counter.labels(status).inc(result[key])
    return ORJSONResponse(result)  # built by the domain; skips re-validating 1,000 results


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
