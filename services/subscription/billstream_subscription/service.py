"""Use cases of the subscription service. Each opens (or, in a handler, is given) one
transaction: load, call the domain, write, `store.append(...)` last, commit. A state change
and the events that announce it always commit together."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime

import asyncpg
import structlog

from billstream_contracts.events import (
    ApiKeyCreated,
    ApiKeyRevoked,
    Charge as ChargeData,
    CustomerCreated,
    MeterCreated,
    PlanCreated,
    PlanSnapshot,
    SubscriptionCreated,
    SubscriptionPastDue,
    SubscriptionPeriodEnded,
    SubscriptionReactivated,
    SubscriptionRenewed,
    SubscriptionSnapshot,
    TenantCreated,
    TestClockAdvanced,
    TestClockCreated,
)
from billstream_messaging.store import Cause, EventStore, NewEvent
from billstream_runtime.auth import AuthContext, hash_key
from billstream_runtime.errors import Conflict, InvalidRequest, NotFound
from billstream_runtime.ids import new_id, random_token
from billstream_subscription import domain, repository as repo
from billstream_subscription.domain import (
    ApiKey,
    ChargeSpec,
    Customer,
    InvalidInput,
    Meter,
    Plan,
    Renewal,
    Subscription,
    Tenant,
    TestClock,
)
from billstream_subscription.schemas import (
    CreateCustomer,
    CreateMeter,
    CreatePlan,
    CreateSubscription,
    CreateTestClock,
)

log = structlog.get_logger("billstream.subscription")
ENVIRONMENTS: tuple[domain.Environment, ...] = ("test", "live")
KINDS: tuple[domain.KeyKind, ...] = ("secret", "publishable")


def wall_clock() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@contextmanager
def rules() -> Iterator[None]:
    """Domain refusals become the public 400 error shape."""
    try:
        yield
    except InvalidInput as exc:
        raise InvalidRequest(exc.code, exc.message, param=exc.param) from exc


# ---------------------------------------------------------------- event data


def plan_snapshot(plan: Plan) -> PlanSnapshot:
    return PlanSnapshot(
        plan_id=plan.id, code=plan.code, name=plan.name, currency=plan.currency,
        interval=plan.interval, interval_count=plan.interval_count,
        charges=[ChargeData(charge_id=c.charge_id, type=c.type, timing=c.timing,
                            amount=c.amount_str, meter=c.meter, model=c.model,
                            unit_price=c.unit_price_str) for c in plan.charges],
    )


def subscription_snapshot(sub: Subscription) -> SubscriptionSnapshot:
    return SubscriptionSnapshot(
        subscription_id=sub.id, customer_id=sub.customer_id,
        customer_external_id=sub.customer_external_id, plan=plan_snapshot(sub.plan),
        status=sub.status, started_at=sub.started_at,
        current_period_start=sub.current_period_start,
        current_period_end=sub.current_period_end, test_clock_id=sub.test_clock_id,
    )


def _sub_event(sub: Subscription, data, occurred_at: datetime) -> NewEvent:
    return NewEvent(data=data, tenant_id=sub.tenant_id, environment=sub.environment,
                    aggregate_type="subscription", aggregate_id=sub.id, occurred_at=occurred_at)


def renewal_events(renewals: Sequence[Renewal]) -> list[NewEvent]:
    """For each boundary, in order: `subscription.period_ended` (the subscription as it was)
    then `subscription.renewed` (in its new period), both at the boundary time."""
    events: list[NewEvent] = []
    for r in renewals:
        ended, renewed = r.ended, r.renewed
        events.append(_sub_event(ended, SubscriptionPeriodEnded(
            subscription=subscription_snapshot(ended),
            period_start=ended.current_period_start, period_end=ended.current_period_end,
            renews=True, next_period_start=renewed.current_period_start,
            next_period_end=renewed.current_period_end,
        ), r.boundary))
        events.append(_sub_event(renewed, SubscriptionRenewed(
            subscription=subscription_snapshot(renewed)), r.boundary))
    return events


async def _save_renewals(conn: asyncpg.Connection, renewals: Sequence[Renewal]) -> None:
    """Write each renewed subscription's final period (one update per subscription)."""
    final: dict[str, Subscription] = {}
    for r in renewals:
        final[r.renewed.id] = r.renewed
    for sub in final.values():
        await repo.update_subscription(conn, sub)


