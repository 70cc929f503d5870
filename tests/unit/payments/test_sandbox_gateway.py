"""The sandbox gateway adapter: known tokens, deterministic and idempotent charges."""

from __future__ import annotations

import pytest

from billstream_payments.domain import Card, InvalidToken
from billstream_payments.gateway import SandboxGateway


@pytest.mark.parametrize(("token", "card"), [
    ("tok_visa", Card("visa", "4242")),
    ("tok_mastercard", Card("mastercard", "4444")),
    ("tok_chargeDeclined", Card("visa", "0002")),
])
async def test_known_tokens_describe_their_card(token, card):
    assert await SandboxGateway().card_for(token) == card


@pytest.mark.parametrize("token", ["tok_unknown", "", "pm_123", "TOK_VISA"])
async def test_unknown_tokens_are_invalid(token):
    with pytest.raises(InvalidToken):
        await SandboxGateway().card_for(token)


async def test_good_cards_succeed_and_declined_card_fails():
    gw = SandboxGateway()
    ok = await gw.charge("tok_visa", 4900, "USD", idempotency_key="pay_1")
    assert ok.succeeded and ok.charge_id.startswith("ch_sandbox_") and ok.failure_code is None
    assert (await gw.charge("tok_mastercard", 100, "EUR", idempotency_key="pay_2")).succeeded
    declined = await gw.charge("tok_chargeDeclined", 4900, "USD", idempotency_key="pay_3")
    assert not declined.succeeded and declined.failure_code == "card_declined"
    assert declined.failure_message


async def test_charges_are_idempotent_and_deterministic_on_the_key():
    gw = SandboxGateway()
    first = await gw.charge("tok_visa", 4900, "USD", idempotency_key="pay_1")
    assert await gw.charge("tok_visa", 4900, "USD", idempotency_key="pay_1") == first
    # Another process (or a restart) gives the same answer for the same key.
    assert await SandboxGateway().charge("tok_visa", 4900, "USD", idempotency_key="pay_1") == first
    other = await gw.charge("tok_visa", 4900, "USD", idempotency_key="pay_2")
    assert other.charge_id != first.charge_id


async def test_a_key_reused_for_another_charge_is_refused():
    gw = SandboxGateway()
    await gw.charge("tok_visa", 4900, "USD", idempotency_key="pay_1")
    with pytest.raises(ValueError):
        await gw.charge("tok_visa", 5000, "USD", idempotency_key="pay_1")


async def test_non_positive_amounts_fail():
    result = await SandboxGateway().charge("tok_visa", 0, "USD", idempotency_key="k")
    assert not result.succeeded and result.failure_code == "amount_invalid"
