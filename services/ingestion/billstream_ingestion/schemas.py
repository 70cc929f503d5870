"""Public API models of ingestion (documentation and response shape; never tables or events).

The request body is parsed by hand (`json.loads(body, parse_float=Decimal)`) so that a number
never passes through a float and each event gets its own outcome; these models document it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class UsageEventIn(BaseModel):
    """One native usage event."""

    idempotency_key: str = Field(min_length=1, max_length=255,
                                 description="Dedup key: the same key is accepted once")
    customer: str = Field(description="The customer's external_id or its `cus_` id")
    meter: str = Field(description="The meter's code")
    quantity: str | int = Field(
        "1", description="Decimal string or JSON number (parsed exactly, never as a float)")
    timestamp: str | None = Field(
        None, description="RFC 3339; defaults to now (the customer's test clock time when it "
                          "is attached to one)")
    properties: dict[str, Any] = Field(default_factory=dict,
                                       description="At most 8 KiB as JSON")


class UsageBatchIn(BaseModel):
    events: list[UsageEventIn] = Field(max_length=1000)


class UsageEventResult(BaseModel):
    index: int
    idempotency_key: str | None
    status: Literal["accepted", "duplicate", "rejected"]
    usage_id: str | None = Field(None, description="Of the accepted event (or the original, "
                                                   "for a duplicate)")
    code: str | None = Field(None, description="invalid_event, unknown_meter, "
                                               "idempotency_key_conflict, properties_too_large,"
                                               " timestamp_out_of_window")
    message: str | None = None
    param: str | None = Field(None, description="The field at fault")


class UsageIngestResult(BaseModel):
    object: Literal["usage_ingest_result"] = "usage_ingest_result"
    accepted: int
    duplicates: int
    rejected: int
    results: list[UsageEventResult]


class CloudEventIn(BaseModel):
    """A CloudEvents 1.0 usage event (structured mode). Mapping: `source` + `id` → the
    idempotency key `"<source> <id>"`, `subject` → customer, `type` → meter, `time` →
    timestamp, `data` → properties with `data.quantity` as the quantity (default 1)."""

    specversion: Literal["1.0"]
    id: str
    source: str
    type: str = Field(description="The meter's code")
    subject: str = Field(description="The customer's external_id or `cus_` id")
    time: str | None = None
    datacontenttype: str | None = Field(None, description="application/json or a +json type")
    data: dict[str, Any] | None = None


class UsageCorrectionIn(BaseModel):
    idempotency_key: str = Field(min_length=1, max_length=255,
                                 description="The key of the accepted event to correct")
    action: Literal["void", "amend"]
    quantity: str | int | None = Field(None, description="amend: the new quantity")
    properties: dict[str, Any] | None = Field(None, description="amend: the new properties "
                                                                "(in full)")
    reason: str | None = Field(None, max_length=500)


class UsageCorrection(BaseModel):
    object: Literal["usage_correction"] = "usage_correction"
    id: str
    action: Literal["void", "amend"]
    idempotency_key: str
    usage_id: str
    quantity: str | None = None
    properties: dict[str, Any] | None = None
    reason: str | None = None
    created: datetime


class UsageEventObject(BaseModel):
    object: Literal["usage_event"] = "usage_event"
    id: str = Field(description="The usage_id")
    idempotency_key: str
    status: Literal["accepted", "amended", "voided"]
    customer: str
    customer_id: str | None
    meter: str
    timestamp: datetime
    quantity: str = Field(description="Now (after amendments)")
    properties: dict[str, Any]
    original: dict[str, Any] = Field(description="quantity and properties as accepted")
    corrections: list[UsageCorrection]
    created: datetime


def request_body_openapi() -> dict[str, Any]:
    single = UsageEventIn.model_json_schema()
    batch = {"type": "object", "required": ["events"],
             "properties": {"events": {"type": "array", "maxItems": 1000, "items": single}}}
    cloudevent = CloudEventIn.model_json_schema()
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"oneOf": [single, batch]}},
        "application/cloudevents+json": {"schema": cloudevent},
        "application/cloudevents-batch+json": {
            "schema": {"type": "array", "minItems": 1, "maxItems": 1000, "items": cloudevent}},
    }}}


def correction_body_openapi() -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": UsageCorrectionIn.model_json_schema()}}}}
