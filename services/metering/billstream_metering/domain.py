"""Metering rules: what one usage event contributes to its meter, how a meter aggregates, and
what a period summary says. Pure: no I/O.

- A meter aggregates `value`: the event's quantity, or, when the meter has a `field`, that
  property of the event as a decimal (an event without a usable number there contributes no
  value: it is skipped by sum and max, and still counted by count and in `event_count`).
- sum → sum of values; count → number of events; max → largest value. No usage is 0.
- A period summary reports, per usage charge of the plan, its meter's aggregate over every
  usage event swept for the period (see `service.summarize_period` for the sweep).
- Corrections (`usage.voided`, `usage.amended`): a voided event counts nowhere; an amended one
  counts with its new quantity and properties. See `correction_outcome` for which correction
  wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from billstream_contracts.events import Charge, MeterUsage
from billstream_runtime.money import format_decimal

Aggregation = Literal["sum", "count", "max"]
DEFAULT_AGGREGATION: Aggregation = "sum"

_DECIMAL_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,4})?$")
_RFC3339_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)


@dataclass(frozen=True, slots=True)
class Meter:
    code: str
    aggregation: Aggregation
    field: str | None = None


@dataclass(frozen=True, slots=True)
class Totals:
    """What SQL aggregated over a set of usage rows."""

    total: Decimal | None  # sum(value): None when no row had a value
    count: int
    maximum: Decimal | None


NO_USAGE = Totals(None, 0, None)


def field_value(raw: Any) -> Decimal | None:
    """A property value as a decimal: integers, decimal strings (ingestion forwards non-integer
    numbers as exact decimal strings) and finite floats; anything else is no value."""
    if isinstance(raw, bool) or raw is None:
        return None
    if isinstance(raw, int):
        return Decimal(raw)
    if isinstance(raw, float):
        value = Decimal(repr(raw))
        return value if value.is_finite() else None
    if isinstance(raw, str) and _DECIMAL_RE.match(raw.strip()):
        return Decimal(raw.strip())
    return None


def usage_value(quantity: Decimal, properties: Mapping[str, Any] | None,
                meter: Meter | None) -> Decimal | None:
    """The value one event adds to its meter. While the meter is unknown here (its
    `meter.created` has not arrived yet) the quantity stands in; it is recomputed when the
    meter arrives."""
    if meter is None or meter.field is None:
        return quantity
    return field_value((properties or {}).get(meter.field))


def aggregate(aggregation: Aggregation, totals: Totals) -> Decimal:
    if aggregation == "count":
        return Decimal(totals.count)
    if aggregation == "max":
        return totals.maximum if totals.maximum is not None else Decimal(0)
    return totals.total if totals.total is not None else Decimal(0)


def charge_usage(charges: Iterable[Charge], totals: Mapping[str, Totals],
                 meters: Mapping[str, Meter]) -> list[MeterUsage]:
    """One MeterUsage per usage charge, in plan order (a meter billed by two charges is
    reported for both)."""
    usage = []
    for charge in charges:
        if charge.type != "usage" or not charge.meter:
            continue
        meter = meters.get(charge.meter)
        t = totals.get(charge.meter, NO_USAGE)
        value = aggregate(meter.aggregation if meter else DEFAULT_AGGREGATION, t)
        usage.append(MeterUsage(charge_id=charge.charge_id, meter=charge.meter,
                                quantity=format_decimal(value), usage_count=t.count))
    return usage


def usage_meters(charges: Iterable[Charge]) -> list[str]:
    return sorted({c.meter for c in charges if c.type == "usage" and c.meter})


# ---------------------------------------------------------------- corrections

CorrectionKind = Literal["void", "amend"]
CorrectionOutcome = Literal["applied", "superseded", "billed"]


@dataclass(frozen=True, slots=True)
class RecordState:
    """What a usage row says about the corrections it carries."""

    voided: bool = False
    correction_seq: int | None = None  # log sequence of the last correction applied to it
    billed: bool = False  # swept by a period summary
    billed_correction_seq: int | None = None  # the last correction it carried when swept


def correction_outcome(kind: CorrectionKind, sequence: int,
                       state: RecordState) -> CorrectionOutcome:
    """What a correction (at `sequence` in its source's log) does to a usage row.

    - billed: the row was billed before this correction (it was swept without it): a billed
      period never changes, so it is not applied. An amend the row could already have carried
      when it was swept (sequence <= billed_correction_seq) is decided as usual: that is a
      replay (rebuild) re-applying what was billed. A voided row is never swept, so no billed
      row carries a void: a void of a billed row is always refused.
    - A void is final: once voided, nothing applies (void and send a new event to re-count).
      A void therefore applies even when an amend with a higher sequence came first.
    - Amends win in log order: one with a sequence not above the last applied is superseded.

    What an unbilled event counts for is the same whatever order its corrections arrive in:
    nothing if any void arrives, else the values of the amend with the highest sequence.
    """
    if state.billed and (kind == "void" or state.billed_correction_seq is None
                         or sequence > state.billed_correction_seq):
        return "billed"
    if state.voided:
        return "superseded"
    if kind == "amend" and state.correction_seq is not None and sequence <= state.correction_seq:
        return "superseded"
    return "applied"


def stored_properties(properties: Mapping[str, Any] | None,
                      meter: Meter | None) -> dict[str, Any] | None:
    """The properties a usage row keeps: only while its meter is unknown here, to compute its
    value when the meter arrives, and only those that can be a meter's value (a meter's field
    names a top-level property; field_value gives nothing for the others). PostgreSQL's jsonb
    cannot hold a NUL character: usage accepted before ingestion refused it in properties is
    still in ingestion's log, and a replay must not fail on it (a NUL key names no field, a
    NUL string is no number)."""
    if meter is not None:
        return None
    return value_properties(properties)


def value_properties(properties: Mapping[str, Any] | None) -> dict[str, Any]:
    """The properties that can be a meter's value (see stored_properties)."""
    return {key: value for key, value in (properties or {}).items()
            if "\x00" not in key and field_value(value) is not None}


# ---------------------------------------------------------------- formats


def parse_timestamp(value: str) -> datetime:
    """An RFC 3339 timestamp (with an offset) as an aware UTC datetime; ValueError if not."""
    if not _RFC3339_RE.match(value):
        raise ValueError("expected an RFC 3339 timestamp such as 2026-01-01T00:00:00Z")
    text = value[:-1] + "+00:00" if value[-1] in "Zz" else value
    return datetime.fromisoformat(text.replace("t", "T")).astimezone(UTC)


def format_timestamp(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
