"""HTTP endpoints: parse, authenticate, call `service`, shape the response."""

from __future__ import annotations

import asyncpg
from fastapi import APIRouter, Depends, Query, Request, Response

from billstream_messaging.store import EventStore
from billstream_runtime.auth import AuthContext
from billstream_runtime.http import Admin, ListParams, SecretKey, page, shown_once
from billstream_subscription import repository as repo
from billstream_subscription import service
from billstream_subscription.domain import (
    ApiKey,
    Charge,
    Customer,
    Meter,
    Plan,
    Subscription,
    Tenant,
    TestClock,
)
from billstream_subscription.schemas import (
    AdvanceTestClock,
    ApiKeyCreatedOut,
    ApiKeyOut,
    ChargeOut,
    CreateApiKey,
    CreateCustomer,
    CreateMeter,
    CreatePlan,
    CreateSubscription,
    CreateTenant,
    CreateTestClock,
    CustomerOut,
    KeyPair,
    ListOut,
    MeterOut,
    PlanOut,
    SubscriptionOut,
    TenantCreatedOut,
    TenantKeys,
    TenantOut,
    TestClockOut,
)

# ---------------------------------------------------------------- presenters


def tenant_out(t: Tenant) -> TenantOut:
    return TenantOut(id=t.id, name=t.name, created=t.created_at)


def api_key_out(k: ApiKey) -> ApiKeyOut:
    return ApiKeyOut(id=k.key_id, tenant=k.tenant_id, environment=k.environment, kind=k.kind,
                     key_prefix=k.key_prefix, livemode=k.environment == "live",
                     created=k.created_at, revoked=k.revoked_at)


def clock_out(c: TestClock) -> TestClockOut:
    return TestClockOut(id=c.id, name=c.name, frozen_time=c.frozen_time, status=c.status,
                        livemode=False, created=c.created_at)


def customer_out(c: Customer) -> CustomerOut:
    return CustomerOut(id=c.id, external_id=c.external_id, name=c.name, email=c.email,
                       currency=c.currency, test_clock=c.test_clock_id, metadata=c.metadata,
                       livemode=c.environment == "live", created=c.created_at)


def meter_out(m: Meter) -> MeterOut:
    return MeterOut(id=m.id, code=m.code, name=m.name, aggregation=m.aggregation,
                    field=m.field, livemode=m.environment == "live", created=m.created_at)


def charge_out(c: Charge) -> ChargeOut:
    return ChargeOut(id=c.charge_id, type=c.type, timing=c.timing, amount=c.amount_str,
                     meter=c.meter, model=c.model, unit_price=c.unit_price_str)


def plan_out(p: Plan) -> PlanOut:
    return PlanOut(id=p.id, code=p.code, name=p.name, currency=p.currency,
                   interval=p.interval, interval_count=p.interval_count,
                   charges=[charge_out(c) for c in p.charges],
                   livemode=p.environment == "live", created=p.created_at)


def subscription_out(s: Subscription) -> SubscriptionOut:
    return SubscriptionOut(
        id=s.id, customer=s.customer_id, plan=plan_out(s.plan), status=s.status,
        current_period_start=s.current_period_start, current_period_end=s.current_period_end,
        started_at=s.started_at, test_clock=s.test_clock_id,
        livemode=s.environment == "live", created=s.created_at,
    )


def _deps(request: Request) -> tuple[asyncpg.Pool, EventStore]:
    return request.app.state.pool, request.app.state.store


# ---------------------------------------------------------------- admin

admin = APIRouter(prefix="/admin/v1", tags=["admin"], dependencies=[Admin])


@admin.post("/tenants", status_code=201, response_model=TenantCreatedOut)
async def create_tenant(body: CreateTenant, request: Request, response: Response):
    shown_once(response)
    tenant, keys = await service.create_tenant(*_deps(request), body.name)
    return TenantCreatedOut(
        **tenant_out(tenant).model_dump(),
        keys=TenantKeys(test=KeyPair(**keys["test"]), live=KeyPair(**keys["live"])),
    )


@admin.get("/tenants", response_model=ListOut[TenantOut])
async def list_tenants(request: Request, params: ListParams = Depends()):
    rows = await repo.list_tenants(request.app.state.pool, params.limit, params.starting_after)
    return page([tenant_out(t) for t in rows], params.limit)


@admin.get("/tenants/{tenant_id}", response_model=TenantOut)
async def get_tenant(tenant_id: str, request: Request):
    return tenant_out(await service.get_tenant(request.app.state.pool, tenant_id))


@admin.post("/tenants/{tenant_id}/api_keys", status_code=201, response_model=ApiKeyCreatedOut)
async def create_api_key(tenant_id: str, body: CreateApiKey, request: Request,
                         response: Response):
    shown_once(response)
    record, key = await service.create_api_key(*_deps(request), tenant_id, body.environment,
                                               body.kind)
    return ApiKeyCreatedOut(**api_key_out(record).model_dump(), key=key)


@admin.get("/tenants/{tenant_id}/api_keys", response_model=ListOut[ApiKeyOut])
async def list_api_keys(tenant_id: str, request: Request, params: ListParams = Depends()):
    pool = request.app.state.pool
    await service.get_tenant(pool, tenant_id)
    rows = await repo.list_api_keys(pool, tenant_id, params.limit, params.starting_after)
    return page([api_key_out(k) for k in rows], params.limit)


