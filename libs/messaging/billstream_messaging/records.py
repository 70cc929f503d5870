"""Kafka records whose header names are not UTF-8 are read, not fatal.

The protocol says a header name is a UTF-8 string, but brokers do not check it, and the C
client (librdkafka) sends whatever bytes it is given. aiokafka decodes header names strictly:
one such record raises UnicodeDecodeError out of `getmany`, every time it is fetched, for the
whole consumer. That stops every partition the consumer holds (a consumer that restarts
meets the record again), and the records of other partitions that the failed poll had
already taken are lost to it while its positions moved past them.

`install()` makes aiokafka's consumers read such a record the way the Java client does: the
batch holding it is read again by aiokafka's pure-Python reader, whose header names are
decoded with `surrogateescape` (the bytes are kept: `name.encode("utf-8",
"surrogateescape")` gives them back; `printable_header_name` writes them as text). Batches
that decode cleanly, all of them in practice, go through aiokafka's compiled reader as
before, behind one generator per batch.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from aiokafka.consumer import fetcher as _fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import _DefaultRecordBatchPy

_COMPILED = _fetcher.MemoryRecords


class TolerantMemoryRecords:
    """aiokafka's MemoryRecords (the fetch response of one partition), whose record batches
    fall back to a lenient reading of header names (see the module docstring)."""

    __slots__ = ("_data", "_records")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._records = _COMPILED(data)

    def size_in_bytes(self) -> int:
        return self._records.size_in_bytes()

    def has_next(self) -> bool:
        return self._records.has_next()

    def next_batch(self) -> Any:
        batch = self._records.next_batch()
        if batch is None or batch.is_control_batch:  # (read with next(); it has no headers)
            return batch
        return _TolerantBatch(batch, self._data)


class _TolerantBatch:
    __slots__ = ("_batch", "_data")

    def __init__(self, batch: Any, data: bytes) -> None:
        self._batch = batch
        self._data = data

    def __getattr__(self, name: str) -> Any:  # base_offset, next_offset, validate_crc, ...
        return getattr(self._batch, name)

    def __iter__(self) -> Iterator[Any]:
        # The whole batch is read first, by the compiled reader in one call: no Python frame
        # per record on the input's hot path. A batch it cannot read is read again, whole.
        try:
            records = list(self._batch)
        except (UnicodeDecodeError, CorruptRecordException) as exc:
            # aiokafka's Python reader (no compiled extensions) wraps the decode error
            if not (isinstance(exc, UnicodeDecodeError)
                    or isinstance(exc.__cause__, UnicodeDecodeError)):
                raise
            return lenient_records(self._data, self._batch.base_offset)
        return iter(records)


def lenient_records(data: bytes, base_offset: int) -> Iterator[Any]:
    """The records of the batch at `base_offset` in `data`, read by aiokafka's Python reader
    with header names decoded with surrogateescape."""
    pos = 0
    while pos + _LOG_OVERHEAD.size <= len(data):  # batches: base offset, length, the rest
        offset, length = _LOG_OVERHEAD.unpack_from(data, pos)
        end = pos + _LOG_OVERHEAD.size + length
        if offset == base_offset:
            batch = _DefaultRecordBatchPy(memoryview(data)[pos:end])
            iter(batch)  # decompresses into the batch's buffer, then reads from it
            batch._buffer = _LenientBuffer(batch._buffer)
            yield from batch
            return
        pos = end
    # the fetcher would go on past the batch's records as if they had been read
    raise CorruptRecordException(f"No record batch at offset {base_offset} to read again")


_LOG_OVERHEAD = struct.Struct(">qi")


class _LenientBytes(bytes):
    """A header name's bytes, as the Python reader slices them: decoded leniently."""

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:  # noqa: ARG002
        return bytes.decode(self, encoding, "surrogateescape")


class _LenientBuffer(bytearray):
    def __getitem__(self, index: Any) -> Any:
        item = bytearray.__getitem__(self, index)
        return _LenientBytes(item) if type(index) is slice else item


def printable_header_name(name: str) -> str:
    """A header name as text: the bytes of a name that was not UTF-8 as \\x escapes."""
    if name.isascii():
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def install() -> None:
    """Make every aiokafka consumer of this process read records through
    TolerantMemoryRecords (idempotent)."""
    _fetcher.MemoryRecords = TolerantMemoryRecords
