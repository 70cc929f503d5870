"""Webhook dispatch rules: the public event shape, event filtering, Standard Webhooks signing,
the retry schedule and the delivery state machine. Pure: no I/O.

Delivery states::

    pending ──claim──▶ sending ──2xx──▶ delivered
       ▲                  │
       │  non-2xx or      ├──▶ pending (retry after backoff) while attempts remain
       │  network error   └──▶ failed  (the cycle's last attempt failed)
       │
       └── retry / replay (from delivered, failed, canceled, or a sending whose lease expired)

    pending ──endpoint disabled──▶ canceled

A crashed worker leaves a delivery `sending` with a lease (`locked_until`) that expires; the
next claim takes it again, so delivery is at least once. Receivers deduplicate on the
`webhook-id` header (the event id, the same on every attempt and replay) and order by the
event's `occurred_at`: deliveries of one endpoint go out in parallel, not in order.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
import ipaddress
from urllib.parse import urlsplit

import orjson

from billstream_runtime.errors import ApiError, Conflict, InvalidRequest

WILDCARD = "*"
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24
MAX_URL_LENGTH = 2048
MAX_DESCRIPTION_LENGTH = 5000

DeliveryStatus = Literal["pending", "sending", "delivered", "failed", "canceled"]
EndpointStatus = Literal["enabled", "disabled"]

#: The default retry schedule as multiples of `delivery_backoff_base_s` (5 s by default):
#: 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 2 h, 4 h, then doubling, capped by
#: `delivery_backoff_max_s`. Entry i is the wait after the (i+1)-th failed attempt.
BACKOFF_FACTORS: tuple[int, ...] = (1, 6, 24, 120, 360, 720, 1440, 2880)


# ---------------------------------------------------------------- time


def rfc3339(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with a `Z`."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------- public events


def public_event(
    *,
    event_id: str,
    event_type: str,
    version: int,
    environment: str,
    occurred_at: datetime,
    recorded_at: datetime,
    data: Mapping[str, Any],
) -> dict[str, Any]:
    """The public shape of an event: what `GET /v1/events` returns and what a webhook carries."""
    return {
        "id": event_id,
        "object": "event",
        "type": event_type,
        "version": version,
        "created": rfc3339(recorded_at),
        "occurred_at": rfc3339(occurred_at),
        "livemode": environment == "live",
        "data": dict(data),
    }


def encode_body(event: Mapping[str, Any]) -> bytes:
    """The webhook body bytes. Written once per event and stored, so that every attempt sends,
    and signs, exactly the same bytes."""
    return orjson.dumps(event)


def wants(enabled_events: Iterable[str], event_type: str) -> bool:
    """Whether an endpoint subscribed to `enabled_events` receives events of `event_type`."""
    enabled = set(enabled_events)
    return WILDCARD in enabled or event_type in enabled


@dataclass(frozen=True, slots=True)
class EndpointTarget:
    """An enabled endpoint as the event consumer sees it."""

    endpoint_id: str
    enabled_events: Sequence[str]
    created_at: datetime


def recipients(
    endpoints: Iterable[EndpointTarget], event_type: str, recorded_at: datetime
) -> list[str]:
    """The endpoints that get a delivery of a newly consumed event: enabled (the caller passes
    only those), subscribed to its type, and existing when the event was recorded. The last
    rule makes the outcome independent of consumer lag and of a rebuild by replay: an endpoint
    gets the events recorded after its creation; older ones only by an explicit replay."""
    return [
        e.endpoint_id
        for e in endpoints
        if wants(e.enabled_events, event_type) and e.created_at <= recorded_at
    ]


def validate_enabled_events(values: Sequence[str], public_types: Iterable[str]) -> list[str]:
    """`["*"]` or known public event types; duplicates dropped, order kept."""
    known = set(public_types)
    if not values:
        raise InvalidRequest(
            "parameter_invalid", "enabled_events must list at least one event type, or '*'",
            param="enabled_events",
        )
    result: list[str] = []
    for value in values:
        if value != WILDCARD and value not in known:
            raise InvalidRequest(
                "parameter_invalid",
                f"enabled_events: unknown event type '{value}'; use '*' or one of: "
                + ", ".join(sorted(known)),
                param="enabled_events",
            )
        if value not in result:
            result.append(value)
    return result


def is_public_address(address: str) -> bool:
    """True for a globally routable IP address: not loopback, private, link-local (cloud
    metadata lives there), multicast, reserved or unspecified."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def validate_url(url: str, *, allow_private: bool = False) -> str:
    """An absolute http(s) URL; unless `allow_private`, its host may not be a non-public IP
    literal (names are checked when each delivery resolves them: see tasks.HttpSender)."""
    url = url.strip()
    parts = urlsplit(url)
    if (
        len(url) > MAX_URL_LENGTH
        or parts.scheme not in ("http", "https")
        or not parts.hostname
    ):
        raise InvalidRequest(
            "url_invalid", "url must be an absolute http or https URL", param="url"
        )
    if not allow_private:
        try:
            literal = ipaddress.ip_address(parts.hostname)
        except ValueError:
            literal = None
        if literal is not None and not is_public_address(str(literal)) or (
            parts.hostname.lower() in ("localhost", "localhost.localdomain")
        ):
            raise InvalidRequest(
                "url_not_allowed",
                "url must point to a public address (loopback, private and link-local "
                "addresses are refused)", param="url",
            )
    return url


