"""Invoicing HTTP API: `GET /v1/invoices`, `GET /v1/invoices/{id}`."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request

from billstream_invoicing import service
from billstream_invoicing.schemas import InvoiceList, InvoiceOut
from billstream_runtime.auth import AuthContext
from billstream_runtime.errors import NotFound
from billstream_runtime.http import ListParams, SecretKey, page

router = APIRouter(prefix="/v1/invoices", tags=["invoices"])


@router.get("", response_model=InvoiceList)
async def list_invoices(
    request: Request,
    customer: str | None = Query(None, description="Only this customer's invoices (cus_…)"),
    subscription: str | None = Query(None, description="Only this subscription's (sub_…)"),
    status: Literal["draft", "open", "paid", "void", "uncollectible"] | None = Query(None),
    params: ListParams = Depends(),
    auth: AuthContext = SecretKey,
):
    invoices = await service.list_invoices(
        request.app.state.pool, auth.tenant_id, auth.environment, customer_id=customer,
        subscription_id=subscription, status=status, starting_after=params.starting_after,
        limit=params.limit + 1,
    )
    return page([InvoiceOut.of(i) for i in invoices], params.limit)


@router.get("/{invoice_id}", response_model=InvoiceOut)
async def get_invoice(request: Request, invoice_id: str, auth: AuthContext = SecretKey):
    invoice = await service.get_invoice(request.app.state.pool, auth.tenant_id,
                                        auth.environment, invoice_id)
    if invoice is None:
        raise NotFound("invoice", invoice_id, param="id")
    return InvoiceOut.of(invoice)
