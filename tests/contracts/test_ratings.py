"""Ratings: eligibility through real PaymentChannels history (claim, withdraw,
cooperative close), both directions, once per channel per rater, score bounds, parties,
and the x100 integer averages.

Every test runs on the embedded chain and on anvil.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)

CHALLENGE_PERIOD = 3600  # as deployed by tests/conftest.py
DEPOSIT = 10**15


@pytest.fixture
def pc(chain):
    return chain.PaymentChannels.functions


@pytest.fixture
def claimed_channel(chain, pc, tx, open_channel, voucher):
    """A channel buyer -> seller (operator "operator", 1 % fee) with one claim paid."""

    def make(payer="buyer", payee="seller", amount=10**12):
        cid = open_channel(payer, payee, amount=DEPOSIT, operator="operator", fee_bps=100)
        tx(
            pc.claim(cid, pc.channel(cid).call()[5], amount, voucher(payer, cid, amount)),
            "operator",
        )  # anyone may submit
        assert pc.channel(cid).call()[8] == amount
        return cid

    return make


@pytest.fixture(autouse=True)
def members(enrol):
    """Only active Registry participants may rate: admit every account that rates here
    ("operator" stays outside, to be refused)."""
    for label, role in (
        ("buyer", 2),
        ("buyer2", 2),
        ("stranger", 2),
        ("seller", 1),
        ("device", 1),
        ("validator", 4),
    ):
        enrol(label, role)


def score_of(chain, label):
    rt = chain.Ratings.functions
    return tuple(rt.ratingOf(chain.addr(label)).call()), rt.averageX100(chain.addr(label)).call()


def test_wired_to_payment_channels(chain, rt):
    assert rt.channels().call() == chain.PaymentChannels.address


def test_unrated_account(chain, rt):
    assert score_of(chain, "seller") == ((0, 0), 0)
    assert not rt.hasRated(bytes(32), chain.addr("seller")).call()


def test_no_claim_no_rating(chain, rt, pc, tx, reverts, open_channel):
    cid = open_channel("buyer", "seller")
    for label in ("buyer", "seller"):
        with reverts("RatingsChannelNotEligible", cid):
            rt.rate(cid, 5).transact({"from": chain.addr(label)})
    tx(pc.requestClose(cid), "buyer")  # closing is not settled
    for label in ("buyer", "seller"):
        with reverts("RatingsChannelNotEligible", cid):
            rt.rate(cid, 5).transact({"from": chain.addr(label)})
    assert not rt.hasRated(cid, chain.addr("buyer")).call()
    assert score_of(chain, "seller") == ((0, 0), 0)


def test_both_parties_rate_after_a_claim(chain, rt, tx, events, claimed_channel):
    cid = claimed_channel()
    buyer, seller = chain.addr("buyer"), chain.addr("seller")
    receipt = tx(rt.rate(cid, 5), "buyer")
    assert events(receipt) == [
        ("Ratings.Rated", {"channelId": cid, "rater": buyer, "ratee": seller, "score": 5})
    ]
    assert rt.hasRated(cid, buyer).call()
    assert not rt.hasRated(cid, seller).call()
    assert score_of(chain, "seller") == ((1, 5), 500)
    assert score_of(chain, "buyer") == ((0, 0), 0)

    receipt = tx(rt.rate(cid, 2), "seller")
    assert events(receipt) == [
        ("Ratings.Rated", {"channelId": cid, "rater": seller, "ratee": buyer, "score": 2})
    ]
    assert rt.hasRated(cid, seller).call()
    assert score_of(chain, "buyer") == ((1, 2), 200)
    assert score_of(chain, "seller") == ((1, 5), 500)


def test_rating_after_withdraw_without_claims(chain, rt, pc, tx, events, reverts, open_channel):
    cid = open_channel("buyer", "seller")
    tx(pc.requestClose(cid), "buyer")
    chain.time_travel(CHALLENGE_PERIOD)
    tx(pc.withdraw(cid), "buyer")
    channel = pc.channel(cid).call()
    assert channel[3] is True  # settled
    assert channel[8] == 0  # nothing claimed
    assert events(tx(rt.rate(cid, 1), "buyer"), "Rated") == [
        {"channelId": cid, "rater": chain.addr("buyer"), "ratee": chain.addr("seller"), "score": 1}
    ]
    assert events(tx(rt.rate(cid, 4), "seller"), "Rated") == [
        {"channelId": cid, "rater": chain.addr("seller"), "ratee": chain.addr("buyer"), "score": 4}
    ]
    assert score_of(chain, "seller") == ((1, 1), 100)
    assert score_of(chain, "buyer") == ((1, 4), 400)


def test_rating_after_cooperative_close_without_claims(chain, rt, pc, tx, open_channel):
    cid = open_channel("buyer", "seller")
    tx(pc.cooperativeClose(cid, pc.channel(cid).call()[5], 0, b""), "seller")
    channel = pc.channel(cid).call()
    assert channel[3] is True
    assert channel[8] == 0
    tx(rt.rate(cid, 3), "seller")
    tx(rt.rate(cid, 5), "buyer")
    assert score_of(chain, "buyer") == ((1, 3), 300)
    assert score_of(chain, "seller") == ((1, 5), 500)


def test_rating_after_cooperative_close_with_final_voucher(
    chain, rt, pc, tx, open_channel, voucher
):
    cid = open_channel("buyer", "seller")
    tx(
        pc.cooperativeClose(cid, pc.channel(cid).call()[5], 777, voucher("buyer", cid, 777)),
        "seller",
    )
    assert pc.channel(cid).call()[8] == 777
    tx(rt.rate(cid, 4), "buyer")
    assert score_of(chain, "seller") == ((1, 4), 400)


def test_rating_still_allowed_after_claimed_channel_is_settled(chain, rt, pc, tx, claimed_channel):
    cid = claimed_channel()
    tx(pc.requestClose(cid), "buyer")
    chain.time_travel(CHALLENGE_PERIOD)
    tx(pc.withdraw(cid), "buyer")
    tx(rt.rate(cid, 4), "seller")
    assert score_of(chain, "buyer") == ((1, 4), 400)


def test_once_per_channel_per_rater(chain, rt, tx, reverts, claimed_channel):
    cid = claimed_channel()
    buyer = chain.addr("buyer")
    tx(rt.rate(cid, 5), "buyer")
    for score in (5, 1):
        with reverts("RatingsAlreadyRated", cid, buyer):
            rt.rate(cid, score).transact({"from": buyer})
    tx(rt.rate(cid, 3), "seller")  # the other side still may
    with reverts("RatingsAlreadyRated", cid, chain.addr("seller")):
        rt.rate(cid, 3).transact({"from": chain.addr("seller")})
    # a second deal between the same parties is a second rating
    cid2 = claimed_channel()
    assert cid2 != cid
    assert not rt.hasRated(cid2, buyer).call()
    tx(rt.rate(cid2, 3), "buyer")
    assert score_of(chain, "seller") == ((2, 8), 400)
    assert score_of(chain, "buyer") == ((1, 3), 300)


def test_score_bounds(chain, rt, tx, reverts, claimed_channel):
    cid = claimed_channel()
    for score in (0, 6, 7, 255):
        with reverts("RatingsInvalidScore", score):
            rt.rate(cid, score).transact({"from": chain.addr("buyer")})
    # the score is checked first, before who calls
    with reverts("RatingsInvalidScore", 0):
        rt.rate(cid, 0).transact({"from": chain.addr("stranger")})
    assert not rt.hasRated(cid, chain.addr("buyer")).call()
    tx(rt.rate(cid, 1), "buyer")
    tx(rt.rate(cid, 5), "seller")
    assert score_of(chain, "seller") == ((1, 1), 100)
    assert score_of(chain, "buyer") == ((1, 5), 500)


def test_only_the_two_parties_rate(chain, rt, tx, reverts, claimed_channel, open_channel):
    cid = claimed_channel()
    # the channel's operator, the oracle, a stranger, a party of another channel
    other = open_channel("buyer2", "device")
    for label in ("operator", "oracle", "stranger", "buyer2", "device"):
        caller = chain.addr(label)
        with reverts("RatingsNotParty", cid, caller):
            rt.rate(cid, 3).transact({"from": caller})
    with reverts("RatingsNotParty", other, chain.addr("buyer")):
        rt.rate(other, 3).transact({"from": chain.addr("buyer")})


def test_unknown_channel_is_no_party_of_anyone(chain, rt, reverts):
    unknown = b"\x42" * 32
    for label in ("buyer", "seller", "stranger"):
        with reverts("RatingsNotParty", unknown, chain.addr(label)):
            rt.rate(unknown, 3).transact({"from": chain.addr(label)})


def test_party_check_comes_before_eligibility_and_repeat(chain, rt, tx, reverts, open_channel):
    cid = open_channel("buyer", "seller")  # not eligible
    with reverts("RatingsNotParty", cid, chain.addr("stranger")):
        rt.rate(cid, 3).transact({"from": chain.addr("stranger")})


def test_averages_are_x100_integer_division(chain, rt, tx, claimed_channel):
    # seller rated 5, 4, 4 by three payers: 1300 / 3 = 433 (floor of 433.3)
    for payer, score in (("buyer", 5), ("buyer2", 4), ("stranger", 4)):
        tx(rt.rate(claimed_channel(payer=payer), score), payer)
    assert score_of(chain, "seller") == ((3, 13), 433)
    # buyer rated 2, 2, 1 by three payees: 500 / 3 = 166 (floor of 166.7: no rounding up)
    for payee, score in (("seller", 2), ("device", 2), ("validator", 1)):
        tx(rt.rate(claimed_channel(payee=payee), score), payee)
    assert score_of(chain, "buyer") == ((3, 5), 166)
    # ratings received as payer and as payee add up on one address
    tx(rt.rate(claimed_channel(payer="seller", payee="buyer"), 3), "seller")
    assert score_of(chain, "buyer") == ((4, 8), 200)
    assert score_of(chain, "stranger") == ((0, 0), 0)


def test_only_active_participants_rate(chain, rt, tx, reverts, claimed_channel):
    # A payer outside the Registry did business but may not rate.
    cid = claimed_channel(payer="operator")
    with reverts("RatingsRaterNotActive", chain.addr("operator")):
        rt.rate(cid, 1).transact({"from": chain.addr("operator")})
    tx(rt.rate(cid, 5), "seller")  # the member on the other side still may
    # A revoked member loses the right too; its counterpart keeps it.
    cid = claimed_channel()
    tx(chain.Registry.functions.revoke(chain.addr("buyer")), "oracle")
    with reverts("RatingsRaterNotActive", chain.addr("buyer")):
        rt.rate(cid, 1).transact({"from": chain.addr("buyer")})
    assert score_of(chain, "seller") == ((0, 0), 0)
    tx(rt.rate(cid, 2), "seller")
    assert score_of(chain, "buyer") == ((1, 2), 200)


def test_wired_to_registry(chain, rt):
    assert rt.registry().call() == chain.Registry.address
