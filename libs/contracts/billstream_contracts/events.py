"""Versioned event data models, grouped by the service that writes them.

Rules: a model is never edited in a breaking way; add optional fields only. A breaking change is
a new class with `version = 2`, published beside the old one for as long as consumers need it.
Amounts are integer minor units with an ISO 4217 currency; unit prices and quantities are
decimal strings. Timestamps are RFC 3339 UTC.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from billstream_contracts.registry import EventData, register


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


# ---------------------------------------------------------------- subscription (tenancy, keys)


@register
class TenantCreated(EventData):
    event_type = "tenant.created"
    public = False
    tenant_id: str
    name: str


@register
class ApiKeyCreated(EventData):
    """Every service projects keys from these events to authenticate requests on its own."""

    event_type = "api_key.created"
    public = False
    key_id: str
    environment: Literal["test", "live"]
    kind: Literal["secret", "publishable"]
    key_hash: str  # sha256 hex of the full key; the key itself is never stored or sent
    key_prefix: str  # for display: "sk_test_abcd"
    created_at: datetime


@register
class ApiKeyRevoked(EventData):
    event_type = "api_key.revoked"
    public = False
    key_id: str
    revoked_at: datetime


# ---------------------------------------------------------------- subscription (customers, catalog)


@register
class CustomerCreated(EventData):
    event_type = "customer.created"
    customer_id: str
    external_id: str | None = None
    name: str | None = None
    email: str | None = None
    currency: str | None = None
    test_clock_id: str | None = None
    created_at: datetime


@register
class MeterCreated(EventData):
    event_type = "meter.created"
    meter_id: str
    code: str
    name: str | None = None
    aggregation: Literal["sum", "count", "max"]
    field: str | None = None  # property summed/maxed; None means the event's quantity
    created_at: datetime


class Charge(_Part):
    charge_id: str
    type: Literal["fixed", "usage"]
    timing: Literal["in_advance", "in_arrears"]
    amount: str | None = None  # decimal string in major units, for fixed charges
    meter: str | None = None  # meter code, for usage charges
    model: Literal["per_unit"] | None = None
    unit_price: str | None = None  # decimal string in major units


class PlanSnapshot(_Part):
    plan_id: str
    code: str
    name: str
    currency: str
    interval: Literal["day", "week", "month", "year"]
    interval_count: int = 1
    charges: list[Charge]


@register
class PlanCreated(EventData):
    event_type = "plan.created"
    plan: PlanSnapshot
    created_at: datetime


@register
class TestClockCreated(EventData):
    event_type = "test_clock.created"
    test_clock_id: str
    name: str | None = None
    frozen_time: datetime


@register
class TestClockAdvanced(EventData):
    event_type = "test_clock.advanced"
    test_clock_id: str
    previous_time: datetime
    frozen_time: datetime


# ---------------------------------------------------------------- subscription (lifecycle)


class SubscriptionSnapshot(_Part):
    subscription_id: str
    customer_id: str
    customer_external_id: str | None = None
    plan: PlanSnapshot
    status: Literal["active", "past_due", "canceled"]
    started_at: datetime
    current_period_start: datetime
    current_period_end: datetime
    test_clock_id: str | None = None


@register
class SubscriptionCreated(EventData):
    event_type = "subscription.created"
    subscription: SubscriptionSnapshot


@register
class SubscriptionPeriodEnded(EventData):
    """A billing period closed. Metering answers with `usage.period_summarized`."""

    event_type = "subscription.period_ended"
    subscription: SubscriptionSnapshot  # as it was during the period that ended
    period_start: datetime
    period_end: datetime
    renews: bool
    next_period_start: datetime | None = None
    next_period_end: datetime | None = None


@register
class SubscriptionRenewed(EventData):
    event_type = "subscription.renewed"
    subscription: SubscriptionSnapshot  # with the new current period


@register
class SubscriptionPastDue(EventData):
    event_type = "subscription.past_due"
    subscription: SubscriptionSnapshot
    invoice_id: str


@register
class SubscriptionReactivated(EventData):
    event_type = "subscription.reactivated"
    subscription: SubscriptionSnapshot
    invoice_id: str


# ---------------------------------------------------------------- ingestion


@register
class UsageAccepted(EventData):
    """One accepted usage event, on `billstream.usage.accepted`."""

    event_type = "usage.accepted"
    public = False
    usage_id: str
    idempotency_key: str
    customer: str  # as the producer sent it: an external_id or a `cus_` id
    customer_id: str | None = None  # resolved `cus_` id when the customer was known
    meter: str
    quantity: str  # decimal string
    timestamp: datetime
    properties: dict[str, object] = {}


@register
class UsageBatchAccepted(EventData):
    """The usage events one ingest transaction accepted for one tenant and environment, on
    `billstream.usage.accepted`: one log row and one Kafka record for up to a thousand events
    (the log's per-event cost was most of ingestion's; see docs/ingestion.md). Each usage is
    what a `usage.accepted` carries; the batch is at most `max_batch_bytes` of JSON so that a
    record stays under the broker's message size. Ingestion writes this; `usage.accepted`
    stays readable for logs written before it."""

    event_type = "usage.batch_accepted"
    public = False
    usages: list[UsageAccepted]  # each exactly what a `usage.accepted` carries


@register
class UsagePeriodClosed(EventData):
    """Ingestion's barrier for a period end, on `billstream.usage.accepted`.

    Ingestion answers each `subscription.period_ended` by appending this to its own log, which
    is gapless and commit-ordered: every usage event it accepted before has a lower sequence.
    Metering summarizes the period only once it has applied every ingestion event below this
    one, so usage acknowledged before a period closed is billed in that period."""

    event_type = "usage.period_closed"
    public = False
    subscription: SubscriptionSnapshot
    period_start: datetime
    period_end: datetime
    renews: bool
    next_period_start: datetime | None = None
    next_period_end: datetime | None = None


@register
class UsageVoided(EventData):
    """A merchant voided an accepted usage event (by its idempotency key), on
    `billstream.usage.accepted` after the original. The original stays in the log; metering
    stops counting it. Only usage not yet billed in a closed period can be voided."""

    event_type = "usage.voided"
    public = False
    correction_id: str
    usage_id: str  # of the original usage.accepted
    idempotency_key: str
    reason: str | None = None


@register
class UsageAmended(EventData):
    """A merchant replaced the quantity and/or properties of an accepted usage event, on
    `billstream.usage.accepted` after the original. `quantity` and `properties` are the event's
    new values in full (not deltas); customer, meter and timestamp never change (void and send
    a new event for that). Only usage not yet billed in a closed period can be amended."""

    event_type = "usage.amended"
    public = False
    correction_id: str
    usage_id: str
    idempotency_key: str
    quantity: str  # decimal string, the new quantity
    properties: dict[str, object] = {}  # the new properties
    reason: str | None = None


# ---------------------------------------------------------------- metering


class MeterUsage(_Part):
    charge_id: str
    meter: str
    quantity: str  # decimal string
    usage_count: int  # how many usage events the quantity aggregates


@register
class UsagePeriodSummarized(EventData):
    """Usage of one subscription period, for invoicing to rate. Emitted once per
    `subscription.period_ended`; it sweeps every not-yet-summarized usage event up to the
    period end, so late usage is billed in the next summary instead of being lost."""

    event_type = "usage.period_summarized"
    subscription: SubscriptionSnapshot
    period_start: datetime
    period_end: datetime
    renews: bool
    next_period_start: datetime | None = None
    next_period_end: datetime | None = None
    usage: list[MeterUsage]


# ---------------------------------------------------------------- invoicing


class InvoiceLine(_Part):
    line_id: str
    type: Literal["fixed", "usage"]
    description: str
    charge_id: str
    quantity: str
    unit_price: str
    amount: int  # minor units
    period_start: datetime
    period_end: datetime


class InvoiceSnapshot(_Part):
    invoice_id: str
    number: str
    customer_id: str
    subscription_id: str | None = None
    currency: str
    status: Literal["draft", "open", "paid", "void", "uncollectible"]
    lines: list[InvoiceLine]
    subtotal: int
    total: int
    amount_due: int
    amount_paid: int
    period_start: datetime
    period_end: datetime
    issued_at: datetime
    paid_at: datetime | None = None
    test_clock_id: str | None = None


@register
class InvoiceFinalized(EventData):
    event_type = "invoice.finalized"
    invoice: InvoiceSnapshot


@register
class InvoicePaid(EventData):
    event_type = "invoice.paid"
    invoice: InvoiceSnapshot
    payment_id: str


@register
class InvoicePaymentFailed(EventData):
    event_type = "invoice.payment_failed"
    invoice: InvoiceSnapshot
    payment_id: str
    failure_code: str
    failure_message: str


# ---------------------------------------------------------------- payments


@register
class PaymentMethodAttached(EventData):
    event_type = "payment_method.attached"
    payment_method_id: str
    customer_id: str
    type: Literal["card"]
    brand: str
    last4: str
    is_default: bool
    created_at: datetime


@register
class PaymentSucceeded(EventData):
    event_type = "payment.succeeded"
    payment_id: str
    invoice_id: str
    customer_id: str
    amount: int
    currency: str
    payment_method_id: str
    created_at: datetime


@register
class PaymentFailed(EventData):
    event_type = "payment.failed"
    payment_id: str
    invoice_id: str
    customer_id: str
    amount: int
    currency: str
    payment_method_id: str | None = None
    failure_code: str
    failure_message: str
    created_at: datetime
