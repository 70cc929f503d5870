"""Public API models of metering (responses only; never tables or events)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Usage(BaseModel):
    object: Literal["usage"] = "usage"
    customer: str = Field(description="The customer as asked: external_id or cus_ id")
    customer_id: str | None = Field(description="The cus_ id, when the customer is known")
    meter: str
    aggregation: Literal["sum", "count", "max"]
    from_: str | None = Field(None, alias="from", description="Inclusive, RFC 3339")
    to: str | None = Field(None, description="Exclusive, RFC 3339")
    value: str = Field(description="The aggregate as a normalized decimal string")
    event_count: int = Field(description="How many usage events the value aggregates")

    model_config = {"populate_by_name": True}
