"""PaymentChannels lanes (issue 14): one channel, one cumulative counter per broker key.

A lane is the channel operator's own address or a broker key that operator registered in
Brokers. Each lane is claimed on its own; together they never take more than the deposit (the
lane claimed last is paid short, and its ChannelClaimed shows it), no lane is paid twice, a
lane of nobody (or of another operator) is refused, and a version-1 voucher (no lane) never
verifies. Vouchers are signed with the device SDK and checked against the contract's own
``voucherDigest``. Runs on the embedded chain and on anvil.
"""

from __future__ import annotations

from typing import Any

import pytest
from eth_abi import encode
from eth_utils import keccak

from blendsm.contracts import test_account
from blendsm.device_sdk import (
    ChannelState,
    Voucher,
    VoucherDomain,
    VoucherVerifier,
    recover_voucher_signer,
    sign_voucher,
)
from blendsm.errors import VoucherLaneError, VoucherNotNewerError

pytestmark = pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)

ZERO = "0x" + "00" * 20
SELLER, BUYER, OPERATOR = 1, 2, 3
# TEST-ONLY broker keys: they never send a transaction, their operator registers them.
LANE_A = test_account("lane-broker-a").address
LANE_B = test_account("lane-broker-b").address
FOREIGN = test_account("lane-broker-foreign").address


@pytest.fixture
def pc(chain: Any) -> Any:
    return chain.PaymentChannels


@pytest.fixture
def world(chain: Any, enrol: Any, tx: Any, brk: Any) -> dict[str, str]:
    """operator runs brokers A and B; validator (a second operator) runs FOREIGN."""
    enrol("operator", OPERATOR)
    enrol("validator", OPERATOR)
    enrol("seller", SELLER)
    enrol("buyer", BUYER)
    tx(brk.registerBroker(LANE_A, "mqtt://a.example:1883"), "operator")
    tx(brk.registerBroker(LANE_B, "mqtt://b.example:1883"), "operator")
    tx(brk.registerBroker(FOREIGN, "mqtt://f.example:1883"), "validator")
    return {"op": chain.addr("operator")}


def sign(chain: Any, pc: Any, cid: bytes, lane: str, amount: int, who: str = "buyer") -> bytes:
    domain = VoucherDomain(chain.w3.eth.chain_id, pc.address)
    voucher = sign_voucher(bytes(chain.accounts[who].key), domain, cid, lane, amount)
    assert domain.digest(cid, lane, amount) == bytes(
        pc.functions.voucherDigest(cid, lane, amount).call()
    )
    return voucher.signature


def claimed(pc: Any, cid: bytes, lane: str) -> tuple[int, int]:
    """(lane claimed, total claimed over all lanes)."""
    return pc.functions.laneClaimed(cid, lane).call(), pc.functions.channel(cid).call()[8]


def claim(chain: Any, pc: Any, tx: Any, events: Any, cid: bytes, lane: str, amount: int) -> Any:
    receipt = tx(
        pc.functions.claim(cid, lane, amount, sign(chain, pc, cid, lane, amount)), "stranger"
    )
    (ev,) = events(receipt, "ChannelClaimed")
    return ev


def test_two_lanes_are_claimed_independently(
    chain: Any, pc: Any, tx: Any, events: Any, reverts: Any, world: Any, open_channel: Any
) -> None:
    cid = open_channel("buyer", "seller", 1000, "operator", 100)
    seller_before = chain.w3.eth.get_balance(chain.addr("seller"))
    assert claim(chain, pc, tx, events, cid, LANE_A, 300) == {
        "channelId": cid,
        "lane": LANE_A,
        "cumulativeAmount": 300,
        "payout": 300,
        "fee": 3,
        "laneClaimed": 300,
        "totalClaimed": 300,
    }
    ev = claim(chain, pc, tx, events, cid, LANE_B, 500)
    assert (ev["lane"], ev["payout"], ev["laneClaimed"], ev["totalClaimed"]) == (
        LANE_B,
        500,
        500,
        800,
    )
    ev = claim(chain, pc, tx, events, cid, LANE_A, 350)  # A's counter goes on from its own 300
    assert (ev["payout"], ev["laneClaimed"], ev["totalClaimed"]) == (50, 350, 850)
    ev = claim(chain, pc, tx, events, cid, world["op"], 100)  # the operator's own lane
    assert (ev["payout"], ev["laneClaimed"], ev["totalClaimed"]) == (100, 100, 950)
    assert claimed(pc, cid, LANE_A) == (350, 950)
    assert claimed(pc, cid, LANE_B) == (500, 950)
    assert chain.w3.eth.get_balance(chain.addr("seller")) - seller_before == 950 - 9
    # no lane is paid twice: the same voucher again pays nothing
    sig = sign(chain, pc, cid, LANE_B, 500)
    with reverts("PaymentChannelsNothingToClaim", 500, 500):
        pc.functions.claim(cid, LANE_B, 500, sig).transact({"from": chain.addr("stranger")})
    # a voucher of lane A submitted as lane B does not verify (the lane is signed)
    sig_a = sign(chain, pc, cid, LANE_A, 900)
    domain = VoucherDomain(chain.w3.eth.chain_id, pc.address)
    signer = recover_voucher_signer(domain, Voucher(cid, LANE_B, 900, sig_a))
    assert signer != chain.addr("buyer")
    with reverts("PaymentChannelsInvalidSigner", signer):
        pc.functions.claim(cid, LANE_B, 900, sig_a).transact({"from": chain.addr("stranger")})


