"""The Kafka input's API keys (raw_input.RawInput._authenticate and stage): a key refused a
moment ago is not waited for again, whatever else the poll holds (one producer with a wrong
key must not hold every poll for `projection_wait_s`), and a record's key is looked up
whether its value decodes or not."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka.structs import ConsumerRecord

from billstream_ingestion import raw_input, service
from billstream_ingestion.raw_input import RawInput
from billstream_runtime.errors import ApiError


class _Authenticator:
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def authenticate(self, key: str):
        self.asked.append(key)
        if key == "sk_test_good":
            return SimpleNamespace(kind="secret", tenant_id="ten_1", environment="test")
        raise ApiError("invalid_api_key", "The API key is malformed")


def _runner(monkeypatch) -> tuple[RawInput, _Authenticator, list]:
    runner = RawInput.__new__(RawInput)
    authenticator = _Authenticator()
    runner.host = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(
        authenticator=authenticator, catalog=None)), pool=None)
    runner.settings = SimpleNamespace(projection_wait_s=1.0, raw_max_record_bytes=64 * 1024)
    runner._refused_keys = {}
    runner._unknown_meter_at = {}
    waits: list = []

    async def wait_for(probe, timeout):
        waits.append(timeout)
        return await probe()

    monkeypatch.setattr(raw_input, "wait_for", wait_for)
    return runner, authenticator, waits


async def test_a_key_refused_a_moment_ago_is_not_waited_for_again(monkeypatch):
    runner, authenticator, waits = _runner(monkeypatch)
    first = await runner._authenticate({"sk_test_bad"})
    assert isinstance(first["sk_test_bad"], ApiError) and waits == [1.0]  # once: it may be new
    second = await runner._authenticate({"sk_test_bad", "sk_test_good"})
    assert second["sk_test_good"] == service.Scope("ten_1", "test")
    assert isinstance(second["sk_test_bad"], ApiError)
    assert waits == [1.0]  # the poll was not held for the key refused a moment ago
    assert authenticator.asked.count("sk_test_bad") == 2  # (asked, then once more on waiting)


def _record(value: bytes, key: bytes) -> ConsumerRecord:
    return ConsumerRecord(topic="billstream.usage.raw", partition=0, offset=0, timestamp=-1,
                          timestamp_type=0, key=None, value=value, checksum=None,
                          serialized_key_size=-1, serialized_value_size=len(value),
                          headers=[("billstream-api-key", key)])


async def test_every_record_s_key_is_looked_up_and_a_blank_one_is_not_missing(monkeypatch):
    runner, authenticator, _ = _runner(monkeypatch)
    staged = await runner.stage([
        _record(b"{not json", b"sk_test_good"),
        _record(b'{"idempotency_key": "k", "customer": "c", "meter": "m"}', b"  "),
    ])
    assert staged.scope_of(0) == service.Scope("ten_1", "test")  # its report names it
    assert staged.scope_of(1) is None
    assert staged.outcomes[0].code == "invalid_json"
    assert staged.outcomes[1].code == "invalid_api_key"  # a blank key is a key, not none
    assert "" in authenticator.asked


async def test_a_tenant_s_records_under_several_keys_are_prepared_together_in_poll_order(
        monkeypatch):
    """Two secret keys of one tenant in a poll: one batch for the scope, records in offset
    order (the first occurrence of an idempotency key is the one accepted), and a refused
    key's records rejected, whatever order they came in."""
    runner, authenticator, _ = _runner(monkeypatch)

    async def authenticate(key: str):
        if key in ("sk_test_one", "sk_test_two"):
            return SimpleNamespace(kind="secret", tenant_id="ten_1", environment="test")
        raise ApiError("invalid_api_key", "The API key is malformed")

    authenticator.authenticate = authenticate
    prepared: list[tuple[service.Scope, list[int], list[str]]] = []

    async def prepare(pool, settings, scope, raws, *, indices, **_):
        prepared.append((scope, list(indices), [r["idempotency_key"] for r in raws]))
        return service.Prepared(scope)

    monkeypatch.setattr(service, "prepare", prepare)
    keys = [b"sk_test_one", b"sk_test_two", b"sk_test_bad", b"sk_test_two", b"sk_test_one"]
    staged = await runner.stage([
        _record(b'{"idempotency_key": "k%d", "customer": "c", "meter": "m"}' % i, key)
        for i, key in enumerate(keys)])
    assert prepared == [(service.Scope("ten_1", "test"), [0, 1, 3, 4],
                         ["k0", "k1", "k3", "k4"])]
    assert list(staged.outcomes) == [2] and staged.outcomes[2].code == "invalid_api_key"
    assert staged.outcomes[2].idempotency_key == "k2"
    assert [staged.scope_of(i) for i in range(5)] == [
        service.Scope("ten_1", "test")] * 2 + [None] + [service.Scope("ten_1", "test")] * 2
