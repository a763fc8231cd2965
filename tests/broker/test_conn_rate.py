"""The per-address connect rate: a token bucket each, IPv6 per /64, and a table that forgets
addresses whose bucket has refilled and never holds more than its maximum."""

from __future__ import annotations

from blendsm.broker._conn_rate import ConnectRate, rate_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate() -> None:
    clock = Clock()
    rate = ConnectRate(2.0, 3, clock=clock)
    assert [rate.admit("10.0.0.1") for _ in range(4)] == [True, True, True, False]
    assert rate.admit("10.0.0.2")  # another address has its own bucket
    clock.now += 0.5  # one token back at 2 per second
    assert rate.admit("10.0.0.1")
    assert not rate.admit("10.0.0.1")


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert rate_key("2001:db8:1:2::5") == rate_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert rate_key("2001:db8:1:3::5") != rate_key("2001:db8:1:2::5")
    assert rate_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert rate_key("unknown") == "unknown"
    rate = ConnectRate(1.0, 1, clock=Clock())
    assert rate.admit("2001:db8::1")
    assert not rate.admit("2001:db8::2")  # same /64


def test_refilled_addresses_are_forgotten() -> None:
    clock = Clock()
    rate = ConnectRate(10.0, 5, clock=clock)
    for i in range(100):
        rate.admit(f"10.0.{i // 256}.{i % 256}")
    assert len(rate) == 100
    clock.now += 0.6  # every bucket full again after 0.5 s; a sweep is due
    rate.admit("10.1.0.1")
    assert len(rate) == 1


def test_the_table_is_bounded() -> None:
    rate = ConnectRate(1.0, 2, max_tracked=50, clock=Clock())
    for i in range(1000):
        assert rate.admit(f"10.0.{i // 256}.{i % 256}")
    assert len(rate) == 50