@admin.delete("/api_keys/{key_id}", response_model=ApiKeyOut)
async def revoke_api_key(key_id: str, request: Request):
    return api_key_out(await service.revoke_api_key(*_deps(request), key_id))


# ---------------------------------------------------------------- public

public = APIRouter(prefix="/v1")


@public.post("/test_clocks", status_code=201, response_model=TestClockOut, tags=["test_clocks"])
async def create_test_clock(body: CreateTestClock, request: Request,
                            auth: AuthContext = SecretKey):
    return clock_out(await service.create_test_clock(*_deps(request), auth, body))


@public.get("/test_clocks", response_model=ListOut[TestClockOut], tags=["test_clocks"])
async def list_test_clocks(request: Request, params: ListParams = Depends(),
                           auth: AuthContext = SecretKey):
    rows = await service.list_test_clocks(request.app.state.pool, auth, params.limit,
                                          params.starting_after)
    return page([clock_out(c) for c in rows], params.limit)


@public.get("/test_clocks/{clock_id}", response_model=TestClockOut, tags=["test_clocks"])
async def get_test_clock(clock_id: str, request: Request, auth: AuthContext = SecretKey):
    return clock_out(await service.get_test_clock(request.app.state.pool, auth, clock_id))


@public.post("/test_clocks/{clock_id}/advance", response_model=TestClockOut,
             tags=["test_clocks"])
async def advance_test_clock(clock_id: str, body: AdvanceTestClock, request: Request,
                             auth: AuthContext = SecretKey):
    """Move the clock forward; every renewal the jump implies happens, in order, once."""
    return clock_out(await service.advance_test_clock(*_deps(request), auth, clock_id,
                                                      body.frozen_time))


@public.post("/customers", status_code=201, response_model=CustomerOut, tags=["customers"])
async def create_customer(body: CreateCustomer, request: Request,
                          auth: AuthContext = SecretKey):
    return customer_out(await service.create_customer(*_deps(request), auth, body))


@public.get("/customers", response_model=ListOut[CustomerOut], tags=["customers"])
async def list_customers(request: Request, params: ListParams = Depends(),
                         auth: AuthContext = SecretKey):
    rows = await repo.list_customers(request.app.state.pool, auth.tenant_id, auth.environment,
                                     params.limit, params.starting_after)
    return page([customer_out(c) for c in rows], params.limit)


@public.get("/customers/{customer}", response_model=CustomerOut, tags=["customers"])
async def get_customer(customer: str, request: Request, auth: AuthContext = SecretKey):
    """By `cus_` id or by external id."""
    return customer_out(await service.get_customer(request.app.state.pool, auth, customer))


@public.post("/meters", status_code=201, response_model=MeterOut, tags=["catalog"])
async def create_meter(body: CreateMeter, request: Request, auth: AuthContext = SecretKey):
    return meter_out(await service.create_meter(*_deps(request), auth, body))


@public.get("/meters", response_model=ListOut[MeterOut], tags=["catalog"])
async def list_meters(request: Request, params: ListParams = Depends(),
                      auth: AuthContext = SecretKey):
    rows = await repo.list_meters(request.app.state.pool, auth.tenant_id, auth.environment,
                                  params.limit, params.starting_after)
    return page([meter_out(m) for m in rows], params.limit)


@public.get("/meters/{meter}", response_model=MeterOut, tags=["catalog"])
async def get_meter(meter: str, request: Request, auth: AuthContext = SecretKey):
    """By `mtr_` id or by code."""
    return meter_out(await service.get_meter(request.app.state.pool, auth, meter))


@public.post("/plans", status_code=201, response_model=PlanOut, tags=["catalog"])
async def create_plan(body: CreatePlan, request: Request, auth: AuthContext = SecretKey):
    return plan_out(await service.create_plan(*_deps(request), auth, body))


@public.get("/plans", response_model=ListOut[PlanOut], tags=["catalog"])
async def list_plans(request: Request, params: ListParams = Depends(),
                     auth: AuthContext = SecretKey):
    rows = await repo.list_plans(request.app.state.pool, auth.tenant_id, auth.environment,
                                 params.limit, params.starting_after)
    return page([plan_out(p) for p in rows], params.limit)


@public.get("/plans/{plan}", response_model=PlanOut, tags=["catalog"])
async def get_plan(plan: str, request: Request, auth: AuthContext = SecretKey):
    """By `plan_` id or by code."""
    return plan_out(await service.get_plan(request.app.state.pool, auth, plan))


@public.post("/subscriptions", status_code=201, response_model=SubscriptionOut,
             tags=["subscriptions"])
async def create_subscription(body: CreateSubscription, request: Request,
                              auth: AuthContext = SecretKey):
    return subscription_out(await service.create_subscription(*_deps(request), auth, body))


@public.get("/subscriptions", response_model=ListOut[SubscriptionOut], tags=["subscriptions"])
async def list_subscriptions(
    request: Request,
    params: ListParams = Depends(),
    customer: str | None = Query(None, description="Only this customer's (id or external id)"),
    auth: AuthContext = SecretKey,
):
    rows = await service.list_subscriptions(request.app.state.pool, auth, params.limit,
                                            params.starting_after, customer)
    return page([subscription_out(s) for s in rows], params.limit)


@public.get("/subscriptions/{subscription_id}", response_model=SubscriptionOut,
            tags=["subscriptions"])
async def get_subscription(subscription_id: str, request: Request,
                           auth: AuthContext = SecretKey):
    return subscription_out(await service.get_subscription(request.app.state.pool, auth,
                                                           subscription_id))


routers = [admin, public]
