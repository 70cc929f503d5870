"""HTTP API of webhook_dispatch: webhook endpoints, deliveries and attempts, the event log."""

from __future__ import annotations

from typing import Any, Literal

import asyncpg
import orjson
from fastapi import APIRouter, Depends, Query, Request

from billstream_runtime.auth import AuthContext
from billstream_runtime.http import ListParams, SecretKey, page
from billstream_webhook_dispatch import service
from billstream_webhook_dispatch.domain import rfc3339
from billstream_webhook_dispatch.schemas import (
    Event,
    ListOf,
    WebhookDelivery,
    WebhookDeliveryAttempt,
    WebhookEndpoint,
    WebhookEndpointCreate,
    WebhookEndpointReplay,
    WebhookEndpointReplayResult,
    WebhookEndpointWithSecret,
)

router = APIRouter()
DeliveryStatus = Literal["pending", "sending", "delivered", "failed", "canceled"]


def _pool(request: Request) -> asyncpg.Pool:
    return request.app.state.pool


# ---------------------------------------------------------------- shaping


def _endpoint(row: asyncpg.Record, *, with_secret: bool = False) -> dict[str, Any]:
    out = {
        "id": row["id"],
        "object": "webhook_endpoint",
        "url": row["url"],
        "enabled_events": list(row["enabled_events"]),
        "status": row["status"],
        "description": row["description"],
        "livemode": row["environment"] == "live",
        "created": rfc3339(row["created_at"]),
    }
    if with_secret:
        out["secret"] = row["secret"]
    return out


def _delivery(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "webhook_delivery",
        "endpoint": row["endpoint_id"],
        "event": row["event_id"],
        "event_type": row["event_type"],
        "status": row["status"],
        "attempts": row["attempts"],
        "last_status_code": row["last_status_code"],
        "last_error": row["last_error"],
        "last_attempt_at": rfc3339(row["last_attempt_at"]),
        "next_attempt_at": rfc3339(row["next_attempt_at"]) if row["status"] == "pending" else None,
        "delivered_at": rfc3339(row["delivered_at"]),
        "livemode": row["environment"] == "live",
        "created": rfc3339(row["created_at"]),
    }


def _attempt(row: asyncpg.Record) -> dict[str, Any]:
    code = row["status_code"]
    return {
        "id": row["id"],
        "object": "webhook_delivery_attempt",
        "delivery": row["delivery_id"],
        "endpoint": row["endpoint_id"],
        "event": row["event_id"],
        "attempt": row["number"],
        "succeeded": None if row["finished_at"] is None else code is not None and 200 <= code < 300,
        "status_code": code,
        "error": row["error"],
        "duration_ms": row["duration_ms"],
        "response_body": row["response_body"],
        "livemode": row["environment"] == "live",
        "created": rfc3339(row["started_at"]),
        "finished_at": rfc3339(row["finished_at"]),
    }


# ---------------------------------------------------------------- webhook endpoints


@router.post("/v1/webhook_endpoints", status_code=201, response_model=WebhookEndpointWithSecret,
             tags=["webhooks"])
async def create_webhook_endpoint(body: WebhookEndpointCreate, request: Request,
                                  auth: AuthContext = SecretKey):
    """Create an endpoint. Its signing `secret` is in this response only."""
    row = await service.create_endpoint(
        _pool(request), auth, body,
        allow_private=request.app.state.settings.allow_private_destinations)
    return _endpoint(row, with_secret=True)


@router.get("/v1/webhook_endpoints", response_model=ListOf[WebhookEndpoint], tags=["webhooks"])
async def list_webhook_endpoints(request: Request, params: ListParams = Depends(),
                                 auth: AuthContext = SecretKey):
    rows = await service.list_endpoints(_pool(request), auth, params.limit + 1,
                                        params.starting_after)
    return page([_endpoint(r) for r in rows], params.limit)


@router.get("/v1/webhook_endpoints/{endpoint_id}", response_model=WebhookEndpoint,
            tags=["webhooks"])
async def get_webhook_endpoint(endpoint_id: str, request: Request,
                               auth: AuthContext = SecretKey):
    return _endpoint(await service.get_endpoint(_pool(request), auth, endpoint_id))


