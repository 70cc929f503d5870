"""Metering under test: its real `build()` against PostgreSQL and the broker, a tenant of its
own, and the events it consumes published straight onto their topics."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import pytest

from billstream_contracts.events import (
    ApiKeyCreated,
    Charge,
    CustomerCreated,
    MeterCreated,
    PlanSnapshot,
    SubscriptionPeriodEnded,
    UsagePeriodClosed,
    SubscriptionSnapshot,
    UsageAccepted,
    UsageAmended,
    UsageVoided,
)
from billstream_contracts import Envelope
from billstream_contracts.topics import SUBSCRIPTION_EVENTS, USAGE_ACCEPTED
from billstream_messaging import ServiceHost
from billstream_metering.bootstrap import build
from billstream_metering.settings import MeteringSettings
from billstream_runtime.auth import hash_key
from billstream_runtime.ids import new_id
from billstream_runtime.settings import load_settings
from billstream_testing.events import envelope, publish
from billstream_testing.fixtures import service_env, unique
from billstream_testing.waiting import eventually


def usage(customer: str, meter: str, quantity: str, ts: datetime, *,
          customer_id: str | None = None, properties: dict | None = None,
          usage_id: str | None = None) -> UsageAccepted:
    return UsageAccepted(
        usage_id=usage_id or new_id("use"), idempotency_key=unique("k"), customer=customer,
        customer_id=customer_id, meter=meter, quantity=quantity, timestamp=ts,
        properties=properties or {})


def void(original: UsageAccepted, reason: str | None = None) -> UsageVoided:
    """Ingestion's `usage.voided` of `original`."""
    return UsageVoided(correction_id=new_id("ucor"), usage_id=original.usage_id,
                       idempotency_key=original.idempotency_key, reason=reason)


def amend(original: UsageAccepted, quantity: str, properties: dict | None = None,
          reason: str | None = None) -> UsageAmended:
    """Ingestion's `usage.amended` of `original`: its new quantity and properties in full."""
    return UsageAmended(correction_id=new_id("ucor"), usage_id=original.usage_id,
                        idempotency_key=original.idempotency_key, quantity=quantity,
                        properties=properties or {}, reason=reason)


def plan(*meters: str) -> PlanSnapshot:
    charges = [Charge(charge_id="ch_base", type="fixed", timing="in_advance", amount="10.00")]
    charges += [Charge(charge_id=f"ch_{m}", type="usage", timing="in_arrears", meter=m,
                       model="per_unit", unit_price="0.01") for m in meters]
    return PlanSnapshot(plan_id=new_id("plan"), code=unique("plan"), name="Plan",
                        currency="USD", interval="month", charges=charges)


def period_ended(customer_id: str, external_id: str | None, plan: PlanSnapshot,
                 start: datetime, end: datetime, *, subscription_id: str,
                 started_at: datetime | None = None) -> SubscriptionPeriodEnded:
    sub = SubscriptionSnapshot(
        subscription_id=subscription_id, customer_id=customer_id,
        customer_external_id=external_id, plan=plan, status="active",
        started_at=started_at or start, current_period_start=start, current_period_end=end)
    return SubscriptionPeriodEnded(subscription=sub, period_start=start, period_end=end,
                                   renews=True, next_period_start=end,
                                   next_period_end=end + (end - start))


def closed(period: SubscriptionPeriodEnded) -> UsagePeriodClosed:
    """What ingestion appends to its log when it sees `period`."""
    return UsagePeriodClosed(**period.model_dump())