def test_lanes_together_never_exceed_the_deposit(
    chain: Any, pc: Any, tx: Any, events: Any, reverts: Any, world: Any, open_channel: Any
) -> None:
    """An overcommitting payer: A 600 + B 700 on a deposit of 1000. B, claimed last, is paid
    short (400); its event shows laneClaimed 400 < cumulativeAmount 700. A top-up pays B the
    rest of the same voucher, never more."""
    cid = open_channel("buyer", "seller", 1000, "operator", 0)
    claim(chain, pc, tx, events, cid, LANE_A, 600)
    ev = claim(chain, pc, tx, events, cid, LANE_B, 700)
    assert (ev["cumulativeAmount"], ev["payout"], ev["laneClaimed"], ev["totalClaimed"]) == (
        700,
        400,
        400,
        1000,
    )
    sig = sign(chain, pc, cid, LANE_B, 700)
    with reverts("PaymentChannelsNothingToClaim", 700, 400):
        pc.functions.claim(cid, LANE_B, 700, sig).transact({"from": chain.addr("stranger")})
    sig_a = sign(chain, pc, cid, LANE_A, 650)
    with reverts("PaymentChannelsNothingToClaim", 650, 600):
        pc.functions.claim(cid, LANE_A, 650, sig_a).transact({"from": chain.addr("stranger")})
    tx(pc.functions.topUp(cid, 500), "buyer", value=500)
    ev = claim(chain, pc, tx, events, cid, LANE_B, 700)
    assert (ev["payout"], ev["laneClaimed"], ev["totalClaimed"]) == (300, 700, 1300)
    ev = claim(chain, pc, tx, events, cid, LANE_A, 900)
    assert (ev["payout"], ev["laneClaimed"], ev["totalClaimed"]) == (200, 800, 1500)
    # the broker's verifier predicts the same cap per lane
    domain = VoucherDomain(chain.w3.eth.chain_id, pc.address)
    state = ChannelState(chain.addr("buyer"), 1500, 1500, lane=LANE_A, lane_claimed=800)
    with pytest.raises(VoucherNotNewerError):
        VoucherVerifier(domain).verify(
            Voucher(cid, LANE_A, 900, sign(chain, pc, cid, LANE_A, 900)), state, 0
        )
    with pytest.raises(VoucherLaneError):
        VoucherVerifier(domain).verify(
            Voucher(cid, LANE_B, 900, sign(chain, pc, cid, LANE_B, 900)), state, 0
        )


def test_a_lane_of_nobody_or_of_another_operator_is_refused(
    chain: Any, pc: Any, tx: Any, events: Any, reverts: Any, brk: Any, world: Any, open_channel: Any
) -> None:
    cid = open_channel("buyer", "seller", 1000, "operator", 0)
    stranger_lane = test_account("lane-nobody").address
    for lane in (stranger_lane, FOREIGN, chain.addr("validator"), ZERO):
        assert pc.functions.isLane(cid, lane).call() is False
        sig = sign(chain, pc, cid, lane, 100)
        with reverts("PaymentChannelsInvalidLane", lane):
            pc.functions.claim(cid, lane, 100, sig).transact({"from": chain.addr("stranger")})
    # retired still counts: a broker retired after delivering is paid for what it delivered
    tx(brk.retireBroker(LANE_A), "operator")
    assert pc.functions.isLane(cid, LANE_A).call() is True
    assert claim(chain, pc, tx, events, cid, LANE_A, 100)["payout"] == 100
    # a channel with no operator has one lane, address zero
    bare = open_channel("buyer", "seller", 1000, None, 0)
    assert pc.functions.isLane(bare, ZERO).call() is True
    assert pc.functions.isLane(bare, LANE_B).call() is False
    assert claim(chain, pc, tx, events, bare, ZERO, 10)["payout"] == 10


def test_a_version_1_voucher_does_not_verify(
    chain: Any, pc: Any, reverts: Any, world: Any, open_channel: Any
) -> None:
    """The payer's signature over the lane-less v1 digest (domain version "1", type without
    lane) recovers to someone else under v2, so the claim fails on the signer."""
    import coincurve

    cid = open_channel("buyer", "seller", 1000, "operator", 0)
    chain_id = chain.w3.eth.chain_id
    separator = keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [
                keccak(
                    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
                ),
                keccak(text="BlendSM PaymentChannels"),
                keccak(text="1"),
                chain_id,
                pc.address,
            ],
        )
    )
    struct = keccak(
        encode(
            ["bytes32", "bytes32", "uint256"],
            [keccak(text="Voucher(bytes32 channelId,uint256 cumulativeAmount)"), cid, 500],
        )
    )
    v1_digest = keccak(b"\x19\x01" + separator + struct)
    key = coincurve.PrivateKey(bytes(chain.accounts["buyer"].key))
    raw = key.sign_recoverable(v1_digest, hasher=None)
    sig = raw[:64] + bytes([raw[64] + 27])
    lane = world["op"]
    assert v1_digest != bytes(pc.functions.voucherDigest(cid, lane, 500).call())
    domain = VoucherDomain(chain_id, pc.address)
    signer = recover_voucher_signer(domain, Voucher(cid, lane, 500, sig))
    assert signer != chain.addr("buyer")
    with reverts("PaymentChannelsInvalidSigner", signer):
        pc.functions.claim(cid, lane, 500, sig).transact({"from": chain.addr("stranger")})
    assert pc.functions.laneClaimed(cid, lane).call() == 0


def test_brokers_is_wired_once_by_the_deployer(chain: Any, pc: Any, reverts: Any) -> None:
    assert pc.functions.brokers().call() == chain.Brokers.address
    assert pc.functions.deployer().call() == chain.addr("oracle")
    for sender in ("oracle", "stranger"):
        with reverts("PaymentChannelsBrokersNotSettable", chain.addr(sender)):
            pc.functions.setBrokers(chain.Brokers.address).transact({"from": chain.addr(sender)})
