"""log_position: which event a record carries, from the relay's headers. It reads records the
consumer could not read otherwise, so it never raises, and whatever it returns fits the inbox
(text without NUL, a bigint sequence)."""

from __future__ import annotations

from aiokafka.structs import ConsumerRecord
from hypothesis import given
from hypothesis import strategies as st

from billstream_messaging.consumer import LogPosition, log_position

GOOD = [("event_type", b"note.created"), ("event_version", b"1"), ("event_id", b"evt_1"),
        ("event_source", b"notes"), ("event_sequence", b"42")]


def record(headers, value: bytes | None = b"not an envelope") -> ConsumerRecord:
    return ConsumerRecord(topic="t", partition=0, offset=0, timestamp=-1, timestamp_type=0,
                          key=None, value=value, checksum=None, serialized_key_size=-1,
                          serialized_value_size=-1, headers=headers)


def with_header(name: str, value) -> list:
    return [(n, value if n == name else v) for n, v in GOOD]


def test_the_relay_headers_name_the_event():
    assert log_position(record(GOOD)) == LogPosition("evt_1", "note.created", "notes", 42)
    assert LogPosition("evt_1", "note.created", "notes", 42).headers() == [
        ("event_id", b"evt_1"), ("event_source", b"notes"), ("event_sequence", b"42"),
        ("event_type", b"note.created")]


def test_without_them_or_without_a_value_there_is_no_position():
    assert log_position(record([])) is None
    assert log_position(record(None)) is None
    assert log_position(record([h for h in GOOD if h[0] != "event_source"])) is None
    assert log_position(record(GOOD, value=None)) is None  # a tombstone


def test_headers_that_do_not_fit_the_inbox_give_no_position():
    for value in (b"\xc2\xb2",  # "²": a digit to str.isdigit, not to int()
                  b"9" * 4301,  # past int()'s digit limit
                  b"99999999999999999999",  # past a bigint
                  b"9223372036854775808",  # 2**63
                  b"0", b"-1", b"1e3", b" 42", b"", None):
        assert log_position(record(with_header("event_sequence", value))) is None, value
    assert log_position(record(with_header("event_sequence", b"9223372036854775807"))) \
        == LogPosition("evt_1", "note.created", "notes", 2**63 - 1)
    for name in ("event_id", "event_source"):
        for value in (b"evt\x00", b"\xff", b"x" * 256, b"", None, "text"):
            assert log_position(record(with_header(name, value))) is None, (name, value)


def test_an_odd_type_costs_the_event_only_its_type():
    for value in (b"note\x00", b"\xff", b"x" * 256, b"", None):
        assert log_position(record(with_header("event_type", value))) == LogPosition(
            "evt_1", None, "notes", 42), value


HEADER_VALUES = st.one_of(
    st.none(), st.binary(max_size=40), st.from_regex(r"\A[0-9]{1,21}\Z").map(str.encode),
    st.text(max_size=30).map(str.encode))


@given(st.lists(st.tuples(st.sampled_from(["event_id", "event_source", "event_sequence",
                                           "event_type", "other"]), HEADER_VALUES),
                max_size=6),
       st.one_of(st.none(), st.binary(max_size=10)))
def test_it_never_raises_and_what_it_names_fits_the_inbox(changes, value):
    """The relay's headers, then changes (a later header of the same name wins)."""
    position = log_position(record(GOOD + changes, value))
    if position is None:
        return
    assert 1 <= position.sequence < 2**63
    for text in (position.event_id, position.source, position.event_type or "x"):
        assert text and len(text) <= 255 and "\x00" not in text
