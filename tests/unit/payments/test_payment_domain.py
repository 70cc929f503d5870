"""Settling a payment and deciding what to collect (pure domain)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from billstream_payments import domain
from billstream_payments.domain import ChargeResult, Payment, PaymentMethod

T = datetime(2031, 1, 1, tzinfo=UTC)
PENDING = Payment(payment_id="pay_1", tenant_id="ten", environment="test", invoice_id="inv_1",
                  customer_id="cus_1", amount=4900, currency="USD", status="pending",
                  created_at=T)
VISA = PaymentMethod(payment_method_id="pm_1", tenant_id="ten", environment="test",
                     customer_id="cus_1", gateway_token="tok_visa", type="card", brand="visa",
                     last4="4242", is_default=True, created_at=T)


def test_success_records_the_method_and_charge():
    paid = PENDING.settle(VISA, ChargeResult(True, "ch_1"))
    assert (paid.status, paid.payment_method_id, paid.gateway_charge_id) == (
        "succeeded", "pm_1", "ch_1")
    assert paid.failure_code is None and paid.created_at == T


def test_decline_records_the_failure():
    failed = PENDING.settle(VISA, ChargeResult(False, "ch_2", "card_declined", "Declined"))
    assert (failed.status, failed.failure_code, failed.failure_message) == (
        "failed", "card_declined", "Declined")
    assert failed.payment_method_id == "pm_1"


def test_no_method_fails_with_payment_method_missing():
    failed = PENDING.settle(None, None)
    assert (failed.status, failed.failure_code, failed.payment_method_id) == (
        "failed", domain.PAYMENT_METHOD_MISSING, None)


def test_a_settled_payment_cannot_settle_again():
    with pytest.raises(ValueError):
        PENDING.settle(None, None).settle(VISA, ChargeResult(True, "ch"))


@pytest.mark.parametrize(("status", "due", "collect"), [
    ("open", 4900, True), ("open", 0, False), ("paid", 4900, False), ("void", 10, False),
])
def test_should_collect(status, due, collect):
    assert domain.should_collect(status, due) is collect
