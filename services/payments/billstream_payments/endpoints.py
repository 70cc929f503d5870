"""Payments HTTP API: payment methods of a customer, payments."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from billstream_payments import service
from billstream_payments.domain import Customer, InvalidToken
from billstream_payments.schemas import (
    AttachPaymentMethod,
    PaymentList,
    PaymentMethodList,
    PaymentMethodOut,
    PaymentOut,
)
from billstream_runtime.auth import AuthContext
from billstream_runtime.errors import InvalidRequest, NotFound
from billstream_runtime.http import ListParams, SecretKey, page, wait_for

router = APIRouter(tags=["payments"])


async def _customer(request: Request, auth: AuthContext, customer_id: str) -> Customer:
    """The customer from our projection, waiting for it to catch up with a customer created
    moments ago (read-your-writes across services) before answering 404."""
    pool = request.app.state.pool
    customer = await wait_for(
        lambda: service.find_customer(pool, auth.tenant_id, auth.environment, customer_id),
        request.app.state.settings.projection_wait_s,
    )
    if customer is None:
        raise NotFound("customer", customer_id, param="customer")
    return customer


@router.post("/v1/customers/{customer_id}/payment_methods", status_code=201,
             response_model=PaymentMethodOut)
async def attach_payment_method(request: Request, customer_id: str, body: AttachPaymentMethod,
                                auth: AuthContext = SecretKey):
    customer = await _customer(request, auth, customer_id)
    try:
        card = await request.app.state.gateway.card_for(body.token)
    except InvalidToken:
        raise InvalidRequest("invalid_token", f"No such token: '{body.token}'",
                             param="token") from None
    pm = await service.attach_method(request.app.state.pool, request.app.state.store, customer,
                                     body.token, card)
    return PaymentMethodOut.of(pm)


@router.get("/v1/customers/{customer_id}/payment_methods", response_model=PaymentMethodList)
async def list_payment_methods(request: Request, customer_id: str,
                               params: ListParams = Depends(), auth: AuthContext = SecretKey):
    customer = await _customer(request, auth, customer_id)
    methods = await service.list_methods(request.app.state.pool, customer,
                                         starting_after=params.starting_after,
                                         limit=params.limit + 1)
    return page([PaymentMethodOut.of(m) for m in methods], params.limit)


@router.get("/v1/payments", response_model=PaymentList)
async def list_payments(
    request: Request,
    invoice: str | None = Query(None, description="Only the payments of this invoice (inv_…)"),
    customer: str | None = Query(None, description="Only this customer's payments (cus_…)"),
    params: ListParams = Depends(),
    auth: AuthContext = SecretKey,
):
    payments = await service.list_payments(
        request.app.state.pool, auth.tenant_id, auth.environment, invoice_id=invoice,
        customer_id=customer, starting_after=params.starting_after, limit=params.limit + 1,
    )
    return page([PaymentOut.of(p) for p in payments], params.limit)


@router.get("/v1/payments/{payment_id}", response_model=PaymentOut)
async def get_payment(request: Request, payment_id: str, auth: AuthContext = SecretKey):
    payment = await service.get_payment(request.app.state.pool, auth.tenant_id,
                                        auth.environment, payment_id)
    if payment is None:
        raise NotFound("payment", payment_id, param="id")
    return PaymentOut.of(payment)
