"""Ids are prefixed ULIDs: valid Crockford base32, the creation millisecond up front, unique."""

from __future__ import annotations

import time

from ulid import ULID

from billstream_runtime.ids import new_id, new_ids


def test_an_id_is_a_prefixed_ulid_of_now():
    before = time.time_ns() // 1_000_000
    value = new_id("evt")
    after = time.time_ns() // 1_000_000
    prefix, _, body = value.partition("_")
    assert prefix == "evt" and len(body) == 26
    parsed = ULID.from_str(body)  # an independent parser agrees it is a ULID
    assert str(parsed) == body
    assert before <= parsed.milliseconds <= after


def test_many_ids_are_unique_and_share_the_millisecond():
    ids = new_ids("use", 10_000)
    assert len(set(ids)) == 10_000
    assert {i[:14] for i in ids} == {ids[0][:14]}  # "use_" + 10 time characters
    assert all(len(i) == 30 for i in ids)
    assert all(set(i[4:]) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ") for i in ids)


def test_ids_sort_by_creation_time():
    first = new_id("cus")
    time.sleep(0.002)
    assert new_id("cus") > first


def test_a_batch_counts_up_and_parses_as_ulids():
    ids = new_ids("evt", 5000)
    assert ids == sorted(ids)
    values = [ULID.from_str(i[4:]) for i in ids]
    ints = [int(v) for v in values]
    assert ints == list(range(ints[0], ints[0] + 5000))  # consecutive 128-bit values


def test_two_batches_in_the_same_millisecond_differ():
    assert not set(new_ids("a", 1000)) & set(new_ids("a", 1000))
