"""Invoice numbers and the paid transition (pure domain)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from billstream_invoicing import domain


def test_invoice_numbers_are_zero_padded_and_sequential():
    assert domain.format_number(1) == "INV-000001"
    assert domain.format_number(42) == "INV-000042"
    assert domain.format_number(999999) == "INV-999999"
    assert domain.format_number(1000000) == "INV-1000000"  # grows, never wraps
    numbers = [domain.format_number(n) for n in range(1, 200)]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


def test_invoice_numbers_start_at_one():
    with pytest.raises(ValueError):
        domain.format_number(0)


def _invoice(status="open") -> domain.Invoice:
    t = datetime(2025, 1, 1, tzinfo=UTC)
    return domain.Invoice(
        invoice_id="inv_1", tenant_id="ten", environment="test", number="INV-000001",
        kind="subscription_create", customer_id="cus_1", subscription_id="sub_1", status=status,
        currency="USD", subtotal=4900, total=4900, amount_due=4900, amount_paid=0,
        period_start=t, period_end=t, issued_at=t, paid_at=None, test_clock_id=None,
        created_at=t,
    )


def test_mark_paid_only_from_open():
    at = datetime(2025, 1, 2, tzinfo=UTC)
    paid = _invoice().mark_paid(4900, at)
    assert (paid.status, paid.amount_paid, paid.paid_at) == ("paid", 4900, at)
    with pytest.raises(ValueError):
        paid.mark_paid(4900, at)