@dataclass
class Metering:
    host: ServiceHost
    bootstrap: str
    tenant_id: str
    key: str
    # This test's stand-in for ingestion's log: its own source name and gapless sequence.
    source: str = field(default_factory=lambda: unique("ingestion"))
    sequence: itertools.count = field(default_factory=lambda: itertools.count(1))

    def client(self, key: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.host.app, raise_app_exceptions=False),
            base_url="http://metering", headers={"Authorization": f"Bearer {key or self.key}"},
            timeout=60,
        )

    async def get_usage(self, **params) -> httpx.Response:
        if "from_" in params:
            params["from"] = params.pop("from_")
        async with self.client() as c:
            return await c.get("/v1/usage", params=params)

    async def publish_catalog(self, *datas, aggregate_id: str | None = None) -> None:
        await publish(self.bootstrap, SUBSCRIPTION_EVENTS, *[
            envelope(d, tenant_id=self.tenant_id, aggregate_id=aggregate_id) for d in datas])

    async def publish_usage(self, *datas: UsageAccepted) -> None:
        await publish(self.bootstrap, USAGE_ACCEPTED, *[
            envelope(d, tenant_id=self.tenant_id, source=self.source, aggregate_type="customer",
                     aggregate_id=d.customer_id or d.customer, occurred_at=d.timestamp,
                     sequence=next(self.sequence))
            for d in datas])

    async def publish_close(self, period: SubscriptionPeriodEnded) -> Envelope:
        """Ingestion's `usage.period_closed` for `period`, next in this log; returned so that
        a test can redeliver the very same event."""
        env = envelope(closed(period), tenant_id=self.tenant_id, source=self.source,
                       aggregate_type="customer",
                       aggregate_id=period.subscription.customer_id,
                       occurred_at=period.period_end, sequence=next(self.sequence))
        await publish(self.bootstrap, USAGE_ACCEPTED, env)
        return env

    async def redeliver(self, env: Envelope) -> None:
        await publish(self.bootstrap, USAGE_ACCEPTED, env)

    def log_envelope(self, data: UsageAccepted | UsageVoided | UsageAmended,
                     original: UsageAccepted | None = None) -> Envelope:
        """`data` next in this log, keyed like its usage event (`original` for a correction),
        as `publish_usage` does; not published (see `publish_log`)."""
        about = original or data
        assert isinstance(about, UsageAccepted)
        return envelope(data, tenant_id=self.tenant_id, source=self.source,
                        aggregate_type="customer",
                        aggregate_id=about.customer_id or about.customer,
                        occurred_at=data.timestamp if original is None else None,
                        sequence=next(self.sequence))

    async def publish_log(self, *envs: Envelope) -> None:
        """Publish envelopes of this log as they are (in this order)."""
        await publish(self.bootstrap, USAGE_ACCEPTED, *envs)

    async def publish_corrections(self, original: UsageAccepted,
                                  *datas: UsageVoided | UsageAmended) -> list[Envelope]:
        """Corrections of `original`, next in this log; returned for redelivery."""
        envs = [self.log_envelope(d, original) for d in datas]
        await self.publish_log(*envs)
        return envs

    async def corrections(self, usage_id: str) -> list[dict]:
        """The correction history of one usage event, in log order."""
        rows = await self.host.pool.fetch(
            "SELECT * FROM usage_corrections WHERE usage_id = $1 ORDER BY sequence", usage_id)
        return [dict(r) for r in rows]

    async def wait_for_corrections(self, n: int, status: str | None = None) -> None:
        """Until `n` corrections of this tenant are decided (any status but pending), or have
        `status`."""
        async def probe():
            return await self.host.pool.fetchval(
                "SELECT count(*) FROM usage_corrections WHERE tenant_id = $1"
                " AND CASE WHEN $2::text IS NULL THEN status <> 'pending' ELSE status = $2 END",
                self.tenant_id, status) == n
        await eventually(probe, message=f"{n} corrections {status or 'decided'}")

    async def usage_row(self, usage_id: str) -> dict:
        return dict(await self.host.pool.fetchrow(
            "SELECT * FROM usage_records WHERE usage_id = $1", usage_id))

    async def add_key(self, kind: str = "secret") -> str:
        prefix = {"secret": "sk", "publishable": "pk"}[kind]
        key = f"{prefix}_test_{unique('k').replace('-', '')}"
        key_id = new_id("key")
        await self.publish_catalog(ApiKeyCreated(
            key_id=key_id, environment="test", kind=kind, key_hash=hash_key(key),
            key_prefix=key[:12], created_at=datetime.now(UTC)))
        await self.wait_for("SELECT 1 FROM api_keys WHERE key_id = $1", key_id)
        return key

    async def create_meter(self, code: str, aggregation: str = "sum",
                           field: str | None = None, wait: bool = True) -> None:
        await self.publish_catalog(MeterCreated(
            meter_id=new_id("mtr"), code=code, aggregation=aggregation, field=field,
            created_at=datetime.now(UTC)))
        if wait:
            await self.wait_for("SELECT 1 FROM meters WHERE tenant_id = $1 AND code = $2",
                                self.tenant_id, code)

    async def create_customer(self, external_id: str | None) -> str:
        customer_id = new_id("cus")
        await self.publish_catalog(CustomerCreated(customer_id=customer_id,
                                                   external_id=external_id,
                                                   created_at=datetime.now(UTC)))
        await self.wait_for("SELECT 1 FROM customers WHERE customer_id = $1", customer_id)
        return customer_id

    async def wait_for(self, sql: str, *args) -> None:
        await eventually(lambda: self.host.pool.fetchval(sql, *args), message=sql)

    async def wait_for_usage_rows(self, n: int) -> None:
        async def probe():
            return await self.host.pool.fetchval(
                "SELECT count(*) FROM usage_records WHERE tenant_id = $1", self.tenant_id) == n
        await eventually(probe, message=f"{n} usage rows")

    async def summaries(self, n: int) -> list[dict]:
        async def probe():
            rows = await self.host.pool.fetch(
                "SELECT * FROM event_log WHERE tenant_id = $1 AND type = $2 ORDER BY seq",
                self.tenant_id, "usage.period_summarized")
            return [dict(r) for r in rows] if len(rows) >= n else None
        return await eventually(probe, message=f"{n} usage.period_summarized")


def metering_settings(dsn: str, bootstrap: str, group_prefix: str | None = None,
                      **extra: str) -> MeteringSettings:
    env = service_env("metering", dsn, bootstrap, **{
        "projection_wait_s": "0.3", "consumer_group_prefix": group_prefix or unique("g"), **extra})
    return load_settings("metering", MeteringSettings, environ=env)


@pytest.fixture
async def metering(fresh_database, kafka_bootstrap):
    host = build(metering_settings(fresh_database, kafka_bootstrap))
    await host.start(serve_http=False)
    try:
        svc = Metering(host, kafka_bootstrap, unique("ten"), "")
        svc.key = await svc.add_key()
        yield svc
    finally:
        await host.stop()
