"""The replay ring's bounds: per-topic count, global bytes, disabled, and its config."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blendsm.broker._replay import (
    ENTRY_OVERHEAD,
    ReplayConfig,
    ReplayRing,
    parse_replay,
    topic_matches,
)
from blendsm.errors import ConfigError

DEV_A = b"\xaa" * 20
DEV_B = b"\xbb" * 20


def test_keeps_the_newest_per_topic_and_serves_after_a_sequence() -> None:
    ring = ReplayRing(ReplayConfig(messages=3, bytes=1 << 20))
    for seq in range(1, 6):
        ring.append("t", DEV_A, seq, b"x" * 10, 0)
    assert [e.sequence for e in ring.entries("t")] == [3, 4, 5]
    assert len(ring) == 3
    assert ring.evicted == 2
    found, lowest = ring.after("t", DEV_A, 3, ring.serial)
    assert [e.sequence for e in found] == [4, 5]
    assert lowest == 3
    found, lowest = ring.after("t", DEV_B, 0, ring.serial)
    assert found == []
    assert lowest is None


def test_the_subscribe_mark_excludes_what_came_after_it() -> None:
    ring = ReplayRing(ReplayConfig())
    for seq in range(1, 4):
        ring.append("t", DEV_A, seq, b"x", 0)
    mark = ring.serial
    ring.append("t", DEV_A, 4, b"x", 0)
    found, lowest = ring.after("t", DEV_A, 0, mark)
    assert [e.sequence for e in found] == [1, 2, 3]
    assert lowest == 1


def test_the_byte_cap_evicts_the_oldest_over_all_topics() -> None:
    cost = 1000 + ENTRY_OVERHEAD
    ring = ReplayRing(ReplayConfig(messages=100, bytes=65536))
    per_cap = 65536 // cost
    for i in range(200):
        ring.append(f"t{i % 3}", DEV_A, i, b"y" * 1000, 1)
        assert ring.size <= 65536
    assert len(ring) == per_cap
    kept = sorted(e.sequence for t in ("t0", "t1", "t2") for e in ring.entries(t))
    assert kept == list(range(200 - per_cap, 200))  # the newest, whatever their topic


def test_disabled_keeps_nothing() -> None:
    ring = ReplayRing(ReplayConfig(messages=0))
    ring.append("t", DEV_A, 1, b"x", 0)
    assert not ring.enabled
    assert len(ring) == 0
    assert ring.topics() == 0


def test_config_bounds() -> None:
    assert parse_replay({}) == ReplayConfig(1000, 16 * 1024 * 1024)
    assert parse_replay({"messages": 0}).messages == 0
    for bad in ({"messages": -1}, {"messages": 10**6}, {"bytes": 10}, {"bytes": 1 << 40}, {"x": 1}):
        with pytest.raises(ConfigError):
            parse_replay(bad)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 3000)), max_size=300),
    st.integers(1, 20),
)
def test_matches_a_model_of_both_bounds(appends: list[tuple[str, int]], per_topic: int) -> None:
    """Against a brute-force model: the newest ``per_topic`` per topic, then the oldest
    overall dropped until the bytes fit; the bookkeeping list stays bounded."""
    cap = 65536
    ring = ReplayRing(ReplayConfig(messages=per_topic, bytes=cap))
    model: list[tuple[int, str, int]] = []  # (serial, topic, size)
    for serial, (topic, size) in enumerate(appends, start=1):
        ring.append(topic, DEV_A, serial, b"z" * size, 0)
        model.append((serial, topic, size))
        same = [m for m in model if m[1] == topic]
        if len(same) > per_topic:
            model.remove(same[0])
        while sum(m[2] + ENTRY_OVERHEAD for m in model) > cap:
            model.pop(0)
        assert len(ring._all) <= 2 * len(ring) + 64
    got = sorted(e.serial for t in ("a", "b", "c") for e in ring.entries(t))
    assert got == [m[0] for m in model]
    assert ring.size == sum(m[2] + ENTRY_OVERHEAD for m in model)


def test_topic_matches() -> None:
    assert topic_matches("a/+/c", "a/b/c")
    assert topic_matches("a/#", "a/b/c")
    assert topic_matches("#", "a")
    assert not topic_matches("a/+", "a/b/c")
    assert not topic_matches("+/x", "$SYS/x")
    assert topic_matches("a/b", "a/b")
