"""What the catalog read models say about a scope's meters and customers, remembered per
process while the scope's catalog version stands.

Every request (and every poll of the Kafka input) needs its events' meters and customers. For
a batch of 1,000 events naming 1,000 customers that was one statement probing two indexes a
thousand times each: with 100,000 customers, 6.7–9.1 ms of PostgreSQL's CPU per batch (about as
much as claiming the keys) and 1.2–1.7 ms of the worker's. Customers and meters change rarely
next to the usage that names them, so a worker remembers the answers and asks PostgreSQL
only for the scope's version (one primary-key read) and for what it has not seen.

The version: the catalog consumer moves `catalog_versions` for a scope, in the same
transaction, whenever it writes one of the scope's customers, meters or test clocks
(repository.bump_catalog_version; values come from a sequence, so they never repeat, not
even after a rebuild empties the table). A worker uses what it remembers only while the
version it reads is the one it remembered it at; the version is read before the rows it
fetches, so a change committed in between makes the next request start afresh, never the
other way round. A scope without a version row (a rebuild in progress) is not cached.

Remembered: the customers found, the references found unknown (usage for a customer that
does not exist yet is accepted; the creation of any customer of the scope moves the version),
and the meters found. Unknown meters are not: they are waited for (service._check_meters).
At most `max_entries` per process; when full, the largest scopes are forgotten first.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from billstream_ingestion import repository
from billstream_ingestion.repository import Conn, KnownCustomer

if TYPE_CHECKING:
    from billstream_ingestion.service import Scope

DEFAULT_MAX_ENTRIES = 100_000


@dataclass(slots=True)
class _Remembered:
    version: int
    meters: set[str] = field(default_factory=set)
    customers: dict[str, KnownCustomer | None] = field(default_factory=dict)

    def size(self) -> int:
        return len(self.meters) + len(self.customers)


class CatalogCache:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._scopes: dict[Scope, _Remembered] = {}
        self._entries = 0

    async def view(self, conn: Conn, scope: Scope) -> CatalogView:
        """The scope as of its current version: read it, then drop what was remembered at
        another version."""
        version = await repository.catalog_version(conn, scope.tenant_id, scope.environment)
        remembered = self._scopes.get(scope)
        if remembered is not None and remembered.version != version:
            del self._scopes[scope]
            self._entries -= remembered.size()
            remembered = None
        if remembered is None and version is not None:
            remembered = self._scopes[scope] = _Remembered(version)
        return CatalogView(self, scope, remembered)

    def _room(self, scope: Scope, remembered: _Remembered, n: int) -> bool:
        """Whether up to n new entries of `remembered` may be kept: not when another request
        saw a newer version meanwhile, nor when n alone is over the limit. Makes room by
        forgetting the largest scopes first (one tenant sending ever new unknown references
        forgets its own before anyone else's; this scope keeps its version)."""
        if self._scopes.get(scope) is not remembered or n > self.max_entries:
            return False
        if self._entries + n > self.max_entries:
            for other in sorted(self._scopes, key=lambda k: -self._scopes[k].size()):
                forgotten = self._scopes[other]
                self._entries -= forgotten.size()
                forgotten.meters.clear()
                forgotten.customers.clear()
                if other != scope:
                    del self._scopes[other]
                if self._entries + n <= self.max_entries:
                    break
        return True

    def _added(self, n: int) -> None:
        self._entries += n

    def __len__(self) -> int:
        return self._entries


class CatalogView:
    """A scope's meters and customers for one request: from memory where the version allows,
    else from the read models (and then remembered). `CatalogView.uncached` always asks."""

    def __init__(self, cache: CatalogCache | None, scope: Scope,
                 remembered: _Remembered | None) -> None:
        self._cache = cache
        self._scope = scope
        self._remembered = remembered

    @classmethod
    def uncached(cls, scope: Scope) -> CatalogView:
        return cls(None, scope, None)

    async def known_meters(self, conn: Conn, codes: set[str]) -> set[str]:
        """As repository.known_meters: which of `codes` are meters of the scope."""
        remembered, scope, cache = self._remembered, self._scope, self._cache
        if remembered is None or cache is None:  # uncached, or a scope without a version
            return await repository.known_meters(conn, scope.tenant_id, scope.environment,
                                                 codes)
        known = codes & remembered.meters
        missing = codes - known
        if missing:
            found = await repository.known_meters(conn, scope.tenant_id, scope.environment,
                                                  missing)
            if found and cache._room(scope, remembered, len(found)):
                before = len(remembered.meters)  # another request may have added some
                remembered.meters |= found
                cache._added(len(remembered.meters) - before)
            known |= found
        return known

    async def known_customers(self, conn: Conn, refs: Collection[str]
                              ) -> dict[str, KnownCustomer]:
        """As repository.known_customers: the customers named by `refs`, by ref."""
        remembered, scope, cache = self._remembered, self._scope, self._cache
        if remembered is None or cache is None:  # uncached, or a scope without a version
            return await repository.known_customers(conn, scope.tenant_id, scope.environment,
                                                    refs)
        seen = remembered.customers
        out: dict[str, KnownCustomer] = {}
        missing = []
        for ref in refs:
            if ref in seen:
                customer = seen[ref]
                if customer is not None:
                    out[ref] = customer
            else:
                missing.append(ref)
        if missing:
            found = await repository.known_customers(conn, scope.tenant_id, scope.environment,
                                                     missing)
            out.update(found)
            if cache._room(scope, remembered, len(missing)):
                before = len(seen)  # another request may have added some of them
                for ref in missing:
                    seen[ref] = found.get(ref)
                cache._added(len(seen) - before)
        return out
