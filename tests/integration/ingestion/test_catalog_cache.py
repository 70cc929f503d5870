"""Ingestion's workers remember customers and meters (catalog.py) against the real read models:
a second request asks PostgreSQL only for the scope's version, and what the catalog consumer
changes (a customer created, a clock advanced, a meter created) is seen by the next request."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from billstream_ingestion import repository
from billstream_ingestion.bootstrap import build
from billstream_testing.fixtures import unique
from ingestion_harness import Ingestion, ingestion_settings

pytestmark = pytest.mark.integration


def ev(key, customer, meter="api_calls", **extra):
    return {"idempotency_key": key, "customer": customer, "meter": meter, **extra}


class Lookups:
    """Counts the read-model lookups made for this test's tenant."""

    def __init__(self, monkeypatch, tenant_id: str) -> None:
        self.customers: list[list[str]] = []
        self.meters: list[set[str]] = []
        real_customers, real_meters = repository.known_customers, repository.known_meters

        async def known_customers(conn, tenant, environment, refs):
            refs = list(refs)
            if tenant == tenant_id:
                self.customers.append(sorted(refs))
            return await real_customers(conn, tenant, environment, refs)

        async def known_meters(conn, tenant, environment, codes):
            if tenant == tenant_id:
                self.meters.append(set(codes))
            return await real_meters(conn, tenant, environment, codes)

        monkeypatch.setattr(repository, "known_customers", known_customers)
        monkeypatch.setattr(repository, "known_meters", known_meters)


async def _customer_ids(ingestion: Ingestion) -> dict[str, str | None]:
    return {e["data"]["idempotency_key"]: e["data"]["customer_id"]
            for e in await ingestion.accepted_events()}


async def test_a_second_request_reads_only_what_it_has_not_seen(ingestion: Ingestion,
                                                                monkeypatch):
    await ingestion.create_meter("api_calls")
    acme = await ingestion.create_customer("acme")
    lookups = Lookups(monkeypatch, ingestion.tenant_id)
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", json={"events": [
            ev("r1", "acme"), ev("r2", "nobody-yet")]})
        assert r.json()["accepted"] == 2
        r = await c.post("/v1/usage/events", json={"events": [
            ev("r3", "acme"), ev("r4", "nobody-yet"), ev("r5", "someone-else")]})
        assert r.json()["accepted"] == 3
    assert lookups.customers == [["acme", "nobody-yet"], ["someone-else"]]
    assert lookups.meters == [{"api_calls"}]
    ids = await _customer_ids(ingestion)
    assert (ids["r1"], ids["r3"]) == (acme, acme)
    assert ids["r2"] is None and ids["r4"] is None


