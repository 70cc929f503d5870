"""Record batches holding a header name that is not UTF-8 are read (billstream_messaging.records):
aiokafka's compiled reader raises on them, for the whole consumer, every time."""

from __future__ import annotations

import pytest
from aiokafka.record.default_records import (
    DefaultRecordBatch,
    _DefaultRecordBatchBuilderPy,
)
from aiokafka.record.memory_records import MemoryRecords

from billstream_messaging.records import (
    TolerantMemoryRecords,
    install,
    printable_header_name,
)


class _Bytes(str):
    """A header name the Python builder writes as these bytes (librdkafka writes any)."""

    def __new__(cls, raw: bytes):
        obj = super().__new__(cls, raw.decode("latin-1"))
        obj.raw = raw
        return obj

    def encode(self, *args, **kwargs) -> bytes:  # noqa: ARG002
        return self.raw


def _batch(records, base_offset: int, compression: int = 0) -> bytes:
    builder = _DefaultRecordBatchBuilderPy(magic=2, compression_type=compression,
                                           is_transactional=0, producer_id=-1,
                                           producer_epoch=-1, base_sequence=-1,
                                           batch_size=1 << 20)
    for i, (value, headers) in enumerate(records):
        builder.append(i, timestamp=1_700_000_000_000, key=b"k", value=value,
                       headers=headers)
    data = builder.build()
    data[0:8] = base_offset.to_bytes(8, "big")  # as the broker writes it
    return bytes(data)


def _read(records_class, data: bytes) -> list:
    out, records = [], records_class(data)
    while records.has_next():
        out += [(r.offset, r.value, r.headers) for r in records.next_batch()]
    return out


BAD = [(b"v0", [("trace", b"t0")]), (b"v1", [(_Bytes(b"x-\xff"), b"h1"), ("ok", b"o")]),
       (b"v2", [])]


@pytest.mark.parametrize("compression", [0, DefaultRecordBatch.CODEC_GZIP])
def test_a_batch_with_a_header_name_that_is_not_utf8_is_read(compression: int) -> None:
    data = _batch([(b"a", [])], 10) + _batch(BAD, 11, compression) + _batch([(b"z", [])], 14)
    with pytest.raises(UnicodeDecodeError):  # what aiokafka alone does
        _read(MemoryRecords, data)
    assert _read(TolerantMemoryRecords, data) == [
        (10, b"a", []),
        (11, b"v0", [("trace", b"t0")]),
        (12, b"v1", [("x-\udcff", b"h1"), ("ok", b"o")]),
        (13, b"v2", []),
        (14, b"z", []),
    ]


def test_clean_batches_read_as_before() -> None:
    data = _batch([(b"a", [("h", b"1")]), (b"b", [("é", None)])], 0) + _batch([(b"c", [])], 2)
    assert _read(TolerantMemoryRecords, data) == _read(MemoryRecords, data) == [
        (0, b"a", [("h", b"1")]), (1, b"b", [("é", None)]), (2, b"c", [])]


def test_a_name_that_was_not_utf8_is_printed_with_escapes() -> None:
    assert printable_header_name("x-\udcff") == "x-\\xff"
    assert printable_header_name("trace") == "trace"
    assert printable_header_name("é") == "é"


def test_install_puts_it_under_every_aiokafka_consumer(monkeypatch) -> None:
    from aiokafka.consumer import fetcher

    monkeypatch.setattr(fetcher, "MemoryRecords", fetcher.MemoryRecords)  # (put back after)
    install()
    assert fetcher.MemoryRecords is TolerantMemoryRecords


def test_without_compiled_extensions_too(monkeypatch) -> None:
    """aiokafka's Python reader (AIOKAFKA_NO_EXTENSIONS, or no wheel for the platform) raises
    the decode error wrapped in CorruptRecordException."""
    from aiokafka.record import memory_records
    from aiokafka.record.default_records import _DefaultRecordBatchPy

    from billstream_messaging import records

    data = _batch(BAD, 11)
    monkeypatch.setattr(records, "_COMPILED", memory_records._MemoryRecordsPy)
    monkeypatch.setattr(memory_records, "DefaultRecordBatch", _DefaultRecordBatchPy)
    with pytest.raises(Exception) as raised:  # what aiokafka alone does
        _read(memory_records._MemoryRecordsPy, data)
    assert isinstance(raised.value.__cause__, UnicodeDecodeError)
    assert [r[0] for r in _read(TolerantMemoryRecords, data)] == [11, 12, 13]


def test_a_batch_that_cannot_be_found_again_is_an_error_not_a_skip() -> None:
    from aiokafka.errors import CorruptRecordException

    from billstream_messaging.records import lenient_records

    with pytest.raises(CorruptRecordException):
        list(lenient_records(_batch(BAD, 11), base_offset=99))
