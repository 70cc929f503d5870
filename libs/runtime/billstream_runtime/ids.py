"""Prefixed, sortable identifiers: `cus_01JD…`, `evt_01JD…`."""

from __future__ import annotations

import secrets

from ulid import ULID

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def new_id(prefix: str) -> str:
    """A new id: the prefix, an underscore and a ULID (time-sortable, 128 bits)."""
    return f"{prefix}_{ULID()}"


def random_token(length: int = 32) -> str:
    """A random base62 string for secrets (API keys, webhook secrets)."""
    return "".join(secrets.choice(_B62) for _ in range(length))
