"""ConnectionLimits: the global and per-address connection caps, and their bookkeeping."""

from __future__ import annotations

import resource

from blendsm.broker._conn_limits import FD_RESERVE, ConnectionLimits, descriptor_budget


def test_per_address_cap_and_release() -> None:
    limits = ConnectionLimits(max_total=100, max_per_ip=2)
    assert limits.enter("10.0.0.1") is None
    assert limits.enter("10.0.0.1") is None
    refused = limits.enter("10.0.0.1")
    assert refused is not None
    assert "max_connections_per_ip 2" in refused
    assert limits.enter("10.0.0.2") is None  # another address is not affected
    limits.leave("10.0.0.1")
    assert limits.enter("10.0.0.1") is None
    assert limits.total == 3


def test_global_cap() -> None:
    limits = ConnectionLimits(max_total=2, max_per_ip=10)
    assert limits.enter("a") is None
    assert limits.enter("b") is None
    refused = limits.enter("c")
    assert refused is not None
    assert "max_connections 2" in refused
    assert limits.total == 2
    assert "c" not in limits.per_ip


def test_the_address_map_holds_only_open_connections() -> None:
    limits = ConnectionLimits(max_total=10**6, max_per_ip=10)
    for i in range(1000):
        address = f"192.0.2.{i % 250}:{i}"
        assert limits.enter(address) is None
        limits.leave(address)
    assert limits.per_ip == {}
    assert limits.total == 0


def test_the_global_cap_keeps_descriptors_for_the_broker() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert descriptor_budget() == max(0, soft - FD_RESERVE)
    assert ConnectionLimits(max_total=10**9, max_per_ip=1).max_total == descriptor_budget()
