"""Corrections: a merchant voids or amends an accepted usage event by its idempotency key.

A correction never edits the past. It appends a compensating event to the accepted-usage log
(`usage.voided`, or `usage.amended` with the event's new quantity and properties in full)
after the original, which stays in the log as it was; metering applies it and the totals
follow. The key keeps its place in the dedup table: resending the original after a void is
still a duplicate, never a new event.

Already invoiced usage: an event is billed by the first period close after it in this
service's log whose period ends after its timestamp (that is how metering's sweep works, see
docs/architecture.md). Once such a close exists, the invoice for that period is final and the
correction is refused (409 `usage_period_closed`), so an issued invoice and the usage totals
behind it never disagree. A correction decided before the close always reaches metering before
it: the correction's transaction takes the log head lock first, so either the close is already
in the log (and the correction is refused) or it comes after the correction (and the
summary includes it). The check is conservative: a close of any of the customer's
subscriptions counts, whatever meters its plan prices. Credit for an invoiced period is a
credit note on the invoice, not a usage correction.

Rules: a voided event cannot be amended nor voided again (voiding twice answers the first
void, so a retry is harmless); an amendment changes only `quantity` and/or `properties`
(to change customer, meter or timestamp, void the event and send a new one with a new key).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from billstream_contracts.events import UsageAmended, UsageVoided
from billstream_ingestion import domain, repository
from billstream_ingestion.service import Scope
from billstream_ingestion.settings import IngestionSettings
from billstream_messaging import EventStore, NewEvent, published_envelope
from billstream_runtime.errors import ApiError, Conflict, InvalidRequest, NotFound
from billstream_runtime.ids import new_id

MAX_REASON = 500


@dataclass(frozen=True, slots=True)
class CorrectionRequest:
    idempotency_key: str
    action: str  # "void" | "amend"
    quantity: str | None = None  # normalized, for amend
    properties: dict[str, Any] | None = None  # JSON-safe, for amend
    reason: str | None = None


def parse_request(body: Any, settings: IngestionSettings) -> CorrectionRequest:
    """Validate a correction body; InvalidRequest (400) naming the field otherwise."""
    if not isinstance(body, dict):
        raise InvalidRequest("parameter_invalid", "The body must be a JSON object")
    allowed = {"idempotency_key", "action", "quantity", "properties", "reason"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest("parameter_unknown", f"Unknown field '{unknown[0]}'",
                             param=unknown[0])
    key = body.get("idempotency_key")
    if (not isinstance(key, str) or not 1 <= len(key) <= domain.MAX_KEY_LENGTH
            or not domain.storable_text(key)):  # (no accepted key holds a NUL, say)
        raise InvalidRequest("parameter_invalid",
                             "idempotency_key must be the key of an accepted event",
                             param="idempotency_key")
    action = body.get("action")
    if action not in ("void", "amend"):
        raise InvalidRequest("parameter_invalid", "action must be 'void' or 'amend'",
                             param="action")
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
        raise InvalidRequest("parameter_invalid",
                             f"reason must be a string of at most {MAX_REASON} characters",
                             param="reason")
    if reason is not None and not domain.storable_text(reason):
        raise InvalidRequest("parameter_invalid", "reason must be text, without NUL "
                             "(\\u0000) or unpaired surrogates", param="reason")
    if action == "void":
        for name in ("quantity", "properties"):
            if body.get(name) is not None:
                raise InvalidRequest("parameter_invalid", f"A void takes no {name}",
                                     param=name)
        return CorrectionRequest(key, "void", reason=reason)
    quantity = properties = None
    try:
        if body.get("quantity") is not None:
            quantity = domain.normalize_quantity(body["quantity"])
        if body.get("properties") is not None:
            if not isinstance(body["properties"], dict):
                raise domain.EventError("invalid_event", "properties must be a JSON object",
                                        "properties")
            properties = domain.json_safe(body["properties"], "properties")
            size = len(domain.canonical_json(properties))
            if size > settings.max_properties_bytes:
                raise domain.EventError(
                    "properties_too_large", f"properties serialize to {size} bytes; at most "
                    f"{settings.max_properties_bytes} are allowed", "properties")
    except domain.EventError as err:
        raise InvalidRequest("parameter_invalid" if err.code == "invalid_event" else err.code,
                             err.message, param=err.param) from err
    if quantity is None and properties is None:
        raise InvalidRequest("parameter_missing",
                             "An amendment gives a new quantity and/or new properties",
                             param="quantity")
    return CorrectionRequest(key, "amend", quantity, properties, reason)


async def correct(pool: asyncpg.Pool, store: EventStore, scope: Scope,
                  request: CorrectionRequest) -> dict[str, Any]:
    """Apply one correction; the usage_correction object. Raises ApiError (404/409)."""
    async with pool.acquire() as conn, conn.transaction():
        await repository.lock_head(conn)
        key = await repository.lock_key(conn, scope.tenant_id, scope.environment,
                                        request.idempotency_key)
        if key is None:
            raise NotFound("usage event", request.idempotency_key, param="idempotency_key")
        original = await _original(conn, key)
        history = await repository.corrections(conn, scope.tenant_id, scope.environment,
                                               request.idempotency_key)
        voids = [c for c in history if c["action"] == "void"]
        if voids:
            if request.action == "void":
                return as_object(voids[0])  # voiding twice: the first void's answer
            raise Conflict("usage_event_voided",
                           "This usage event was voided; it cannot be amended",
                           param="idempotency_key")
        timestamp = datetime.fromisoformat(original["timestamp"].replace("Z", "+00:00"))
        refs = [r for r in (original["customer"], original.get("customer_id")) if r]
        close = await repository.billed_by_close(
            conn, scope.tenant_id, scope.environment, refs, original["_seq"], timestamp)
        if close is not None:
            raise Conflict(
                "usage_period_closed",
                "This usage event was already billed: a billing period that includes it has "
                "closed, and its invoice is final. Adjust the invoice instead (credit note).",
                param="idempotency_key")
        current = history[-1] if history else None
        correction_id = new_id("ucor")
        if request.action == "void":
            data: UsageVoided | UsageAmended = UsageVoided(
                correction_id=correction_id, usage_id=key["usage_id"],
                idempotency_key=request.idempotency_key, reason=request.reason)
            quantity = properties = None
        else:
            quantity = request.quantity or (current["quantity"] if current
                                            else original["quantity"])
            properties = request.properties if request.properties is not None else (
                current["properties"] if current else original.get("properties") or {})
            data = UsageAmended(
                correction_id=correction_id, usage_id=key["usage_id"],
                idempotency_key=request.idempotency_key, quantity=quantity,
                properties=properties, reason=request.reason)
        row = await repository.insert_correction(
            conn, correction_id, scope.tenant_id, scope.environment, request.idempotency_key,
            key["usage_id"], request.action, quantity, properties, request.reason)
        await store.append(conn, [NewEvent(
            data=data, tenant_id=scope.tenant_id, environment=scope.environment,
            # the key of the record that carried the original: same partition, after it
            **_partition_key(original, key),
            occurred_at=row["created_at"],
        )], returning=False)
        return as_object(row)


async def usage_event(pool: asyncpg.Pool, scope: Scope, idempotency_key: str) -> dict[str, Any]:
    """An accepted event as it stands: the original and its corrections."""
    key = await repository.get_key(pool, scope.tenant_id, scope.environment, idempotency_key)
    if key is None:
        raise NotFound("usage event", idempotency_key, param="idempotency_key")
    original = await _original(pool, key)
    history = await repository.corrections(pool, scope.tenant_id, scope.environment,
                                           idempotency_key)
    voided = any(c["action"] == "void" for c in history)
    amends = [c for c in history if c["action"] == "amend"]
    return {
        "object": "usage_event",
        "id": key["usage_id"],
        "idempotency_key": idempotency_key,
        "status": "voided" if voided else ("amended" if amends else "accepted"),
        "customer": original["customer"],
        "customer_id": original.get("customer_id"),
        "meter": original["meter"],
        "timestamp": original["timestamp"],
        "quantity": amends[-1]["quantity"] if amends else original["quantity"],
        "properties": amends[-1]["properties"] if amends else original.get("properties", {}),
        "original": {"quantity": original["quantity"],
                     "properties": original.get("properties", {})},
        "corrections": [as_object(c) for c in history],
        "created": key["created_at"].replace(microsecond=0),
    }


async def _original(conn, key) -> dict[str, Any]:
    if key["event_id"] is None:
        raise ApiError("usage_event_not_correctable",
                       "This event was accepted before corrections existed and cannot be "
                       "corrected", param="idempotency_key", status=409)
    row = await repository.logged_event(conn, key["event_id"])
    envelope = (orjson.loads(published_envelope(row["seq"], row["envelope"],
                                                row["envelope_codec"]))
                if row["envelope"] is not None else {"data": row["data"]})
    data = envelope["data"]
    batched = "usages" in data
    if batched:  # a usage.batch_accepted: the event's own usage in it
        data = next(u for u in data["usages"] if u["usage_id"] == key["usage_id"])
    return {**data, "_seq": row["seq"], "_batched": batched}


def _partition_key(original: dict[str, Any], key) -> dict[str, str]:
    """The aggregate (so the record key) of the event that carried the original usage."""
    if original["_batched"]:
        return {"aggregate_type": "usage_batch", "aggregate_id": key["event_id"]}
    return {"aggregate_type": "customer",  # a usage.accepted, logged before batches
            "aggregate_id": original.get("customer_id") or original["customer"]}


def as_object(row) -> dict[str, Any]:
    out: dict[str, Any] = {
        "object": "usage_correction",
        "id": row["correction_id"],
        "action": row["action"],
        "idempotency_key": row["idempotency_key"],
        "usage_id": row["usage_id"],
        "reason": row["reason"],
        "created": row["created_at"].replace(microsecond=0),
    }
    if row["action"] == "amend":
        out["quantity"] = row["quantity"]
        out["properties"] = row["properties"]
    return out
