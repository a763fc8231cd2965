"""The leaf store's cache of recent trees: bounded by trees and by leaves, newest kept."""

from __future__ import annotations

import sqlite3

from blendsm.broker._durable import fetch_pausing
from blendsm.broker._tree_cache import TreeCache
from blendsm.device_sdk import MerkleTree, leaf_hash


def tree(n: int) -> MerkleTree:
    return MerkleTree([leaf_hash(i.to_bytes(4, "big")) for i in range(n)])


def test_the_cache_evicts_the_least_recently_used_past_either_bound() -> None:
    cache = TreeCache(max_trees=3, max_leaves=100)
    for batch_id in (1, 2, 3):
        cache.put(batch_id, tree(10))
    assert cache.get(1) is not None  # 1 is now the most recently used
    cache.put(4, tree(10))  # a fourth tree: 2 goes
    assert cache.batch_ids() == [3, 1, 4]
    cache.put(5, tree(81))  # four trees: 3 goes; 101 leaves: 1 goes too
    assert cache.batch_ids() == [4, 5]
    assert cache.leaves == 91
    cache.put(6, tree(500))  # larger than the bound alone: the newest is still kept
    assert cache.batch_ids() == [6]
    assert cache.leaves == 500
    cache.forget(6)
    assert cache.batch_ids() == []
    assert cache.leaves == 0
    assert cache.get(6) is None


def test_fetch_pausing_returns_what_fetchall_does() -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (i INTEGER)")
    db.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1500)])
    for limit in (0, 1, 511, 512, 513, 1024, 1500):
        query = "SELECT i FROM t ORDER BY i LIMIT ?"
        assert fetch_pausing(db.execute(query, (limit,))) == db.execute(query, (limit,)).fetchall()
    db.close()
