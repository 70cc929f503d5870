"""Gateway adapters (the port is `domain.Gateway`). Only the sandbox exists so far.

The sandbox needs no network: it knows a few test tokens and answers deterministically, so
tests and local runs behave the same every time.

| token                | card             | charges                        |
| -------------------- | ---------------- | ------------------------------ |
| `tok_visa`           | visa 4242        | succeed                        |
| `tok_mastercard`     | mastercard 4444  | succeed                        |
| `tok_chargeDeclined` | visa 0002        | fail with `card_declined`      |
| anything else        | —                | `InvalidToken` when attached   |
"""

from __future__ import annotations

import hashlib

from billstream_payments.domain import Card, ChargeResult, InvalidToken

DECLINED = ("card_declined", "Your card was declined.")


class SandboxGateway:
    CARDS: dict[str, tuple[Card, bool]] = {
        "tok_visa": (Card("visa", "4242"), True),
        "tok_mastercard": (Card("mastercard", "4444"), True),
        "tok_chargeDeclined": (Card("visa", "0002"), False),
    }

    def __init__(self) -> None:
        self._charges: dict[str, tuple[tuple[str, int, str], ChargeResult]] = {}

    async def card_for(self, token: str) -> Card:
        known = self.CARDS.get(token)
        if known is None:
            raise InvalidToken(token)
        return known[0]

    async def charge(self, token: str, amount: int, currency: str,
                     idempotency_key: str) -> ChargeResult:
        request = (token, amount, currency.upper())
        seen = self._charges.get(idempotency_key)
        if seen is not None:
            if seen[0] != request:
                raise ValueError(
                    f"idempotency key {idempotency_key!r} was used with another request")
            return seen[1]
        result = self._decide(token, amount, idempotency_key)
        self._charges[idempotency_key] = (request, result)
        return result

    def _decide(self, token: str, amount: int, key: str) -> ChargeResult:
        # The charge id derives from the key alone: the same key gives the same charge even
        # across restarts of a process that forgot its in-memory record.
        charge_id = "ch_sandbox_" + hashlib.sha256(key.encode()).hexdigest()[:24]
        known = self.CARDS.get(token)
        if known is None:
            return ChargeResult(False, charge_id, "invalid_token", "Unknown payment token")
        if amount <= 0:
            return ChargeResult(False, charge_id, "amount_invalid", "Amount must be positive")
        if not known[1]:
            return ChargeResult(False, charge_id, *DECLINED)
        return ChargeResult(True, charge_id)
