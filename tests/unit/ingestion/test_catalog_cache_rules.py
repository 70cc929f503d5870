"""catalog.CatalogCache against a fake read model: what is remembered, when it is forgotten,
and that nothing is served across a version change."""

from __future__ import annotations

import pytest

from billstream_ingestion import catalog as catalog_module
from billstream_ingestion import repository
from billstream_ingestion.catalog import CatalogCache, CatalogView
from billstream_ingestion.repository import KnownCustomer
from billstream_ingestion.service import Scope

SCOPE = Scope("ten_a", "test")
OTHER = Scope("ten_b", "test")


class FakeReadModel:
    """The read models of several scopes, with their catalog versions; counts the lookups."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, str], int | None] = {}
        self.customers: dict[tuple[str, str], dict[str, KnownCustomer]] = {}
        self.meters: dict[tuple[str, str], set[str]] = {}
        self.customer_lookups: list[list[str]] = []
        self.meter_lookups: list[set[str]] = []

    def add_customer(self, scope: Scope, ref: str, customer_id: str) -> None:
        key = (scope.tenant_id, scope.environment)
        self.customers.setdefault(key, {})[ref] = KnownCustomer(customer_id, ref, None)
        self.versions[key] = (self.versions.get(key) or 0) + 1

    async def catalog_version(self, conn, tenant_id, environment):
        return self.versions.get((tenant_id, environment))

    async def known_customers(self, conn, tenant_id, environment, refs):
        refs = list(refs)
        self.customer_lookups.append(sorted(refs))
        known = self.customers.get((tenant_id, environment), {})
        return {ref: known[ref] for ref in refs if ref in known}

    async def known_meters(self, conn, tenant_id, environment, codes):
        self.meter_lookups.append(set(codes))
        return set(codes) & self.meters.get((tenant_id, environment), set())


@pytest.fixture
def model(monkeypatch) -> FakeReadModel:
    fake = FakeReadModel()
    monkeypatch.setattr(repository, "catalog_version", fake.catalog_version)
    monkeypatch.setattr(repository, "known_customers", fake.known_customers)
    monkeypatch.setattr(repository, "known_meters", fake.known_meters)
    return fake


async def test_customers_found_and_not_found_are_remembered_at_their_version(model):
    model.add_customer(SCOPE, "acme", "cus_1")
    cache = CatalogCache()
    view = await cache.view(None, SCOPE)
    assert await view.known_customers(None, {"acme", "nobody"}) == {
        "acme": KnownCustomer("cus_1", "acme", None)}
    view = await cache.view(None, SCOPE)
    assert await view.known_customers(None, {"acme", "nobody"}) == {
        "acme": KnownCustomer("cus_1", "acme", None)}
    assert await view.known_customers(None, {"acme", "new-one"}) == {
        "acme": KnownCustomer("cus_1", "acme", None)}
    # the first request asked for both, the third only for the one never seen
    assert model.customer_lookups == [["acme", "nobody"], ["new-one"]]
    assert len(cache) == 3


async def test_a_new_version_forgets_what_was_remembered(model):
    model.add_customer(SCOPE, "acme", "cus_1")
    cache = CatalogCache()
    view = await cache.view(None, SCOPE)
    assert await view.known_customers(None, {"late"}) == {}
    model.add_customer(SCOPE, "late", "cus_2")  # moves the version
    view = await cache.view(None, SCOPE)
    assert await view.known_customers(None, {"late"}) == {
        "late": KnownCustomer("cus_2", "late", None)}
    assert model.customer_lookups == [["late"], ["late"]]
    assert len(cache) == 1


async def test_a_scope_without_a_version_is_never_remembered(model):
    """A rebuild empties catalog_versions with the read models: until the catalog is replayed
    and moves the version again, every request asks."""
    model.customers[("ten_a", "test")] = {"acme": KnownCustomer("cus_1", "acme", None)}
    cache = CatalogCache()
    for _ in range(2):
        view = await cache.view(None, SCOPE)
        assert await view.known_customers(None, {"acme"}) == {
            "acme": KnownCustomer("cus_1", "acme", None)}
    assert model.customer_lookups == [["acme"], ["acme"]]
    assert len(cache) == 0


async def test_meters_found_are_remembered_and_unknown_ones_asked_again(model):
    model.versions[("ten_a", "test")] = 1
    model.meters[("ten_a", "test")] = {"api_calls"}
    cache = CatalogCache()
    for _ in range(2):
        view = await cache.view(None, SCOPE)
        assert await view.known_meters(None, {"api_calls", "typo"}) == {"api_calls"}
    assert model.meter_lookups == [{"api_calls", "typo"}, {"typo"}]


async def test_scopes_are_remembered_apart(model):
    model.add_customer(SCOPE, "acme", "cus_1")
    model.add_customer(OTHER, "acme", "cus_9")
    cache = CatalogCache()
    a = await (await cache.view(None, SCOPE)).known_customers(None, {"acme"})
    b = await (await cache.view(None, OTHER)).known_customers(None, {"acme"})
    assert (a["acme"].customer_id, b["acme"].customer_id) == ("cus_1", "cus_9")
    b = await (await cache.view(None, OTHER)).known_customers(None, {"acme"})
    assert b["acme"].customer_id == "cus_9"


async def test_when_full_the_largest_scopes_are_forgotten_and_the_limit_holds(model):
    model.add_customer(SCOPE, "acme", "cus_1")
    model.add_customer(OTHER, "x", "cus_9")
    cache = CatalogCache(max_entries=3)
    await (await cache.view(None, OTHER)).known_customers(None, {"x", "y"})
    assert len(cache) == 2
    view = await cache.view(None, SCOPE)
    assert await view.known_customers(None, {"acme", "b"}) == {
        "acme": KnownCustomer("cus_1", "acme", None)}
    assert len(cache) == 2  # OTHER, the larger, was forgotten to make room
    await (await cache.view(None, OTHER)).known_customers(None, {"x"})
    assert model.customer_lookups[-1] == ["x"]
    # more than the limit in one request: answered, not remembered
    answer = await (await cache.view(None, SCOPE)).known_customers(None, {"1", "2", "3", "4"})
    assert answer == {} and len(cache) <= 3


async def test_a_view_overtaken_by_a_newer_version_does_not_remember(model):
    """Two requests of one scope: the second reads a newer version before the first has
    asked for its misses. The first's answers, made at the older version, are not kept."""
    model.add_customer(SCOPE, "acme", "cus_1")
    cache = CatalogCache()
    first = await cache.view(None, SCOPE)
    model.add_customer(SCOPE, "late", "cus_2")
    second = await cache.view(None, SCOPE)
    await first.known_customers(None, {"late", "other"})
    assert len(cache) == 0
    assert await second.known_customers(None, {"late"}) == {
        "late": KnownCustomer("cus_2", "late", None)}
    assert len(cache) == 1