# ---------------------------------------------------------------- tenants and keys


def _new_key(tenant_id: str, environment: domain.Environment, kind: domain.KeyKind,
             now: datetime) -> tuple[ApiKey, str]:
    key, prefix = domain.compose_key(environment, kind, random_token(32))
    return ApiKey(new_id("key"), tenant_id, environment, kind, hash_key(key), prefix, now), key


def _key_created(k: ApiKey) -> NewEvent:
    return NewEvent(
        data=ApiKeyCreated(key_id=k.key_id, environment=k.environment, kind=k.kind,
                           key_hash=k.key_hash, key_prefix=k.key_prefix,
                           created_at=k.created_at),
        tenant_id=k.tenant_id, environment=k.environment, aggregate_type="api_key",
        aggregate_id=k.key_id, occurred_at=k.created_at,
    )


async def create_tenant(pool: asyncpg.Pool, store: EventStore,
                        name: str) -> tuple[Tenant, dict[str, dict[str, str]]]:
    """A tenant and its four first keys; returns the keys in clear (they are shown once)."""
    with rules():
        name = domain.check_name(name)
    now = wall_clock()
    tenant = Tenant(new_id("ten"), name, now)
    keys: list[ApiKey] = []
    clear: dict[str, dict[str, str]] = {}
    for env in ENVIRONMENTS:
        for kind in KINDS:
            record, key = _new_key(tenant.id, env, kind, now)
            keys.append(record)
            clear.setdefault(env, {})[f"{kind}_key"] = key
    events = [NewEvent(data=TenantCreated(tenant_id=tenant.id, name=tenant.name),
                       tenant_id=tenant.id, environment="live", aggregate_type="tenant",
                       aggregate_id=tenant.id, occurred_at=now)]
    events += [_key_created(k) for k in keys]
    async with pool.acquire() as conn, conn.transaction():
        await repo.insert_tenant(conn, tenant)
        await repo.insert_api_keys(conn, keys)
        await store.append(conn, events)
    return tenant, clear


async def get_tenant(pool: asyncpg.Pool, tenant_id: str) -> Tenant:
    tenant = await repo.get_tenant(pool, tenant_id)
    if tenant is None:
        raise NotFound("tenant", tenant_id)
    return tenant


async def create_api_key(pool: asyncpg.Pool, store: EventStore, tenant_id: str,
                         environment: domain.Environment,
                         kind: domain.KeyKind) -> tuple[ApiKey, str]:
    async with pool.acquire() as conn, conn.transaction():
        if await repo.get_tenant(conn, tenant_id) is None:
            raise NotFound("tenant", tenant_id)
        record, key = _new_key(tenant_id, environment, kind, wall_clock())
        await repo.insert_api_keys(conn, [record])
        await store.append(conn, [_key_created(record)])
    return record, key


async def revoke_api_key(pool: asyncpg.Pool, store: EventStore, key_id: str) -> ApiKey:
    """Revoke a key (idempotent: revoking a revoked key changes nothing and emits nothing)."""
    async with pool.acquire() as conn, conn.transaction():
        key = await repo.get_api_key(conn, key_id, for_update=True)
        if key is None:
            raise NotFound("api_key", key_id, param="key_id")
        if key.revoked_at is not None:
            return key
        now = wall_clock()
        await repo.revoke_api_key(conn, key_id, now)
        await store.append(conn, [NewEvent(
            data=ApiKeyRevoked(key_id=key_id, revoked_at=now), tenant_id=key.tenant_id,
            environment=key.environment, aggregate_type="api_key", aggregate_id=key_id,
            occurred_at=now,
        )])
    return ApiKey(key.key_id, key.tenant_id, key.environment, key.kind, key.key_hash,
                  key.key_prefix, key.created_at, now)


# ---------------------------------------------------------------- test clocks


