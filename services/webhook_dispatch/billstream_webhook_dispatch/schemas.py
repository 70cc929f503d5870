"""Public API request and response models of webhook_dispatch (never tables or events)."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

T = TypeVar("T")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WebhookEndpointCreate(_Request):
    url: str = Field(description="Where to POST events: an absolute http(s) URL")
    enabled_events: list[str] = Field(
        description="`[\"*\"]` for every public event type, or a list of public event types"
    )
    description: str | None = None


class WebhookEndpointReplay(_Request):
    since: AwareDatetime = Field(
        description="RFC 3339: every stored event created since then is sent again"
    )


class WebhookEndpoint(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    enabled_events: list[str]
    status: Literal["enabled", "disabled"]
    description: str | None
    livemode: bool
    created: str


class WebhookEndpointWithSecret(WebhookEndpoint):
    secret: str = Field(description="`whsec_…`: verifies signatures; shown only in this response")


class Event(BaseModel):
    """A public event, as `GET /v1/events` returns it and as webhooks carry it."""

    id: str
    object: Literal["event"] = "event"
    type: str
    version: int
    created: str = Field(description="When the event was recorded (RFC 3339)")
    occurred_at: str = Field(description="Business time; a test clock's time in test mode")
    livemode: bool
    data: dict[str, Any]


class WebhookDelivery(BaseModel):
    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    endpoint: str
    event: str
    event_type: str
    status: Literal["pending", "sending", "delivered", "failed", "canceled"]
    attempts: int = Field(description="Attempts made so far, over the delivery's life")
    last_status_code: int | None
    last_error: str | None
    last_attempt_at: str | None
    next_attempt_at: str | None
    delivered_at: str | None
    livemode: bool
    created: str


class WebhookDeliveryAttempt(BaseModel):
    id: str
    object: Literal["webhook_delivery_attempt"] = "webhook_delivery_attempt"
    delivery: str
    endpoint: str
    event: str
    attempt: int = Field(description="1 for the first attempt of the delivery, and so on")
    succeeded: bool | None = Field(description="None while the attempt is in flight")
    status_code: int | None
    error: str | None
    duration_ms: int | None
    response_body: str | None = Field(description="The first bytes of the endpoint's answer")
    livemode: bool
    created: str
    finished_at: str | None


class WebhookEndpointReplayResult(BaseModel):
    object: Literal["webhook_endpoint_replay"] = "webhook_endpoint_replay"
    endpoint: str
    since: str
    enqueued: int = Field(description="Deliveries scheduled by this replay")


class ListOf(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
