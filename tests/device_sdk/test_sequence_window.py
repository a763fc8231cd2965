"""De-duplication and gaps per (device, topic): the window against a brute-force model."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from blendsm.device_sdk._sequence_window import SequenceWindow, SequenceWindows


class Model:
    """Everything remembered: accept once if above ``high - width``; a gap is every sequence
    in ``[low, high - width]`` never accepted, reported once."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.seen: set[int] = set()
        self.reported: set[int] = set()

    def accept(self, seq: int) -> tuple[bool, set[int]]:
        if self.seen:
            high = max(self.seen)
            if seq <= high - self.width or seq in self.seen:
                return False, set()
        self.seen.add(seq)
        low, high = min(self.seen), max(self.seen)
        gone = {s for s in range(low, high - self.width + 1) if s not in self.seen}
        new = gone - self.reported
        self.reported |= new
        return True, new


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 40),
    st.lists(st.integers(0, 200), max_size=120),
)
def test_window_matches_the_model(width: int, sequences: list[int]) -> None:
    window, model = SequenceWindow(width), Model(width)
    for seq in sequences:
        ok, runs = window.accept(seq)
        want_ok, want_gaps = model.accept(seq)
        assert ok == want_ok, seq
        got = [s for first, last in runs for s in range(first, last + 1)]
        assert sorted(got) == sorted(want_gaps), (seq, runs)
        assert len(got) == len(set(got))
        for (_, last), (first, _) in itertools.pairwise(runs):
            assert first > last + 1  # maximal runs
        if model.seen:
            low, high = min(model.seen), max(model.seen)
            bottom = max(low, high - width + 1)
            contiguous = next((s - 1 for s in range(bottom, high + 1) if s not in model.seen), high)
            assert window.contiguous() == contiguous


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10**12), max_size=30))
def test_big_jumps_stay_cheap_and_exact(sequences: list[int]) -> None:
    window, model_seen = SequenceWindow(64), set()
    for seq in sequences:
        ok, runs = window.accept(seq)
        assert len(runs) <= 64  # runs, not one event per sequence
        if ok:
            model_seen.add(seq)
    assert window.high == (max(model_seen) if model_seen else None)


def test_pairs_are_bounded_and_resume_points_per_topic() -> None:
    pairs = SequenceWindows(width=16, max_pairs=2)
    assert pairs.accept("d1", "t", 5)[0]
    assert not pairs.accept("d1", "t", 5)[0]
    assert pairs.accept("d1", "t", 7)[0]
    assert pairs.accept("d2", "t", 1)[0]
    assert pairs.resume_points("t") == {"d1": 5, "d2": 1}
    assert pairs.accept("d3", "u", 1)[0]
    assert len(pairs) == 2
    assert pairs.evicted == 1
    assert pairs.resume_points("t") == {"d2": 1}
