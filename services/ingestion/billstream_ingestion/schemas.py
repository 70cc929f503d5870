"""Public API models of ingestion (documentation and response shape; never tables or events).

The request body is parsed by hand (`json.loads(body, parse_float=Decimal)`) so that a number
never passes through a float and each event gets its own outcome; these models document it.
"""

from __future__ import annotations

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
                                               "idempotency_key_conflict, properties_too_large")
    message: str | None = None
    param: str | None = Field(None, description="The field at fault")


class UsageIngestResult(BaseModel):
    object: Literal["usage_ingest_result"] = "usage_ingest_result"
    accepted: int
    duplicates: int
    rejected: int
    results: list[UsageEventResult]


def request_body_openapi() -> dict[str, Any]:
    single = UsageEventIn.model_json_schema()
    batch = {"type": "object", "required": ["events"],
             "properties": {"events": {"type": "array", "maxItems": 1000, "items": single}}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"oneOf": [single, batch]}}}}}
