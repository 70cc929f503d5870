"""webhook_dispatch domain: Standard Webhooks signing (checked against the `standardwebhooks`
package), the retry schedule and state machine, event filtering and validation."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks import Webhook, WebhookVerificationError

from billstream_runtime.errors import Conflict, InvalidRequest
from billstream_webhook_dispatch.domain import (
    EndpointTarget,
    RetryPolicy,
    after_attempt,
    encode_body,
    new_secret,
    public_event,
    recipients,
    retry_refusal,
    rfc3339,
    sign,
    validate_enabled_events,
    validate_url,
    wants,
    webhook_headers,
)
from billstream_webhook_dispatch.service import public_event_types
from billstream_webhook_dispatch.settings import settings_from_env

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

# ---------------------------------------------------------------- signing


def test_secret_is_whsec_and_24_random_bytes():
    secrets = {new_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 24


@given(
    msg_id=st.from_regex(r"evt_[0-9A-Z]{26}", fullmatch=True),
    timestamp=st.integers(min_value=0, max_value=4_000_000_000),
    body=st.text(max_size=300),
)
def test_signature_equals_the_standardwebhooks_reference(msg_id, timestamp, body):
    secret = new_secret()
    expected = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, tz=UTC), body)
    assert sign(secret, msg_id, timestamp, body.encode()) == expected


def test_headers_verify_with_standardwebhooks_and_a_changed_byte_does_not():
    secret = new_secret()
    body = encode_body(public_event(
        event_id="evt_01", event_type="invoice.paid", version=1, environment="test",
        occurred_at=T0, recorded_at=T0, data={"amount": 1200, "note": "ünïcode ✓"}))
    headers = webhook_headers(secret, "evt_01", int(time.time()), body)
    assert headers["webhook-id"] == "evt_01"
    assert headers["webhook-signature"].startswith("v1,")
    assert headers["content-type"] == "application/json"
    assert Webhook(secret).verify(body, headers)["data"]["note"] == "ünïcode ✓"
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"1200", b"1201"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


def test_signature_covers_the_timestamp():
    secret, body = new_secret(), b'{"id":"evt_1"}'
    assert sign(secret, "evt_1", 1000, body) != sign(secret, "evt_1", 1001, body)
    assert sign(secret, "evt_1", 1000, body) != sign(secret, "evt_2", 1000, body)


# ---------------------------------------------------------------- retry schedule


def test_default_schedule():
    policy = RetryPolicy(jitter=0.0)
    delays = [policy.delay_s(n) for n in range(1, 12)]
    assert delays == [5, 30, 120, 600, 1800, 3600, 7200, 14400, 14400, 14400, 14400]


def test_schedule_scales_with_the_base_and_is_capped():
    policy = RetryPolicy(base_s=0.01, max_s=1.0, jitter=0.0)
    assert [policy.delay_s(n) for n in (1, 2, 3)] == pytest.approx([0.01, 0.06, 0.24])
    assert policy.delay_s(5) == 1.0
    uncapped = RetryPolicy(base_s=1, max_s=10**9, jitter=0.0)
    assert uncapped.delay_s(9) == 2 * uncapped.delay_s(8)  # doubling past the table


@given(n=st.integers(1, 30), rand=st.floats(0, 1, exclude_max=True))
def test_jitter_stays_within_bounds(n, rand):
    policy = RetryPolicy(jitter=0.2)
    plain = RetryPolicy(jitter=0.0).delay_s(n)
    assert 0.8 * plain <= policy.delay_s(n, rand) <= 1.2 * plain


def test_after_attempt_state_machine():
    policy = RetryPolicy(max_attempts=3, jitter=0.0)
    ok = after_attempt(status_code=204, cycle_attempts=1, policy=policy, endpoint_enabled=True)
    assert (ok.status, ok.retry_in_s) == ("delivered", None)
    again = after_attempt(status_code=500, cycle_attempts=1, policy=policy, endpoint_enabled=True)
    assert (again.status, again.retry_in_s) == ("pending", 5)
    net = after_attempt(status_code=None, cycle_attempts=2, policy=policy, endpoint_enabled=True)
    assert (net.status, net.retry_in_s) == ("pending", 30)
    redirect = after_attempt(status_code=301, cycle_attempts=1, policy=policy,
                             endpoint_enabled=True)
    assert redirect.status == "pending"
    last = after_attempt(status_code=500, cycle_attempts=3, policy=policy, endpoint_enabled=True)
    assert (last.status, last.retry_in_s) == ("failed", None)
    gone = after_attempt(status_code=500, cycle_attempts=1, policy=policy, endpoint_enabled=False)
    assert gone.status == "canceled"
    late_ok = after_attempt(status_code=200, cycle_attempts=3, policy=policy,
                            endpoint_enabled=False)
    assert late_ok.status == "delivered"


def test_retry_refusals():
    assert retry_refusal("delivered", True, "enabled") is None
    assert retry_refusal("failed", True, "enabled") is None
    assert retry_refusal("sending", True, "enabled") is None  # lease expired: the worker is gone
    assert isinstance(retry_refusal("sending", False, "enabled"), Conflict)
    refusal = retry_refusal("failed", True, "disabled")
    assert isinstance(refusal, InvalidRequest) and refusal.code == "endpoint_disabled"


# ---------------------------------------------------------------- event filtering


def test_wants():
    assert wants(["*"], "invoice.paid")
    assert wants(["invoice.paid"], "invoice.paid")
    assert not wants(["invoice.paid"], "invoice.finalized")
    assert not wants([], "invoice.paid")


def test_recipients_filter_by_type_and_by_creation_time():
    endpoints = [
        EndpointTarget("we_all", ["*"], T0),
        EndpointTarget("we_paid", ["invoice.paid"], T0),
        EndpointTarget("we_later", ["*"], T0 + timedelta(minutes=1)),
    ]
    assert recipients(endpoints, "invoice.paid", T0) == ["we_all", "we_paid"]
    assert recipients(endpoints, "customer.created", T0 + timedelta(minutes=2)) == [
        "we_all", "we_later"]


def test_public_event_types_are_the_registry_public_ones():
    types = public_event_types()
    assert "invoice.paid" in types and "customer.created" in types
    assert "api_key.created" not in types and "tenant.created" not in types
    assert "usage.accepted" not in types


def test_enabled_events_validation():
    types = public_event_types()
    assert validate_enabled_events(["*"], types) == ["*"]
    assert validate_enabled_events(["invoice.paid", "invoice.paid", "payment.failed"], types) == [
        "invoice.paid", "payment.failed"]
    for bad in (["invoice.teleported"], ["api_key.created"], [], ["*", "nope"]):
        with pytest.raises(InvalidRequest) as err:
            validate_enabled_events(bad, types)
        assert err.value.param == "enabled_events" and err.value.status == 400


def test_url_validation():
    assert validate_url(" http://127.0.0.1:9999/hook ", allow_private=True) == (
        "http://127.0.0.1:9999/hook")
    assert validate_url("https://example.com/h?x=1") == "https://example.com/h?x=1"
    for bad in ("ftp://example.com", "example.com/hook", "http://", "javascript:alert(1)",
                "https://e.com/" + "a" * 3000):
        with pytest.raises(InvalidRequest) as err:
            validate_url(bad)
        assert err.value.param == "url"


# ---------------------------------------------------------------- the public event


def test_public_event_shape_and_bytes():
    occurred = datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC)
    event = public_event(event_id="evt_1", event_type="invoice.paid", version=1,
                         environment="live", occurred_at=occurred, recorded_at=T0,
                         data={"b": 1, "a": {"z": [1, 2]}})
    assert event == {
        "id": "evt_1", "object": "event", "type": "invoice.paid", "version": 1,
        "created": "2026-03-01T12:00:00Z", "occurred_at": "2026-01-31T23:59:59Z",
        "livemode": True, "data": {"b": 1, "a": {"z": [1, 2]}},
    }
    assert encode_body(event) == encode_body(dict(event))  # deterministic
    assert orjson.loads(encode_body(event)) == event
    assert public_event(event_id="e", event_type="t", version=1, environment="test",
                        occurred_at=T0, recorded_at=T0, data={})["livemode"] is False


def test_rfc3339():
    precise = datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    assert rfc3339(precise) == "2026-01-01T00:00:00.123456Z"
    plus_two = datetime(2026, 1, 1, 3, tzinfo=timezone(timedelta(hours=2)))
    assert rfc3339(plus_two) == "2026-01-01T01:00:00Z"
    assert rfc3339(None) is None


# ---------------------------------------------------------------- settings


def test_settings_from_env():
    s = settings_from_env({"BILLSTREAM_WEBHOOK_DISPATCH_DELIVERY_MAX_ATTEMPTS": "3",
                           "BILLSTREAM_DELIVERY_BACKOFF_BASE_S": "0.01"})
    assert s.delivery_max_attempts == 3 and s.delivery_backoff_base_s == 0.01
    assert s.retry_policy().max_attempts == 3
    default = settings_from_env({})
    assert (default.delivery_max_attempts, default.delivery_backoff_base_s,
            default.delivery_timeout_s) == (10, 5.0, 10.0)
    with pytest.raises(ValueError):
        settings_from_env({"BILLSTREAM_WEBHOOK_DISPATCH_DELIVERY_LEASE_S": "5"})


# -- destinations (SSRF guard) ---------------------------------------------------------------

import pytest as _pytest  # noqa: E402

from billstream_runtime.errors import InvalidRequest as _InvalidRequest  # noqa: E402
from billstream_webhook_dispatch.domain import (  # noqa: E402
    is_public_address as _is_public, validate_url as _validate_url,
)


@_pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("::1", False), ("fd00::1", False), ("0.0.0.0", False),
    ("::ffff:127.0.0.1", False), ("224.0.0.1", False),
])
def test_public_addresses(address, public):
    assert _is_public(address) is public


@_pytest.mark.parametrize("url", [
    "http://127.0.0.1:9999/hook", "http://localhost/hook", "https://169.254.169.254/latest",
    "http://[::1]/x", "http://10.0.0.5/hook",
])
def test_private_destinations_are_refused_unless_allowed(url):
    with _pytest.raises(_InvalidRequest) as err:
        _validate_url(url)
    assert err.value.code == "url_not_allowed" and err.value.param == "url"
    assert _validate_url(url, allow_private=True) == url


def test_public_destinations_are_accepted():
    assert _validate_url("https://hooks.example.com/billstream") == (
        "https://hooks.example.com/billstream")


async def test_delivery_refuses_a_name_that_resolves_into_the_network():
    from billstream_webhook_dispatch.tasks import HttpSender

    sender = HttpSender(timeout_s=5, max_connections=1)
    try:
        result = await sender.send("http://localhost:9/hook", b"{}", {})
    finally:
        await sender.aclose()
    assert result.status_code is None
    assert "DestinationNotAllowed" in result.error and "non-public" in result.error
