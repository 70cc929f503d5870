"""Billstream's wire contracts: the event envelope, versioned event data models, topic names.

Schemas only; no behaviour lives here.
"""

from billstream_contracts import events, topics
from billstream_contracts.envelope import Envelope, Environment
from billstream_contracts.registry import EventData, all_event_types, is_public, lookup, parse_data

__all__ = [
    "Envelope",
    "Environment",
    "EventData",
    "all_event_types",
    "events",
    "is_public",
    "lookup",
    "parse_data",
    "topics",
]