async def create_test_clock(pool: asyncpg.Pool, store: EventStore, auth: AuthContext,
                            body: CreateTestClock) -> TestClock:
    with rules():
        domain.require_test_mode(auth.environment)
    clock = TestClock(new_id("clk"), auth.tenant_id, auth.environment, body.name,
                      domain.utc(body.frozen_time), "ready", wall_clock())
    async with pool.acquire() as conn, conn.transaction():
        await repo.insert_clock(conn, clock)
        await store.append(conn, [NewEvent(
            data=TestClockCreated(test_clock_id=clock.id, name=clock.name,
                                  frozen_time=clock.frozen_time),
            tenant_id=clock.tenant_id, environment=clock.environment,
            aggregate_type="test_clock", aggregate_id=clock.id, occurred_at=clock.frozen_time,
        )])
    return clock


async def get_test_clock(pool: asyncpg.Pool, auth: AuthContext, clock_id: str) -> TestClock:
    with rules():
        domain.require_test_mode(auth.environment)
    clock = await repo.get_clock(pool, auth.tenant_id, auth.environment, clock_id)
    if clock is None:
        raise NotFound("test_clock", clock_id)
    return clock


async def list_test_clocks(pool: asyncpg.Pool, auth: AuthContext, limit: int,
                           starting_after: str | None) -> list[TestClock]:
    with rules():
        domain.require_test_mode(auth.environment)
    return await repo.list_clocks(pool, auth.tenant_id, auth.environment, limit, starting_after)


async def advance_test_clock(pool: asyncpg.Pool, store: EventStore, auth: AuthContext, clock_id: str,
                             frozen_time: datetime) -> TestClock:
    """Move the clock and renew, in time order, every period of its customers'
    subscriptions the jump crosses, all in one transaction with the events: the clock row
    lock serializes concurrent advances, and a retried advance finds the clock already moved
    (400), so no period can be renewed twice."""
    with rules():
        domain.require_test_mode(auth.environment)
    async with pool.acquire() as conn, conn.transaction():
        clock = await repo.get_clock(conn, auth.tenant_id, auth.environment, clock_id,
                                     for_update=True)
        if clock is None:
            raise NotFound("test_clock", clock_id)
        with rules():
            moved = clock.advanced_to(frozen_time)
        await repo.update_clock_time(conn, moved)
        due = await repo.due_on_clock(conn, clock.id, moved.frozen_time)
        with rules():
            renewals = domain.plan_clock_advance(due, moved.frozen_time)
        await _save_renewals(conn, renewals)
        events = renewal_events(renewals)
        events.append(NewEvent(
            data=TestClockAdvanced(test_clock_id=clock.id, previous_time=clock.frozen_time,
                                   frozen_time=moved.frozen_time),
            tenant_id=clock.tenant_id, environment=clock.environment,
            aggregate_type="test_clock", aggregate_id=clock.id, occurred_at=moved.frozen_time,
        ))
        await store.append(conn, events)
    log.info("test_clock_advanced", test_clock_id=clock.id, renewals=len(renewals))
    return moved


# ---------------------------------------------------------------- customers


async def create_customer(pool: asyncpg.Pool, store: EventStore, auth: AuthContext,
                          body: CreateCustomer) -> Customer:
    with rules():
        currency = domain.check_currency_param(body.currency) if body.currency else None
        email = domain.check_email(body.email)
        if body.test_clock is not None:
            domain.require_test_mode(auth.environment, "Test clocks", param="test_clock")
    async with pool.acquire() as conn, conn.transaction():
        created = wall_clock()
        if body.test_clock is not None:
            clock = await repo.get_clock(conn, auth.tenant_id, auth.environment, body.test_clock)
            if clock is None:
                raise NotFound("test_clock", body.test_clock, param="test_clock")
            created = clock.frozen_time  # objects on a test clock live in its time
        customer = Customer(
            id=new_id("cus"), tenant_id=auth.tenant_id, environment=auth.environment,
            external_id=body.external_id, name=body.name, email=email, currency=currency,
            test_clock_id=body.test_clock, metadata=body.metadata or {}, created_at=created,
        )
        if not await repo.insert_customer(conn, customer):
            raise Conflict("resource_already_exists",
                           f"A customer with external_id '{body.external_id}' already exists",
                           param="external_id")
        await store.append(conn, [NewEvent(
            data=CustomerCreated(customer_id=customer.id, external_id=customer.external_id,
                                 name=customer.name, email=customer.email,
                                 currency=customer.currency,
                                 test_clock_id=customer.test_clock_id, created_at=created),
            tenant_id=customer.tenant_id, environment=customer.environment,
            aggregate_type="customer", aggregate_id=customer.id, occurred_at=created,
        )])
    return customer