async def test_usage_for_a_customer_created_later_is_attributed_from_then_on(
        ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    async with ingestion.client() as c:
        r = await c.post("/v1/usage/events", json=ev("l1", "late"))
        assert r.json()["accepted"] == 1
        customer_id = await ingestion.create_customer("late")
        r = await c.post("/v1/usage/events", json=ev("l2", "late"))
        assert r.json()["accepted"] == 1
    ids = await _customer_ids(ingestion)
    assert ids["l1"] is None  # metering attributes it once the customer is known
    assert ids["l2"] == customer_id


async def test_a_clock_advance_and_a_new_meter_are_seen_by_the_next_request(
        ingestion: Ingestion):
    await ingestion.create_meter("api_calls")
    frozen = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
    clock = await ingestion.create_clock(frozen)
    await ingestion.create_customer("clocked", test_clock_id=clock)
    async with ingestion.client() as c:
        assert (await c.post("/v1/usage/events", json=ev("c1", "clocked"))).json()[
            "accepted"] == 1
        await ingestion.advance_clock(clock, frozen, frozen + timedelta(days=3))
        assert (await c.post("/v1/usage/events", json=ev("c2", "clocked"))).json()[
            "accepted"] == 1
        await ingestion.create_meter("storage")
        assert (await c.post("/v1/usage/events", json=ev("c3", "clocked", "storage"))).json()[
            "accepted"] == 1
    ts = {e["data"]["idempotency_key"]: e["data"]["timestamp"]
          for e in await ingestion.accepted_events()}
    assert ts == {"c1": "2026-01-15T12:00:00Z", "c2": "2026-01-18T12:00:00Z",
                  "c3": "2026-01-18T12:00:00Z"}


async def test_the_catalog_version_moves_with_every_catalog_change(ingestion: Ingestion):
    async def version():
        return await repository.catalog_version(ingestion.host.pool, ingestion.tenant_id,
                                                "test")

    seen = [await version()]
    await ingestion.create_meter("api_calls")
    seen.append(await version())
    clock = await ingestion.create_clock(datetime(2026, 1, 1, tzinfo=UTC))
    seen.append(await version())
    await ingestion.create_customer("x", test_clock_id=clock)
    seen.append(await version())
    await ingestion.advance_clock(clock, datetime(2026, 1, 1, tzinfo=UTC),
                                  datetime(2026, 1, 2, tzinfo=UTC))
    seen.append(await version())
    assert seen[0] is None
    assert all(a < b for a, b in zip(seen[1:], seen[2:])), seen


async def test_with_the_cache_off_every_request_asks(fresh_database, kafka_bootstrap,
                                                     monkeypatch):
    host = build(ingestion_settings(fresh_database, kafka_bootstrap,
                                    catalog_cache_entries="0"))
    await host.start(serve_http=False)
    try:
        svc = Ingestion(host, kafka_bootstrap, unique("ten"), "")
        svc.key = await svc.add_key()
        await svc.create_meter("api_calls")
        lookups = Lookups(monkeypatch, svc.tenant_id)
        async with svc.client() as c:
            for i in range(2):
                r = await c.post("/v1/usage/events", json=ev(f"o{i}", "acme"))
                assert r.json()["accepted"] == 1
        assert lookups.customers == [["acme"], ["acme"]]
    finally:
        await host.stop()


async def test_nothing_is_kept_while_the_catalog_is_rebuilt(ingestion: Ingestion, monkeypatch):
    """`rebuild catalog` empties the read models and the versions: requests then read the
    (empty) read models, as a worker started afresh would, until the replay refills them."""
    from billstream_ingestion.handlers import CATALOG_READ_MODEL
    from billstream_messaging.replay import rebuild

    await ingestion.create_meter("api_calls")
    await ingestion.create_customer("acme")
    lookups = Lookups(monkeypatch, ingestion.tenant_id)
    async with ingestion.client() as c:
        assert (await c.post("/v1/usage/events", json=ev("b1", "acme"))).json()[
            "accepted"] == 1
        await rebuild(ingestion.host.pool, "ingestion.catalog.rebuilt-by-test",
                      [t for t in CATALOG_READ_MODEL if t != "api_keys"])
        r = await c.post("/v1/usage/events", json=ev("b2", "acme"))
    # kept, the meter would have been known: the read model it came from is empty now
    assert r.json()["results"][0]["code"] == "unknown_meter"
    assert lookups.meters[0] == {"api_calls"} and len(lookups.meters) > 1


async def test_scopes_with_a_catalog_before_the_upgrade_get_a_version(fresh_database: str,
                                                                     tmp_path):
    """Migration 0005 gives every scope that already has customers, meters or clocks a
    version, so that its workers keep what they read from the first request on."""
    from billstream_ingestion.bootstrap import MIGRATIONS
    from billstream_messaging.host import MESSAGING_MIGRATIONS, RUNTIME_MIGRATIONS
    from billstream_runtime import db
    from billstream_testing.fixtures import migrations_before

    before = migrations_before(MIGRATIONS, "0005", tmp_path)
    pool = await db.create_pool(fresh_database, min_size=1, max_size=2)
    try:
        await db.migrate(pool, RUNTIME_MIGRATIONS, MESSAGING_MIGRATIONS, before)
        await pool.execute("INSERT INTO customers VALUES ('ten_a', 'live', 'cus_1', 'a', NULL)")
        await pool.execute("INSERT INTO meters VALUES ('ten_b', 'test', 'api_calls', 'mtr_1')")
        await pool.execute("INSERT INTO meters VALUES ('ten_a', 'live', 'api_calls', 'mtr_2')")
        applied = await db.migrate(pool, RUNTIME_MIGRATIONS, MESSAGING_MIGRATIONS, MIGRATIONS)
        assert [a for a in applied if "catalog" in a] == [
            "billstream_ingestion/0005_catalog_versions.sql"]
        rows = await pool.fetch("SELECT * FROM catalog_versions ORDER BY tenant_id")
        assert [(r["tenant_id"], r["environment"]) for r in rows] == [
            ("ten_a", "live"), ("ten_b", "test")]
        assert rows[0]["version"] != rows[1]["version"]
    finally:
        await pool.close()