def validate_description(description: str | None) -> str | None:
    if description is not None and len(description) > MAX_DESCRIPTION_LENGTH:
        raise InvalidRequest(
            "parameter_invalid",
            f"description must be at most {MAX_DESCRIPTION_LENGTH} characters",
            param="description",
        )
    return description


# ---------------------------------------------------------------- signing (Standard Webhooks)


def new_secret() -> str:
    """`whsec_` + base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    raw = secret.removeprefix(SECRET_PREFIX)
    return base64.b64decode(raw + "=" * (-len(raw) % 4))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` keyed with the secret's bytes."""
    to_sign = f"{msg_id}.{timestamp}.".encode() + body
    mac = hmac.new(secret_key(secret), to_sign, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def webhook_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one attempt: the id stays the same across retries, the timestamp and
    the signature are those of this attempt."""
    return {
        "content-type": "application/json",
        "user-agent": "Billstream-Webhooks/1.0",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


# ---------------------------------------------------------------- retries


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 10
    base_s: float = 5.0
    max_s: float = 4 * 3600.0
    jitter: float = 0.2  # ± this fraction

    def delay_s(self, failed_attempts: int, rand: float = 0.5) -> float:
        """Seconds to wait after the `failed_attempts`-th failed attempt of a cycle (1-based).
        `rand` in [0, 1) spreads the retry by ±jitter (0.5 means none)."""
        index = max(failed_attempts, 1) - 1
        if index < len(BACKOFF_FACTORS):
            factor = BACKOFF_FACTORS[index]
        else:
            factor = BACKOFF_FACTORS[-1] * 2 ** (index - len(BACKOFF_FACTORS) + 1)
        delay = min(factor * self.base_s, self.max_s)
        return max(0.0, delay * (1 + self.jitter * (2 * rand - 1)))


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    status: DeliveryStatus
    retry_in_s: float | None = None  # when pending: the wait before the next attempt


def succeeded(status_code: int | None) -> bool:
    return status_code is not None and 200 <= status_code < 300


def after_attempt(
    *,
    status_code: int | None,
    cycle_attempts: int,
    policy: RetryPolicy,
    endpoint_enabled: bool,
    rand: float = 0.5,
) -> AttemptOutcome:
    """The delivery's state after an attempt. `cycle_attempts` counts the attempts since the
    delivery was last (re)scheduled, this one included."""
    if succeeded(status_code):
        return AttemptOutcome("delivered")
    if not endpoint_enabled:
        return AttemptOutcome("canceled")
    if cycle_attempts >= policy.max_attempts:
        return AttemptOutcome("failed")
    return AttemptOutcome("pending", policy.delay_s(cycle_attempts, rand))


def retry_refusal(
    status: DeliveryStatus, lease_expired: bool, endpoint_status: EndpointStatus
) -> ApiError | None:
    """Why a delivery cannot be retried now, or None. Anything but an attempt in flight may be
    sent again, delivered deliveries included (a replay)."""
    if endpoint_status != "enabled":
        return InvalidRequest(
            "endpoint_disabled",
            "The webhook endpoint is disabled; its deliveries cannot be retried",
        )
    if status == "sending" and not lease_expired:
        return Conflict(
            "delivery_in_progress",
            "An attempt of this delivery is in flight; retry when it has finished",
        )
    return None


# ---------------------------------------------------------------- the worker's view


@dataclass(frozen=True, slots=True)
class Claim:
    """A delivery a worker has leased for one attempt."""

    delivery_id: str
    attempt_id: str  # the claim token: only this attempt's result may settle the delivery
    attempt_number: int  # over the delivery's life
    cycle_attempts: int  # since the delivery was last (re)scheduled, this attempt included
    event_id: str
    endpoint_id: str
    url: str
    secret: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class AttemptResult:
    status_code: int | None  # None: no HTTP response (connection error, timeout)
    error: str | None
    duration_ms: int
    response_body: str | None = None

    @property
    def succeeded(self) -> bool:
        return succeeded(self.status_code)
