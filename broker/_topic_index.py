"""A topic trie of subscription filters: a publish costs O(topic levels + matches).

amqtt 0.12.1 matches a publish by scanning every subscription filter of every client and
splitting each one (``Broker._matches``), so one member holding 10,000 filters slowed every
other subscriber's delivery tenfold. :class:`TopicIndex` keeps the same filters in a trie keyed
by topic level; a publish walks only the branches its levels (and the ``+``/``#`` wildcards)
lead to.

Matching follows MQTT 3.1.1 (4.7): ``+`` matches exactly one level, ``#`` (last level only)
matches its parent level and every level below it (``a/#`` matches ``a``, ``a/b``, ``a/b/c``),
levels may be empty (``a//b``, ``/a``), and a topic starting with ``$`` is not matched by a
filter whose first level is a wildcard (``$SYS/x`` is not matched by ``#`` or ``+/x``). Filters
are assumed valid (amqtt refuses invalid ones before they reach the index).

Subscribers are keyed by client id: amqtt's ``Session`` compares by client id and is not
hashable, and amqtt keeps one subscription per (filter, client id).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["TopicIndex"]

V = TypeVar("V")
"""What the index hands back for a subscriber (the broker stores the amqtt ``Session``)."""


class _Node(Generic[V]):
    """One topic level: children by level text (``+`` and ``#`` are the wildcard children)
    and the subscribers of the filter that ends here."""

    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.subscribers: dict[str, tuple[V, int]] = {}


class TopicIndex(Generic[V]):
    """Subscription filters in a trie: filter -> {client id: (subscriber, granted QoS)}.

    ``add``/``remove`` cost O(filter levels); ``match`` O(topic levels + matching filters).
    Each client id also records its filters and an optional ``owner`` (e.g. the identity's
    address), so per-session and per-owner caps and "remove every filter of this session"
    cost O(that session's filters), not O(all filters)."""

    __slots__ = ("_by_client", "_owner_count", "_owner_of", "_root", "_size")

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self._by_client: dict[str, set[str]] = {}
        self._owner_of: dict[str, Hashable] = {}
        self._owner_count: dict[Hashable, int] = {}
        self._size = 0

    def __len__(self) -> int:
        """Subscriptions held: (filter, client id) pairs."""
        return self._size

    def add(
        self, topic_filter: str, client_id: str, subscriber: V, qos: int, owner: Hashable = None
    ) -> bool:
        """Record (or update) the subscription of ``client_id`` to ``topic_filter``; True if
        it is new. ``owner`` is counted for :meth:`owner_count` (``None``: not counted); a
        client id keeps the owner of its first filter until it has none left."""
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        new = client_id not in node.subscribers
        node.subscribers[client_id] = (subscriber, qos)
        if new:
            self._size += 1
            filters = self._by_client.get(client_id)
            if filters is None:
                filters = self._by_client[client_id] = set()
                if owner is not None:
                    self._owner_of[client_id] = owner
            filters.add(topic_filter)
            counted = self._owner_of.get(client_id)
            if counted is not None:
                self._owner_count[counted] = self._owner_count.get(counted, 0) + 1
        return new

    def remove(self, topic_filter: str, client_id: str) -> bool:
        """Forget the subscription of ``client_id`` to ``topic_filter``; True if it existed.
        Branches left empty are pruned, so the trie never outgrows the live filters."""
        path: list[tuple[_Node[V], str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if node.subscribers.pop(client_id, None) is None:
            return False
        self._size -= 1
        filters = self._by_client[client_id]
        filters.discard(topic_filter)
        owner = self._owner_of.get(client_id)
        if owner is not None:
            left = self._owner_count[owner] - 1
            if left:
                self._owner_count[owner] = left
            else:
                del self._owner_count[owner]
        if not filters:
            del self._by_client[client_id]
            self._owner_of.pop(client_id, None)
        for parent, level in reversed(path):
            if node.subscribers or node.children:
                break
            del parent.children[level]
            node = parent
        return True

    def filters_of(self, client_id: str) -> list[str]:
        """The filters ``client_id`` holds (a copy: safe to remove while iterating)."""
        return list(self._by_client.get(client_id, ()))

    def count(self, client_id: str) -> int:
        """How many filters ``client_id`` holds."""
        filters = self._by_client.get(client_id)
        return len(filters) if filters is not None else 0

    def owner_count(self, owner: Hashable) -> int:
        """How many filters the client ids recorded with ``owner`` hold together."""
        return self._owner_count.get(owner, 0)

    def has(self, topic_filter: str, client_id: str) -> bool:
        """Whether ``client_id`` holds ``topic_filter``."""
        filters = self._by_client.get(client_id)
        return filters is not None and topic_filter in filters

    def match(self, topic: str) -> list[tuple[V, int]]:
        """Every subscriber with a filter matching ``topic``, once per client id, with the
        highest granted QoS among its matching filters.

        MQTT 3.1.1 (3.3.5) lets a server deliver overlapping subscriptions either as one
        copy at the highest QoS or as one copy per filter; one copy means a paying subscriber
        is charged once per message, whatever its filters overlap."""
        levels = topic.split("/")
        last = len(levels)
        dollar = topic.startswith("$")
        found: dict[str, tuple[V, int]] = {}
        stack: list[tuple[_Node[V], int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            children = node.children
            wildcards_ok = depth or not dollar
            if wildcards_ok:
                rest = children.get("#")
                if rest is not None:
                    _collect(rest, found)
            if depth == last:
                _collect(node, found)
                continue
            exact = children.get(levels[depth])
            if exact is not None:
                stack.append((exact, depth + 1))
            if wildcards_ok:
                one = children.get("+")
                if one is not None and one is not exact:
                    stack.append((one, depth + 1))
        return list(found.values())

    def items(self) -> Iterator[tuple[str, str, V, int]]:
        """Every (filter, client id, subscriber, QoS), for checks and tests."""
        stack: list[tuple[_Node[V], tuple[str, ...]]] = [(self._root, ())]
        while stack:
            node, path = stack.pop()
            if path:
                topic_filter = "/".join(path)
                for client_id, (subscriber, qos) in node.subscribers.items():
                    yield topic_filter, client_id, subscriber, qos
            for level, child in node.children.items():
                stack.append((child, (*path, level)))


def _collect(node: _Node[V], found: dict[str, tuple[V, int]]) -> None:
    for client_id, entry in node.subscribers.items():
        seen = found.get(client_id)
        if seen is None or seen[1] < entry[1]:
            found[client_id] = entry
