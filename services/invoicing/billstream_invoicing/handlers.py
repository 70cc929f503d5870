"""Event handlers of the `billing` consumer: thin, each runs in the batch transaction."""

from __future__ import annotations

from billstream_contracts.events import (
    PaymentFailed,
    PaymentSucceeded,
    SubscriptionCreated,
    UsagePeriodSummarized,
)
from billstream_invoicing import service
from billstream_messaging import EventContext


async def on_subscription_created(ctx: EventContext) -> None:
    assert isinstance(ctx.data, SubscriptionCreated)
    await service.invoice_new_subscription(ctx.conn, ctx.store, ctx.envelope, ctx.data,
                                           ctx.cause)


async def on_usage_period_summarized(ctx: EventContext) -> None:
    assert isinstance(ctx.data, UsagePeriodSummarized)
    await service.invoice_period(ctx.conn, ctx.store, ctx.envelope, ctx.data, ctx.cause)


async def on_payment_succeeded(ctx: EventContext) -> None:
    assert isinstance(ctx.data, PaymentSucceeded)
    await service.apply_payment_succeeded(ctx.conn, ctx.store, ctx.envelope, ctx.data,
                                          ctx.cause)


async def on_payment_failed(ctx: EventContext) -> None:
    assert isinstance(ctx.data, PaymentFailed)
    await service.apply_payment_failed(ctx.conn, ctx.store, ctx.envelope, ctx.data, ctx.cause)


BILLING_HANDLERS = {
    "subscription.created": on_subscription_created,
    "usage.period_summarized": on_usage_period_summarized,
    "payment.succeeded": on_payment_succeeded,
    "payment.failed": on_payment_failed,
}
