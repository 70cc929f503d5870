"""The event envelope: the wire shape of every event on the backbone.

The envelope is a wire schema, not an aggregate or a table row: it evolves additively within a
version and is checked against JSON Schema snapshots (tests/unit/contracts).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Environment = Literal["test", "live"]


class Envelope(BaseModel):
    """One event as it travels on Kafka and as it is stored in a service's event log."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str = Field(description="Sortable unique id, `evt_` + ULID")
    type: str = Field(description="Past tense and namespaced, e.g. `invoice.paid`")
    version: int = Field(ge=1, description="Version of the `data` schema for this type")
    tenant_id: str
    environment: Environment
    occurred_at: datetime = Field(description="Business time (a test clock's time in test mode)")
    recorded_at: datetime = Field(description="Wall-clock time the source committed the event")
    source: str = Field(description="The service that wrote the event")
    sequence: int = Field(ge=1, description="Gapless, commit-ordered position in the source's log")
    aggregate_type: str
    aggregate_id: str
    correlation_id: str | None = None
    causation_id: str | None = None
    data: dict[str, Any]

    @property
    def key(self) -> str:
        """The Kafka message key: one aggregate's events stay in one partition, in order."""
        return f"{self.tenant_id}:{self.aggregate_id}"
