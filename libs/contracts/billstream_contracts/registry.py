"""The catalogue of event types: one versioned pydantic model per (type, version).

A data model declares its wire name with `event_type` and `version`, and whether it is public
(stored in the public event log and delivered to webhooks). Consumers look types up here; a type
they do not know is counted and skipped, never an error.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T", bound="EventData")

_REGISTRY: dict[tuple[str, int], type["EventData"]] = {}


class EventData(BaseModel):
    """Base of every event's `data` model. Extra fields are kept so that additive changes
    made by a newer producer survive a round trip through an older consumer."""

    model_config = ConfigDict(extra="allow", frozen=True)

    event_type: ClassVar[str]
    version: ClassVar[int] = 1
    public: ClassVar[bool] = True


def register(cls: type[T]) -> type[T]:
    key = (cls.event_type, cls.version)
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        raise ValueError(f"event type {key} registered twice")
    _REGISTRY[key] = cls
    return cls


def lookup(event_type: str, version: int) -> type[EventData] | None:
    return _REGISTRY.get((event_type, version))


def all_event_types() -> dict[tuple[str, int], type[EventData]]:
    from billstream_contracts import events  # noqa: F401  (registers every model)

    return dict(_REGISTRY)


def is_public(event_type: str, version: int) -> bool:
    model = lookup(event_type, version)
    return bool(model and model.public)


def parse_data(event_type: str, version: int, data: dict[str, Any]) -> EventData | None:
    model = lookup(event_type, version)
    return model.model_validate(data) if model else None
