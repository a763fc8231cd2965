"""Many brokers, one marketplace, on anvil: three real ``blendsm broker`` processes of two
operators (A1, A2 of A; B1 of B) registered in the ``Brokers`` contract, two multi-homed
devices, four paying ``FailoverSubscriber`` buyers with a channel to each operator. The
busiest broker is SIGKILLed mid-stream and started again.

Checked here from the report's raw figures (not only its verdict): every buyer on the
killed broker resumed on another one within 5 s; after de-duplication no buyer misses a
sequence; per channel what the buyer received equals what it vouchered, and what was settled
on chain equals it too, except on the killed broker's channels, which may fall short by what
that broker delivered but had not yet written down when it died (it never claims what it
cannot show; never more than one credit window, never above the vouchers); payouts + fees +
refunds equal the deposits; the killed broker rejoined (its devices' outboxes caught up).
The same scenario is ``blendsm demo --brokers 3`` (tests/cli/test_demo_brokers.py, on the
demo's own chain)."""

from __future__ import annotations

from typing import Any

import pytest

from blendsm.cli._demo_many import run_many_brokers_demo
from blendsm.cli._demo_many_parts import CREDIT, DEPOSIT, FAILOVER_BOUND, TOPICS


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_three_brokers_of_two_operators_one_killed_mid_stream(chain: Any) -> None:
    report = await run_many_brokers_demo(3, 6.0, chain_url=chain.anvil.url, quiet=True)
    f = report.figures
    print(
        f"\nfailover {f['failover_seconds']} s, rejoined in {f['rejoined_seconds']} s,"
        f" uncounted at the kill {f['uncounted_at_kill']} wei"
    )
    assert report.problems == []
    assert f["killed_broker"] == "A1"  # two buyers start there: the busiest
    assert sorted(f["failover_seconds"]) == ["buyer-1", "buyer-2"]
    assert all(0 < s < FAILOVER_BOUND for s in f["failover_seconds"].values())
    assert f["rejoined_seconds"] is not None
    assert f["messages_published"] > 0
    assert set(f["lost_after_dedup"].values()) == {0}
    assert set(f["gaps_reported"].values()) == {0}
    served = {b for per in f["delivered_per_broker"].values() for b in per}
    assert served == {"A1", "B1", "A2"}
    bound = CREDIT * max(TOPICS.values())
    assert len(report.channels) == 8  # 4 buyers x 2 operators
    for ch in report.channels:
        assert ch["received_value"] == ch["vouchered"], ch
        short = ch["vouchered"] - ch["settled_onchain"]
        assert 0 <= short <= (bound if ch["on_killed_broker"] else 0), ch
        assert ch["payout_to_seller"] + ch["fee_to_operator"] == ch["settled_onchain"]
        assert ch["payout_to_seller"] + ch["fee_to_operator"] + ch["refund"] == DEPOSIT
    for letter in "AB":
        assert f["per_operator"][letter]["settled_onchain"] > 0
    assert f["paid_to_seller"] + f["fees_to_operators"] + f["refunded_to_buyers"] == f["deposits"]
