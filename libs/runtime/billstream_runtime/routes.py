"""The public route table: which service serves which path under the one base URL.

This table is the single source for every way Billstream is run: the local gateway
(`billstream_localstack.gateway`) routes with it, the reverse-proxy config of the
containers mode and the Ingress of the cluster mode are checked against it by
`tests/static`. The first matching rule wins, so more specific rules come first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SERVICES: tuple[str, ...] = (
    "ingestion",
    "metering",
    "subscription",
    "invoicing",
    "payments",
    "webhook_dispatch",
)

#: Default HTTP port of each service when run on one machine (local mode).
DEFAULT_PORTS: dict[str, int] = {
    "ingestion": 8101,
    "metering": 8102,
    "subscription": 8103,
    "invoicing": 8104,
    "payments": 8105,
    "webhook_dispatch": 8106,
}

#: Default port of the single public entry point.
GATEWAY_PORT = 8080


@dataclass(frozen=True, slots=True)
class Route:
    pattern: str  # a regular expression matched against the path from its start
    service: str

    def matches(self, path: str) -> bool:
        return re.match(self.pattern, path) is not None


ROUTES: tuple[Route, ...] = (
    Route(r"^/v1/usage/events(/|$)", "ingestion"),
    Route(r"^/v1/usage/corrections(/|$)", "ingestion"),
    Route(r"^/v1/usage(/|$)", "metering"),
    Route(r"^/v1/entitlements(/|$)", "metering"),
    Route(r"^/v1/customers/[^/]+/payment_methods(/|$)", "payments"),
    Route(r"^/v1/payment_methods(/|$)", "payments"),
    Route(r"^/v1/payments(/|$)", "payments"),
    Route(r"^/v1/checkout_sessions(/|$)", "payments"),
    Route(r"^/v1/invoices(/|$)", "invoicing"),
    Route(r"^/v1/credit_notes(/|$)", "invoicing"),
    Route(r"^/v1/webhook_endpoints(/|$)", "webhook_dispatch"),
    Route(r"^/v1/webhook_deliveries(/|$)", "webhook_dispatch"),
    Route(r"^/v1/events(/|$)", "webhook_dispatch"),
    Route(r"^/v1/customers(/|$)", "subscription"),
    Route(r"^/v1/meters(/|$)", "subscription"),
    Route(r"^/v1/plans(/|$)", "subscription"),
    Route(r"^/v1/subscriptions(/|$)", "subscription"),
    Route(r"^/v1/test_clocks(/|$)", "subscription"),
    Route(r"^/v1/auth(/|$)", "subscription"),
    Route(r"^/admin(/|$)", "subscription"),
)


def service_for(path: str) -> str | None:
    """The service that serves `path`, or None when no rule matches."""
    for route in ROUTES:
        if route.matches(path):
            return route.service
    return None