async def test_uncached_view_always_asks(model):
    model.add_customer(SCOPE, "acme", "cus_1")
    view = CatalogView.uncached(SCOPE)
    for _ in range(2):
        assert await view.known_customers(None, {"acme"}) == {
            "acme": KnownCustomer("cus_1", "acme", None)}
    assert model.customer_lookups == [["acme"], ["acme"]]
    assert catalog_module.DEFAULT_MAX_ENTRIES >= 10_000


async def test_a_tenant_naming_ever_new_customers_forgets_its_own_first(model):
    model.add_customer(SCOPE, "acme", "cus_1")
    model.versions[("ten_b", "test")] = 1
    cache = CatalogCache(max_entries=10)
    await (await cache.view(None, SCOPE)).known_customers(None, {"acme"})
    for batch in range(5):  # OTHER sends 4 new unknown references each time
        await (await cache.view(None, OTHER)).known_customers(
            None, {f"new-{batch}-{i}" for i in range(4)})
        assert len(cache) <= 10
    lookups = len(model.customer_lookups)
    await (await cache.view(None, SCOPE)).known_customers(None, {"acme"})
    assert len(model.customer_lookups) == lookups  # SCOPE's customer is still kept


async def test_two_requests_fetching_the_same_references_count_them_once(model,
                                                                          monkeypatch):
    """Both find the same references missing and ask for them at the same time: they are
    kept once, and counted once."""
    import asyncio

    model.add_customer(SCOPE, "acme", "cus_1")
    gate, both_asked = asyncio.Event(), asyncio.Event()
    asked = []
    real = model.known_customers

    async def slow_known_customers(conn, tenant_id, environment, refs):
        asked.append(1)
        if len(asked) == 2:
            both_asked.set()
        await gate.wait()
        return await real(conn, tenant_id, environment, refs)

    monkeypatch.setattr(repository, "known_customers", slow_known_customers)
    cache = CatalogCache()
    first, second = await cache.view(None, SCOPE), await cache.view(None, SCOPE)
    both = asyncio.gather(first.known_customers(None, {"acme", "x"}),
                          second.known_customers(None, {"acme", "x"}))
    await asyncio.wait_for(both_asked.wait(), 10)
    gate.set()
    a, b = await both
    assert a == b == {"acme": KnownCustomer("cus_1", "acme", None)}
    assert len(cache) == 2
