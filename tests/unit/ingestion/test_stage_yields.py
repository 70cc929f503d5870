"""The Kafka input stages a poll on the event loop that is writing the poll before: staging
must let that loop run every few hundred records (raw_input._YIELD_EVERY), or each of the
write's round trips, one of them under the log's head lock, waits for the whole poll's CPU.
And staging cooperatively must decide and encode exactly what staging in one go does."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace

import orjson
from aiokafka.structs import ConsumerRecord

from billstream_ingestion import raw_input, service
from billstream_ingestion.raw_input import RawInput
from billstream_ingestion.repository import KnownCustomer
from billstream_ingestion.settings import IngestionSettings

SCOPE = service.Scope("ten_1", "test")
CUSTOMERS = {f"c-{i}": KnownCustomer(f"cus_{i:026d}", f"c-{i}", None) for i in range(7)}


class _View:
    async def known_meters(self, pool, codes):
        return {code for code in codes if code != "typo"}

    async def known_customers(self, pool, refs):
        return {ref: CUSTOMERS[ref] for ref in refs if ref in CUSTOMERS}


class _Catalog:
    async def view(self, pool, scope):
        return _View()


class _Authenticator:
    async def authenticate(self, key: str):
        return SimpleNamespace(kind="secret", tenant_id=SCOPE.tenant_id,
                               environment=SCOPE.environment)


def _runner() -> RawInput:
    runner = RawInput.__new__(RawInput)
    runner.host = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(
        authenticator=_Authenticator(), catalog=_Catalog())), pool=None)
    runner.settings = IngestionSettings(projection_wait_s=0)
    runner._refused_keys = {}
    runner._unknown_meter_at = {}
    return runner


def _raw(i: int) -> dict:
    return {"idempotency_key": f"k-{i % 1900}", "customer": f"c-{i % 9}",
            "meter": "typo" if i % 97 == 0 else "api_calls", "quantity": str(i % 5 + 1),
            "properties": {"n": i}}


def _record(i: int) -> ConsumerRecord:
    value = orjson.dumps(_raw(i))
    return ConsumerRecord(topic="billstream.usage.raw", partition=0, offset=i, timestamp=-1,
                          timestamp_type=0, key=None, value=value, checksum=None,
                          serialized_key_size=-1, serialized_value_size=len(value),
                          headers=[("billstream-api-key", b"sk_test_good")])


async def test_staging_a_poll_lets_the_loop_run_every_few_hundred_records():
    records = [_record(i) for i in range(2000)]
    ticks = 0
    done = False

    async def other_work():  # what the write of the poll before does between round trips
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    ticks = 0
    staged = await _runner().stage(records)
    done = True
    await ticker
    # decode, parse, window, usage JSON and claims each pass 2,000 records in steps of 500:
    # some fifteen turns of the loop (none at all when staging does not yield)
    per_pass = len(records) // raw_input._YIELD_EVERY
    assert ticks >= 4 * (per_pass - 1)
    assert len(staged.prepared) == 1 and staged.prepared[0].encoded is not None


async def test_preparing_and_encoding_cooperatively_decides_and_encodes_the_same():
    settings = IngestionSettings(projection_wait_s=0)
    raws = [_raw(i) for i in range(1234)]
    now = datetime.now(UTC)  # (events without a timestamp are dated now)
    at_once = await service.prepare(None, settings, SCOPE, raws, now, catalog=_Catalog())
    service.encode(at_once, 4096)
    stepwise = await service.prepare(None, settings, SCOPE, raws, now, catalog=_Catalog(),
                                     yield_every=100)
    await service.encode_cooperatively(stepwise, 4096, 100)

    assert stepwise.outcomes == at_once.outcomes  # the unknown meters, the same way
    assert {o.code for o in at_once.outcomes} == {"unknown_meter"}
    assert stepwise.valid == at_once.valid and stepwise.timestamps == at_once.timestamps
    one, other = at_once.encoded, stepwise.encoded
    assert [ev.idempotency_key for ev in other.firsts] == [
        ev.idempotency_key for ev in one.firsts]
    assert len(one.firsts) == len(at_once.valid) > 1200
    assert other.chunks == one.chunks and len(one.chunks) > 10  # split alike
    # ids are new each time: the rest must be the same, and each claim names its own usage
    # and the batch event that holds it

    def without_ids(encoded):
        usages = [orjson.loads(u) for u in encoded.usages]
        claims = [(c.idempotency_key, c.payload_hash, c.customer, c.event_time)
                  for c in encoded.claims]
        for u in usages:
            del u["usage_id"]
        return usages, claims

    assert without_ids(other) == without_ids(one)
    for encoded in (one, other):
        holder = {i: encoded.event_ids[n] for n, (start, stop) in enumerate(encoded.chunks)
                  for i in range(start, stop)}
        for i, (claim, usage) in enumerate(zip(encoded.claims, encoded.usages, strict=True)):
            assert orjson.loads(usage)["usage_id"] == claim.usage_id
            assert claim.event_id == holder[i]
