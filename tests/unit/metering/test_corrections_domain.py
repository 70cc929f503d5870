"""Metering corrections (no I/O): which correction of a usage event wins, and which properties a
corrected row keeps."""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billstream_metering import domain
from billstream_metering.domain import Meter, RecordState


def test_a_correction_of_a_plain_row_applies():
    assert domain.correction_outcome("void", 3, RecordState()) == "applied"
    assert domain.correction_outcome("amend", 3, RecordState()) == "applied"


def test_amends_win_in_log_order():
    amended = RecordState(correction_seq=7)
    assert domain.correction_outcome("amend", 8, amended) == "applied"
    assert domain.correction_outcome("amend", 6, amended) == "superseded"
    assert domain.correction_outcome("amend", 7, amended) == "superseded"


def test_a_void_is_final():
    voided = RecordState(voided=True, correction_seq=5)
    assert domain.correction_outcome("amend", 9, voided) == "superseded"
    assert domain.correction_outcome("void", 9, voided) == "superseded"
    # ... and it applies after an amend of a higher sequence
    assert domain.correction_outcome("void", 2, RecordState(correction_seq=5)) == "applied"


@pytest.mark.parametrize("kind", ["void", "amend"])
def test_a_correction_after_billing_is_refused(kind):
    billed = RecordState(billed=True)
    assert domain.correction_outcome(kind, 1, billed) == "billed"
    billed_amended = RecordState(billed=True, billed_correction_seq=5, correction_seq=5)
    assert domain.correction_outcome(kind, 6, billed_amended) == "billed"


def test_a_replay_reapplies_the_amends_a_billed_row_carried():
    # Rebuild: the row comes back billed, its amends (up to seq 5 when swept) arrive again.
    replayed = RecordState(billed=True, billed_correction_seq=5)
    assert domain.correction_outcome("amend", 3, replayed) == "applied"
    assert domain.correction_outcome("amend", 5, replayed) == "applied"
    after_3 = RecordState(billed=True, billed_correction_seq=5, correction_seq=3)
    assert domain.correction_outcome("amend", 5, after_3) == "applied"
    assert domain.correction_outcome("amend", 6, after_3) == "billed"
    # A voided row is never swept: a void of a billed row was never billed with it.
    assert domain.correction_outcome("void", 4, replayed) == "billed"


def _fold(corrections: list[tuple[str, int]]) -> tuple[bool, int | None]:
    """Apply corrections in the order given, as metering does: (voided, amend that counts)."""
    state, counted = RecordState(), None
    for kind, seq in corrections:
        if domain.correction_outcome(kind, seq, state) != "applied":  # type: ignore[arg-type]
            continue
        last = seq if state.correction_seq is None else max(state.correction_seq, seq)
        if kind == "void":
            state = RecordState(voided=True, correction_seq=last)
        else:
            state, counted = RecordState(correction_seq=seq), seq
    return state.voided, None if state.voided else counted


@given(st.lists(st.sampled_from(["void", "amend"]), min_size=1, max_size=6), st.randoms())
def test_what_counts_does_not_depend_on_the_arrival_order(kinds, rnd):
    in_log_order = [(kind, seq) for seq, kind in enumerate(kinds, start=1)]
    arrival = list(in_log_order)
    rnd.shuffle(arrival)
    assert _fold(arrival) == _fold(in_log_order)
    voided, counted = _fold(in_log_order)
    assert voided == ("void" in kinds)
    if not voided:
        assert counted == len(kinds)  # the last amend in the log


def test_every_arrival_order_of_three_amends_ends_with_the_last():
    amends = [("amend", 1), ("amend", 2), ("amend", 3)]
    assert {_fold(list(p)) for p in itertools.permutations(amends)} == {(False, 3)}


def test_stored_properties_only_while_the_meter_is_unknown():
    props = {"tokens": "2.5"}
    assert domain.stored_properties(props, None) == props
    assert domain.stored_properties(props, None) is not props
    assert domain.stored_properties(None, None) == {}
    assert domain.stored_properties(props, Meter("m", "sum", "tokens")) is None


def test_stored_properties_keep_what_can_be_a_value_and_never_a_nul():
    """jsonb refuses NUL: usage accepted before ingestion refused it is still in the log."""
    props = {"tokens": 7, "cost": "0.125", "latency": 0.5, "region": "eu", "nested": {"a": 1},
             "flag": True, "none": None, "bad\x00key": 3, "nul": "1\x00", "deep": ["\x00"]}
    kept = domain.stored_properties(props, None)
    assert kept == {"tokens": 7, "cost": "0.125", "latency": 0.5}
    # a meter on any field gets the same value from what is kept (a meter's field, stored
    # as text, never holds a NUL)
    for field in (f for f in props if "\x00" not in f):
        assert domain.usage_value(Decimal(1), kept, Meter("m", "sum", field)) == \
            domain.usage_value(Decimal(1), props, Meter("m", "sum", field))
