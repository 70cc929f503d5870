"""API-key authentication. The key fixes tenant and environment.

Keys are shown once and stored as sha256 hashes. The subscription service owns them and
publishes `api_key.created` / `api_key.revoked`; every service projects those into its own
`api_keys` table (see `project_api_key_event`) and authenticates without calling anyone.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Literal

import asyncpg

from billstream_runtime.errors import Unauthorized

KEY_PREFIXES = {
    "sk_test_": ("secret", "test"),
    "sk_live_": ("secret", "live"),
    "pk_test_": ("publishable", "test"),
    "pk_live_": ("publishable", "live"),
}


@dataclass(frozen=True, slots=True)
class AuthContext:
    tenant_id: str
    environment: Literal["test", "live"]
    kind: Literal["secret", "publishable"]
    key_id: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def admin_token_matches(token: str | None, expected: str) -> bool:
    return bool(expected) and token is not None and hmac.compare_digest(token, expected)


class Authenticator:
    """Resolves a bearer key to an AuthContext from the local `api_keys` projection.
    Positive answers are cached for `ttl_s` so the ingest path does not query per request;
    a revoked key stops working within that time."""

    def __init__(self, pool: asyncpg.Pool, ttl_s: float = 10.0) -> None:
        self._pool = pool
        self._ttl = ttl_s
        self._cache: dict[str, tuple[float, AuthContext]] = {}

    async def authenticate(self, token: str | None) -> AuthContext:
        if token is None:
            raise Unauthorized(
                "missing_api_key", "Provide your API key as 'Authorization: Bearer sk_...'"
            )
        if not any(token.startswith(p) for p in KEY_PREFIXES):
            raise Unauthorized("invalid_api_key", "The API key is malformed")
        digest = hash_key(token)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit and hit[0] > now:
            return hit[1]
        row = await self._pool.fetchrow(
            "SELECT key_id, tenant_id, environment, kind FROM api_keys"
            " WHERE key_hash = $1 AND revoked_at IS NULL",
            digest,
        )
        if row is None:
            raise Unauthorized("invalid_api_key", "Invalid API key provided")
        ctx = AuthContext(row["tenant_id"], row["environment"], row["kind"], row["key_id"])
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + self._ttl, ctx)
        return ctx


async def project_api_key_event(conn: asyncpg.Connection, tenant_id: str, event_type: str,
                                data: dict) -> None:
    """Apply `api_key.created` / `api_key.revoked` to the local `api_keys` table (idempotent)."""
    if event_type == "api_key.created":
        await conn.execute(
            "INSERT INTO api_keys (key_id, tenant_id, environment, kind, key_hash, key_prefix,"
            " created_at) VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT (key_id) DO NOTHING",
            data["key_id"], tenant_id, data["environment"], data["kind"], data["key_hash"],
            data["key_prefix"], _ts(data["created_at"]),
        )
    elif event_type == "api_key.revoked":
        await conn.execute(
            "UPDATE api_keys SET revoked_at = $2 WHERE key_id = $1 AND revoked_at IS NULL",
            data["key_id"], _ts(data["revoked_at"]),
        )


def _ts(value):
    from datetime import datetime

    return value if isinstance(value, datetime) else datetime.fromisoformat(value)
