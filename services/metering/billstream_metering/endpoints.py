"""`GET /v1/usage`: a customer's aggregated usage of one meter over a time range."""

from __future__ import annotations

import re

from fastapi import APIRouter, Query, Request

from billstream_metering import domain, repository, service
from billstream_metering.schemas import Usage
from billstream_runtime.auth import AuthContext
from billstream_runtime.errors import InvalidRequest, NotFound
from billstream_runtime.http import SecretKey, wait_for

router = APIRouter(tags=["usage"])


@router.get("/v1/usage", response_model=Usage, response_model_by_alias=True,
            summary="Aggregated usage of a meter")
async def get_usage(
    request: Request,
    customer: str = Query(..., min_length=1, description="external_id or cus_ id"),
    meter: str = Query(..., min_length=1, description="The meter's code"),
    from_: str | None = Query(None, alias="from", description="Inclusive, RFC 3339"),
    to: str | None = Query(None, description="Exclusive, RFC 3339"),
    ctx: AuthContext = SecretKey,
):
    start, end = _timestamp(from_, "from"), _timestamp(to, "to")
    if start and end and start >= end:
        raise InvalidRequest("parameter_invalid", "from must be before to", param="from")
    scope = service.Scope(ctx.tenant_id, ctx.environment)
    pool, settings = request.app.state.pool, request.app.state.settings
    known = await wait_for(
        lambda: repository.get_meter(pool, scope.tenant_id, scope.environment, meter),
        settings.projection_wait_s,
    )
    if known is None:
        raise NotFound("meter", meter, param="meter")
    answer = await service.usage_of(pool, scope, customer, known, start, end)
    return {
        "object": "usage", "customer": customer, "customer_id": answer.customer_id,
        "meter": meter, "aggregation": known.aggregation,
        "from": domain.format_timestamp(start) if start else None,
        "to": domain.format_timestamp(end) if end else None,
        "value": domain.format_decimal(answer.value), "event_count": answer.event_count,
    }


def _timestamp(value: str | None, param: str):
    if value is None:
        return None
    if re.search(r"\d \d{2}:\d{2}$", value):  # an unencoded "+01:00" arrives as " 01:00"
        value = value[:-6] + "+" + value[-5:]
    try:
        return domain.parse_timestamp(value)
    except ValueError as exc:
        raise InvalidRequest("parameter_invalid", f"{param}: {exc}", param=param) from exc
