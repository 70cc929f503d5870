"""The Kafka input's pipelined polls against a scripted consumer: a write that fails while the
loop fetches the next poll must leave the consumer at the failed poll's first record, whatever
the fetch returned meanwhile (billstream_ingestion.raw_input, `_step` and `_settle`). The
integration tests show the same against the embedded broker, whose timing is its own."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from aiokafka import TopicPartition

from billstream_ingestion import raw_input
from billstream_ingestion.raw_input import RawInput

TP = TopicPartition("billstream.usage.raw", 4)
OTHER = TopicPartition("billstream.usage.raw", 5)


def _records(tp: TopicPartition, first: int, n: int) -> list:
    return [SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=first + i)
            for i in range(n)]


class _Consumer:
    """Positions move as a real consumer's do: a poll moves them past what it returns, a
    seek sets them."""

    def __init__(self, polls) -> None:
        self.polls = list(polls)
        self.position: dict[TopicPartition, int] = {}
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.commits: list[dict] = []

    def assignment(self):
        return {TP, OTHER}

    def seek(self, tp, offset) -> None:
        self.seeks.append((tp, offset))
        self.position[tp] = offset

    async def getmany(self, timeout_ms: int, max_records: int) -> dict:
        polled = await self.polls.pop(0)()
        for tp, recs in polled.items():
            self.position[tp] = recs[-1].offset + 1
        return polled

    async def commit(self, offsets) -> None:
        self.commits.append(offsets)


def _runner(failed: asyncio.Event) -> RawInput:
    runner = RawInput.__new__(RawInput)
    runner.settings = SimpleNamespace(raw_max_records=5000)
    runner.admission = SimpleNamespace(backlogged=_false)
    runner.paused = False

    async def stage(records):
        return SimpleNamespace(records=records)

    async def finish(staged, producer):
        failed.set()
        raise RuntimeError("injected write failure")

    runner.stage, runner.finish = stage, finish
    return runner


async def _false() -> bool:
    return False


async def _run(second_poll: dict, monkeypatch) -> _Consumer:
    real_sleep = asyncio.sleep
    monkeypatch.setattr(raw_input.asyncio, "sleep", lambda _s: real_sleep(0))
    failed = asyncio.Event()

    async def first():
        return {TP: _records(TP, 0, 20)}

    async def after_the_failure():  # the fetch returns once the write has failed
        await failed.wait()
        return second_poll

    consumer = _Consumer([first, after_the_failure])
    runner = _runner(failed)
    inflight = await runner._step(consumer, None, None)
    assert inflight is not None
    assert await runner._step(consumer, None, inflight) is None  # the failure was seen
    return consumer


async def test_records_produced_meanwhile_do_not_move_the_failed_poll_on(monkeypatch) -> None:
    consumer = await _run({TP: _records(TP, 20, 5), OTHER: _records(OTHER, 7, 3)},
                          monkeypatch)
    assert consumer.position == {TP: 0, OTHER: 7}  # both polls are read again
    assert consumer.commits == []


async def test_the_failed_polls_own_records_fetched_again_are_not_dropped(monkeypatch) -> None:
    # a fetch that came after a rewind holds the failed poll's records again
    consumer = await _run({TP: _records(TP, 0, 25)}, monkeypatch)
    assert consumer.position[TP] == 0
    assert consumer.commits == []