async def get_customer(pool: asyncpg.Pool, auth: AuthContext, ident: str,
                       param: str | None = None) -> Customer:
    customer = await repo.get_customer(pool, auth.tenant_id, auth.environment, ident)
    if customer is None:
        raise NotFound("customer", ident, param=param)
    return customer


# ---------------------------------------------------------------- meters


async def create_meter(pool: asyncpg.Pool, store: EventStore, auth: AuthContext,
                       body: CreateMeter) -> Meter:
    with rules():
        code = domain.check_code(body.code)
    meter = Meter(new_id("mtr"), auth.tenant_id, auth.environment, code, body.name,
                  body.aggregation, body.field, wall_clock())
    async with pool.acquire() as conn, conn.transaction():
        if not await repo.insert_meter(conn, meter):
            raise Conflict("resource_already_exists",
                           f"A meter with code '{code}' already exists", param="code")
        await store.append(conn, [NewEvent(
            data=MeterCreated(meter_id=meter.id, code=meter.code, name=meter.name,
                              aggregation=meter.aggregation, field=meter.field,
                              created_at=meter.created_at),
            tenant_id=meter.tenant_id, environment=meter.environment, aggregate_type="meter",
            aggregate_id=meter.id, occurred_at=meter.created_at,
        )])
    return meter


async def get_meter(pool: asyncpg.Pool, auth: AuthContext, ident: str) -> Meter:
    meter = await repo.get_meter(pool, auth.tenant_id, auth.environment, ident)
    if meter is None:
        raise NotFound("meter", ident)
    return meter


# ---------------------------------------------------------------- plans


async def create_plan(pool: asyncpg.Pool, store: EventStore, auth: AuthContext,
                      body: CreatePlan) -> Plan:
    with rules():
        code = domain.check_code(body.code)
        currency = domain.check_currency_param(body.currency)
        interval_count = domain.check_interval_count(body.interval_count)
        charges = [
            domain.build_charge(ChargeSpec(c.type, c.timing, c.amount, c.meter, c.model,
                                           c.unit_price), i, currency, new_id("chg"))
            for i, c in enumerate(body.charges)
        ]
    async with pool.acquire() as conn, conn.transaction():
        resolved = []
        for i, charge in enumerate(charges):
            if charge.type == "usage":
                assert charge.meter is not None
                meter = await repo.get_meter(conn, auth.tenant_id, auth.environment,
                                             charge.meter)
                if meter is None:
                    raise NotFound("meter", charge.meter, param=f"charges[{i}].meter")
                charge = domain.Charge(charge.charge_id, charge.type, charge.timing,
                                       meter=meter.code, model=charge.model,
                                       unit_price=charge.unit_price)
            resolved.append(charge)
        plan = Plan(new_id("plan"), auth.tenant_id, auth.environment, code, body.name.strip(),
                    currency, body.interval, interval_count, tuple(resolved), wall_clock())
        if not await repo.insert_plan(conn, plan):
            raise Conflict("resource_already_exists",
                           f"A plan with code '{code}' already exists", param="code")
        await store.append(conn, [NewEvent(
            data=PlanCreated(plan=plan_snapshot(plan), created_at=plan.created_at),
            tenant_id=plan.tenant_id, environment=plan.environment, aggregate_type="plan",
            aggregate_id=plan.id, occurred_at=plan.created_at,
        )])
    return plan


async def get_plan(pool: asyncpg.Pool, auth: AuthContext, ident: str) -> Plan:
    plan = await repo.get_plan(pool, auth.tenant_id, auth.environment, ident)
    if plan is None:
        raise NotFound("plan", ident)
    return plan


# ---------------------------------------------------------------- subscriptions


