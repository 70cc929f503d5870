import pytest

from billstream_runtime.errors import ApiError, NotFound, RateLimited
from billstream_runtime.routes import DEFAULT_PORTS, ROUTES, SERVICES, service_for
from billstream_runtime.settings import load_settings


def test_prefixed_setting_wins_over_shared_and_default():
    env = {
        "BILLSTREAM_KAFKA_BOOTSTRAP": "shared:9092",
        "BILLSTREAM_INVOICING_KAFKA_BOOTSTRAP": "own:9092",
        "BILLSTREAM_INVOICING_HTTP_PORT": "8104",
        "BILLSTREAM_METERING_DATABASE_URL": "postgresql://x/metering",
    }
    s = load_settings("invoicing", environ=env)
    assert s.kafka_bootstrap == "own:9092"
    assert s.http_port == 8104
    assert s.database_url != "postgresql://x/metering"  # another service's setting
    assert load_settings("payments", environ=env).kafka_bootstrap == "shared:9092"
    assert load_settings("payments", environ={}).http_port == 8000


def test_invalid_setting_is_rejected():
    with pytest.raises(ValueError):
        load_settings("invoicing", environ={"BILLSTREAM_INVOICING_HTTP_PORT": "eighty"})


@pytest.mark.parametrize(
    ("path", "service"),
    [
        ("/v1/usage/events", "ingestion"),
        ("/v1/usage", "metering"),
        ("/v1/usage?customer=a", "metering"),
        ("/v1/customers/cus_1/payment_methods", "payments"),
        ("/v1/customers/cus_1", "subscription"),
        ("/v1/customers", "subscription"),
        ("/v1/invoices/inv_1", "invoicing"),
        ("/v1/webhook_endpoints", "webhook_dispatch"),
        ("/v1/events/evt_1", "webhook_dispatch"),
        ("/v1/test_clocks/clk_1/advance", "subscription"),
        ("/admin/v1/tenants", "subscription"),
        ("/v1/usagexyz", None),
        ("/v2/customers", None),
    ],
)
def test_route_table(path, service):
    assert service_for(path.split("?")[0]) == service


def test_every_service_has_routes_and_a_port():
    assert {r.service for r in ROUTES} == set(SERVICES) == set(DEFAULT_PORTS)
    assert len(set(DEFAULT_PORTS.values())) == len(SERVICES)


def test_error_shape():
    body = NotFound("customer", "cus_x", param="customer").body("req_1")
    assert body == {"error": {"type": "invalid_request_error", "code": "resource_missing",
                              "message": "No such customer: 'cus_x'", "param": "customer",
                              "request_id": "req_1"}}
    assert RateLimited("slow down", 3).headers == {"Retry-After": "3"}
    assert ApiError("x", "y", status=503).type == "api_error"