@router.delete("/v1/webhook_endpoints/{endpoint_id}", response_model=WebhookEndpoint,
               tags=["webhooks"])
async def delete_webhook_endpoint(endpoint_id: str, request: Request,
                                  auth: AuthContext = SecretKey):
    """Disable the endpoint: nothing more is sent to it and its pending deliveries are
    canceled. It stays listed with `status: disabled`."""
    return _endpoint(await service.disable_endpoint(_pool(request), auth, endpoint_id))


@router.post("/v1/webhook_endpoints/{endpoint_id}/replay",
             response_model=WebhookEndpointReplayResult, tags=["webhooks"])
async def replay_webhook_endpoint(endpoint_id: str, body: WebhookEndpointReplay,
                                  request: Request, auth: AuthContext = SecretKey):
    """Send again every stored event created since `since` that the endpoint subscribes to."""
    enqueued = await service.replay_endpoint(_pool(request), auth, endpoint_id, body.since)
    return {"object": "webhook_endpoint_replay", "endpoint": endpoint_id,
            "since": rfc3339(body.since), "enqueued": enqueued}


# ---------------------------------------------------------------- the event log


@router.get("/v1/events", response_model=ListOf[Event], tags=["events"])
async def list_events(request: Request, params: ListParams = Depends(),
                      type: str | None = Query(None, description="Only events of this type"),
                      auth: AuthContext = SecretKey):
    """Public events of this environment, newest first."""
    bodies = await service.list_events(_pool(request), auth, type, params.limit + 1,
                                       params.starting_after)
    return page([orjson.loads(b) for b in bodies], params.limit)


@router.get("/v1/events/{event_id}", response_model=Event, tags=["events"])
async def get_event(event_id: str, request: Request, auth: AuthContext = SecretKey):
    wait_s = request.app.state.settings.projection_wait_s
    return orjson.loads(await service.get_event(_pool(request), auth, event_id, wait_s))


# ---------------------------------------------------------------- deliveries


@router.get("/v1/webhook_deliveries", response_model=ListOf[WebhookDelivery], tags=["webhooks"])
async def list_webhook_deliveries(
    request: Request,
    params: ListParams = Depends(),
    endpoint: str | None = Query(None, description="Only deliveries to this endpoint (`we_…`)"),
    event: str | None = Query(None, description="Only deliveries of this event (`evt_…`)"),
    status: DeliveryStatus | None = Query(None),
    auth: AuthContext = SecretKey,
):
    rows = await service.list_deliveries(
        _pool(request), auth, endpoint_id=endpoint, event_id=event, status=status,
        limit=params.limit + 1, starting_after=params.starting_after,
    )
    return page([_delivery(r) for r in rows], params.limit)


@router.get("/v1/webhook_deliveries/{delivery_id}", response_model=WebhookDelivery,
            tags=["webhooks"])
async def get_webhook_delivery(delivery_id: str, request: Request,
                               auth: AuthContext = SecretKey):
    return _delivery(await service.get_delivery(_pool(request), auth, delivery_id))


@router.get("/v1/webhook_deliveries/{delivery_id}/attempts",
            response_model=ListOf[WebhookDeliveryAttempt], tags=["webhooks"])
async def list_webhook_delivery_attempts(delivery_id: str, request: Request,
                                         params: ListParams = Depends(),
                                         auth: AuthContext = SecretKey):
    """The attempts of one delivery, newest first."""
    rows = await service.list_attempts(_pool(request), auth, delivery_id, params.limit + 1,
                                       params.starting_after)
    return page([_attempt(r) for r in rows], params.limit)


@router.post("/v1/webhook_deliveries/{delivery_id}/retry", response_model=WebhookDelivery,
             tags=["webhooks"])
async def retry_webhook_delivery(delivery_id: str, request: Request,
                                 auth: AuthContext = SecretKey):
    """Send the delivery again now, whatever its status (delivered ones too), with a new cycle
    of retries. 409 while an attempt is in flight."""
    return _delivery(await service.retry_delivery(_pool(request), auth, delivery_id))