async def create_subscription(pool: asyncpg.Pool, store: EventStore, auth: AuthContext,
                              body: CreateSubscription) -> Subscription:
    """Start a subscription now: the customer's test clock time if it has one, else the
    wall clock."""
    async with pool.acquire() as conn, conn.transaction():
        customer = await repo.get_customer(conn, auth.tenant_id, auth.environment,
                                           body.customer)
        if customer is None:
            raise NotFound("customer", body.customer, param="customer")
        plan = await repo.get_plan(conn, auth.tenant_id, auth.environment, body.plan)
        if plan is None:
            raise NotFound("plan", body.plan, param="plan")
        now = wall_clock()
        if customer.test_clock_id is not None:
            # share-locked so that a concurrent advance cannot slip between reading the
            # clock's time and the new subscription becoming visible to the advance
            now = await repo.clock_time_for_share(conn, customer.test_clock_id)
        with rules():
            sub = Subscription.start(subscription_id=new_id("sub"), customer=customer,
                                     plan=plan, now=now)
        await repo.insert_subscription(conn, sub)
        await store.append(conn, [_sub_event(
            sub, SubscriptionCreated(subscription=subscription_snapshot(sub)), sub.started_at)])
    return sub


async def get_subscription(pool: asyncpg.Pool, auth: AuthContext, subscription_id: str) -> Subscription:
    sub = await repo.get_subscription(pool, auth.tenant_id, auth.environment, subscription_id)
    if sub is None:
        raise NotFound("subscription", subscription_id)
    return sub


async def list_subscriptions(pool: asyncpg.Pool, auth: AuthContext, limit: int,
                             starting_after: str | None,
                             customer: str | None) -> list[Subscription]:
    customer_id = None
    if customer is not None:
        found = await repo.get_customer(pool, auth.tenant_id, auth.environment, customer)
        if found is None:
            return []
        customer_id = found.id
    return await repo.list_subscriptions(pool, auth.tenant_id, auth.environment, limit,
                                         starting_after, customer_id)


async def renew_due(pool: asyncpg.Pool, store: EventStore, now: datetime, batch_size: int) -> int:
    """One small transaction of the wall-clock renewal task: lock up to `batch_size` due
    subscriptions without a test clock (skipping rows another replica holds), renew each
    period by period with the same domain code as a clock advance, append the events.
    Returns how many subscriptions it renewed."""
    async with pool.acquire() as conn, conn.transaction():
        due = await repo.due_on_wall_clock(conn, now, batch_size)
        if not due:
            return 0
        plans = [domain.plan_renewals(s, now, limit=domain.MAX_RENEWALS_PER_ADVANCE)
                 for s in due]  # an incomplete plan is finished by the next transaction
        renewals = domain.renewals_in_order(plans)
        await _save_renewals(conn, renewals)
        await store.append(conn, renewal_events(renewals))
    log.info("subscriptions_renewed", subscriptions=len(due), periods=len(renewals))
    return len(due)


# ---------------------------------------------------------------- payment outcomes


async def mark_past_due(conn: asyncpg.Connection, store: EventStore, *, tenant_id: str,
                        environment: str, subscription_id: str, invoice_id: str,
                        occurred_at: datetime, cause: Cause | None) -> bool:
    """An invoice payment failed: an active subscription becomes past due."""
    sub = await repo.get_subscription(conn, tenant_id, environment, subscription_id,
                                      for_update=True)
    changed = sub.marked_past_due() if sub else None
    if changed is None:
        return False
    await repo.update_subscription(conn, changed)
    await store.append(conn, [_sub_event(changed, SubscriptionPastDue(
        subscription=subscription_snapshot(changed), invoice_id=invoice_id), occurred_at)],
        cause=cause)
    return True


async def reactivate(conn: asyncpg.Connection, store: EventStore, *, tenant_id: str,
                     environment: str, subscription_id: str, invoice_id: str,
                     occurred_at: datetime, cause: Cause | None) -> bool:
    """An invoice was paid: a past-due subscription is active again."""
    sub = await repo.get_subscription(conn, tenant_id, environment, subscription_id,
                                      for_update=True)
    changed = sub.reactivated() if sub else None
    if changed is None:
        return False
    await repo.update_subscription(conn, changed)
    await store.append(conn, [_sub_event(changed, SubscriptionReactivated(
        subscription=subscription_snapshot(changed), invoice_id=invoice_id), occurred_at)],
        cause=cause)
    return True
