"""The subscription trie against a brute-force MQTT 3.1.1 matcher (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from blendsm.broker._topic_index import TopicIndex

LEVELS = st.sampled_from(["a", "b", "", "$a", "c"])
"""Few level names, so random filters and topics collide often; "" is an empty level and
"$a" a level that makes a topic a ``$`` topic when it comes first."""


def brute_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 4.7, written level by level and independently of the trie."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # 4.7.2: wildcards at the first level never match $ topics
    f = topic_filter.split("/")
    t = topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True  # this level and below, parent included (a/# matches a)
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.one_of(LEVELS, st.just("+")), min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@st.composite
def topics(draw: st.DrawFn) -> str:
    return "/".join(draw(st.lists(LEVELS, min_size=1, max_size=5)))


CLIENTS = st.sampled_from(["c1", "c2", "c3", "c4"])
OPS = st.lists(
    st.tuples(st.booleans(), filters(), CLIENTS, st.integers(0, 2)), min_size=1, max_size=40
)


def expected(subs: dict[tuple[str, str], int], topic: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for (topic_filter, client), qos in subs.items():
        if brute_matches(topic_filter, topic):
            out[client] = max(qos, out.get(client, -1))
    return out


@settings(max_examples=300, deadline=None)
@given(ops=OPS, probes=st.lists(topics(), min_size=1, max_size=10))
def test_match_equals_brute_force_after_adds_and_removals(
    ops: list[tuple[bool, str, str, int]], probes: list[str]
) -> None:
    index: TopicIndex[str] = TopicIndex()
    subs: dict[tuple[str, str], int] = {}
    for add, topic_filter, client, qos in ops:
        if add:
            assert index.add(topic_filter, client, client, qos) == (
                (topic_filter, client) not in subs
            )
            subs[(topic_filter, client)] = qos
        else:
            assert index.remove(topic_filter, client) == ((topic_filter, client) in subs)
            subs.pop((topic_filter, client), None)
    assert len(index) == len(subs)
    assert sorted((f, c, q) for f, c, _, q in index.items()) == sorted(
        (f, c, q) for (f, c), q in subs.items()
    )
    for client in ("c1", "c2", "c3", "c4"):
        assert sorted(index.filters_of(client)) == sorted(f for f, c in subs if c == client)
    for topic in probes:
        got = index.match(topic)
        assert len(got) == len({c for c, _ in got}), "one entry per client"
        assert dict(got) == expected(subs, topic)


@settings(max_examples=100, deadline=None)
@given(ops=OPS)
def test_removing_everything_leaves_an_empty_trie(ops: list[tuple[bool, str, str, int]]) -> None:
    index: TopicIndex[str] = TopicIndex()
    for _, topic_filter, client, qos in ops:
        index.add(topic_filter, client, client, qos, owner="member")
    for client in ("c1", "c2", "c3", "c4"):
        for topic_filter in index.filters_of(client):
            assert index.remove(topic_filter, client)
    assert len(index) == 0
    assert index.owner_count("member") == 0
    assert not index._root.children, "empty branches are pruned"


def test_spec_examples() -> None:
    index: TopicIndex[str] = TopicIndex()
    for n, topic_filter in enumerate(
        ["sport/#", "sport/+", "+", "#", "+/+", "/+", "$SYS/#", "+/monitor/Clients", "a//b"]
    ):
        index.add(topic_filter, f"s{n}", topic_filter, 0)

    def who(topic: str) -> set[str]:
        return {name for name, _ in index.match(topic)}

    assert who("sport") == {"sport/#", "+", "#"}  # a/# matches its parent a
    assert who("sport/tennis") == {"sport/#", "sport/+", "#", "+/+"}
    assert who("/finance") == {"#", "+/+", "/+"}
    assert who("$SYS/monitor/Clients") == {"$SYS/#"}  # no wildcard-first filter
    assert who("$SYS") == {"$SYS/#"}
    assert who("a//b") == {"#", "a//b"}


def test_overlapping_filters_of_one_session_deliver_once_at_the_highest_qos() -> None:
    index: TopicIndex[str] = TopicIndex()
    index.add("a/+", "c", "session", 0)
    index.add("a/#", "c", "session", 2)
    index.add("a/b", "c", "session", 1)
    assert index.match("a/b") == [("session", 2)]


def test_counts_per_client_and_owner() -> None:
    index: TopicIndex[str] = TopicIndex()
    index.add("a", "c1", "s1", 0, owner="0xabc")
    index.add("b", "c1", "s1", 0, owner="0xabc")
    index.add("a", "c2", "s2", 1, owner="0xabc")
    index.add("a", "c3", "s3", 1)  # anonymous: no owner counted
    assert not index.add("a", "c1", "s1", 1, owner="0xabc")  # an update, not a new filter
    assert (index.count("c1"), index.count("c2"), index.owner_count("0xabc")) == (2, 1, 3)
    assert index.has("b", "c1")
    assert not index.has("b", "c2")
    assert ("s1", 1) in index.match("a")
    index.remove("a", "c1")
    assert (index.count("c1"), index.owner_count("0xabc")) == (1, 2)
    assert not index.remove("a", "c1")
