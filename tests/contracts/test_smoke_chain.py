from __future__ import annotations

import pytest

BOTH = pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)


@BOTH
def test_suite_deployed_and_wired(chain) -> None:
    assert chain.Ratings.functions.channels().call() == chain.PaymentChannels.address
    assert chain.Market.functions.registry().call() == chain.Registry.address
    assert chain.PaymentChannels.functions.challengePeriod().call() == 3600
    oracle_role = chain.Registry.functions.ORACLE_ROLE().call()
    assert chain.Registry.functions.hasRole(oracle_role, chain.addr("oracle")).call()


@BOTH
def test_time_travel_and_revert(chain) -> None:
    before = chain.now()
    snap = chain.snapshot()
    chain.time_travel(5000)
    assert chain.now() >= before + 5000
    chain.revert(snap)
    assert chain.now() < before + 5000
