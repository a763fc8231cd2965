"""One table of vouchers, each judged by the contract AND by the Python verifier the broker
runs; they must agree on every row (the broker must never accept a voucher the contract
refuses, nor refuse one it would pay).

Every row starts from the same channel: native coin, payer ``buyer``, payee ``seller``,
operator fee 2.5 %, deposit 1000 wei, 400 already claimed. A row may change the chain first
(close, settle, time travel), then builds the ``(channel id, cumulative, signature)`` triple
that is submitted, pins the block time ``T`` of the claim, and:

- contract: ``claim`` simulated with ``eth_call`` on the pending block at ``T`` (pays, or the
  revert's custom error); rows that pay are then really sent at ``T`` and the payout is
  checked in the event and in the balances;
- Python: ``VoucherVerifier(domain).verify(Voucher(...), ChannelState(<channel() at T>), T)``.

How a contract error maps to the Python exception (exact class, not a parent):

==================================  ===========================
PaymentChannelsUnknownChannel       VoucherChannelError
PaymentChannelsChannelSettled       VoucherChannelError
PaymentChannelsChallengePeriodOver  VoucherChannelError
PaymentChannelsInvalidSignature     VoucherSignatureError
PaymentChannelsInvalidSigner        VoucherSignatureError
PaymentChannelsNothingToClaim       VoucherNotNewerError
==================================  ===========================

For InvalidSigner rows the address the contract recovered must also equal
``recover_voucher_signer``'s, and for InvalidSignature rows ``recover_voucher_signer`` must
raise: the two sides agree on *who* signed, not only on the verdict.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from eth_abi import decode
from eth_tester.exceptions import TransactionFailed
from eth_utils import function_signature_to_4byte_selector, keccak, to_checksum_address
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD

from blendsm.device_sdk import (
    SECP256K1_HALF_N,
    SECP256K1_N,
    ChannelState,
    Voucher,
    VoucherDomain,
    VoucherVerifier,
    high_s_twin,
    recover_voucher_signer,
    sign_voucher,
)
from blendsm.errors import (
    VoucherChannelError,
    VoucherError,
    VoucherLaneError,
    VoucherNotNewerError,
    VoucherSignatureError,
)

pytestmark = pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)

ZERO = "0x" + "00" * 20
CHALLENGE_PERIOD = 3600
DEPOSIT = 1000
CLAIMED = 400
FEE_BPS = 250
GAS = 1_000_000
SECP256K1_P = 2**256 - 2**32 - 977

#: Contract custom error -> the Python exception class the verifier must raise.
CONTRACT_TO_PYTHON: dict[str, type[VoucherError]] = {
    "PaymentChannelsUnknownChannel": VoucherChannelError,
    "PaymentChannelsChannelSettled": VoucherChannelError,
    "PaymentChannelsChallengePeriodOver": VoucherChannelError,
    "PaymentChannelsInvalidSignature": VoucherSignatureError,
    "PaymentChannelsInvalidSigner": VoucherSignatureError,
    "PaymentChannelsNothingToClaim": VoucherNotNewerError,
    # the broker pins its own lane (a valid one): another lane is VoucherLaneError there
    "PaymentChannelsInvalidLane": VoucherLaneError,
}

_ERRORS = {
    function_signature_to_4byte_selector(sig): (sig.split("(")[0], types)
    for sig, types in [
        ("PaymentChannelsUnknownChannel(bytes32)", ["bytes32"]),
        ("PaymentChannelsChannelSettled(bytes32)", ["bytes32"]),
        ("PaymentChannelsChallengePeriodOver(uint64)", ["uint64"]),
        ("PaymentChannelsInvalidSignature()", []),
        ("PaymentChannelsInvalidSigner(address)", ["address"]),
        ("PaymentChannelsNothingToClaim(uint256,uint256)", ["uint256", "uint256"]),
        ("PaymentChannelsInvalidLane(address)", ["address"]),
        ("Panic(uint256)", ["uint256"]),
        ("FailedCall()", []),
    ]
}


# --------------------------------------------------------------------------------------------
# outcomes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pays:
    amount: int


@dataclass(frozen=True)
class Refused:
    error: str  # the contract's custom error name
    args: tuple[Any, ...] = field(default=(), compare=False)


Outcome = Pays | Refused


def _revert_bytes(exc: BaseException) -> bytes:
    if isinstance(exc, ContractLogicError):
        data = exc.data.get("data") if isinstance(exc.data, dict) else exc.data
        return bytes.fromhex(str(data)[2:]) if data else b""
    message = str(exc.args[0])
    prefix = "execution reverted: "
    assert message.startswith(prefix), message
    return bytes(ast.literal_eval(message[len(prefix) :]))


def contract_outcome(
    chain: Any, t: int, channel_id: bytes, lane: str, cumulative: int, signature: bytes
) -> Outcome:
    """What claim does in a block at ``t``.

    Simulated first on the pending block at ``t``; if it would pay, the claim is really sent
    in a block at ``t`` (by a stranger: anyone may claim) and the payout read from its event,
    with the payee's, operator's and contract's balances checked against payout and fee.
    """
    pc = chain.PaymentChannels
    next_at(chain, t)
    fn = pc.functions.claim(channel_id, lane, cumulative, signature)
    try:
        fn.call({"from": chain.addr("stranger")}, block_identifier="pending")
    except (ContractLogicError, TransactionFailed) as exc:
        data = _revert_bytes(exc)
        name, types = _ERRORS.get(data[:4], (f"unknown 0x{data.hex()}", []))
        args = tuple(
            to_checksum_address(a) if ty == "address" else a
            for ty, a in zip(types, decode(types, data[4:]), strict=True)
        )
        return Refused(name, args)

    fee_bps, token_address = (
        pc.functions.channel(channel_id).call()[1],
        pc.functions.channel(channel_id).call()[6],
    )
    token = None if token_address == ZERO else chain.Token
    parties = (chain.addr("seller"), chain.addr("operator"), pc.address)
    before = [chain.balance(token, who) for who in parties]
    receipt = chain.w3.eth.wait_for_transaction_receipt(
        fn.transact({"from": chain.addr("stranger"), "gas": GAS})
    )
    assert receipt["status"] == 1, "eth_call said it pays, the transaction reverted"
    assert chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"] == t
    (log,) = pc.events.ChannelClaimed().process_receipt(receipt, errors=DISCARD)
    payout, fee = log["args"]["payout"], log["args"]["fee"]
    assert fee == payout * fee_bps // 10_000
    after = [chain.balance(token, who) for who in parties]
    assert [a - b for a, b in zip(after, before, strict=True)] == [payout - fee, fee, -payout]
    return Pays(payout)


def python_outcome(
    chain: Any,
    domain: VoucherDomain,
    t: int,
    channel_id: bytes,
    lane: str,
    cumulative: int,
    signature: bytes,
) -> tuple[type[VoucherError] | None, int | None]:
    """The verifier as a broker runs it: pinned to its own lane, the operator's (valid)."""
    payer, _fee, closes_at, settled, _payee, _op, _token, deposit, claimed = (
        chain.PaymentChannels.functions.channel(channel_id).call()
    )
    own = chain.addr("operator")
    lane_claimed = chain.PaymentChannels.functions.laneClaimed(channel_id, own).call()
    state = ChannelState(
        payer, deposit, claimed, closes_at or None, settled, lane=own, lane_claimed=lane_claimed
    )
    try:
        return None, VoucherVerifier(domain).verify(
            Voucher(channel_id, lane, cumulative, signature), state, t
        )
    except VoucherError as exc:
        return type(exc), None


def next_at(chain: Any, timestamp: int) -> None:
    if chain.tester is not None:
        chain.tester.time_travel(timestamp)
    else:
        chain.w3.provider.make_request("evm_setNextBlockTimestamp", [timestamp])


def next_free_time(chain: Any) -> int:
    """The earliest time the next block may have on either chain."""
    pending = int(chain.w3.eth.get_block("pending")["timestamp"])
    return max(chain.now() + 1, pending)


# --------------------------------------------------------------------------------------------
# the scene every row starts from
# --------------------------------------------------------------------------------------------


@dataclass
class Scene:
    chain: Any
    domain: VoucherDomain
    cid: bytes  # the channel under test: deposit 1000, claimed 400, fee 2.5 %
    other: bytes  # another open channel of the same payer and payee
    lane: str = ZERO  # the lane signed and claimed; the scene sets the operator's own
    closes_at: int | None = None
    t: int | None = None  # block time of the claim; None: the next free second

    def key(self, label: str) -> bytes:
        return bytes(self.chain.accounts[label].key)

    def sign(
        self,
        cumulative: int,
        *,
        label: str = "buyer",
        channel: bytes | None = None,
        domain: VoucherDomain | None = None,
    ) -> bytes:
        v = sign_voucher(
            self.key(label), domain or self.domain, channel or self.cid, self.lane, cumulative
        )
        return v.signature

    def tx(self, fn: Any, sender: str, value: int = 0) -> Any:
        receipt = self.chain.w3.eth.wait_for_transaction_receipt(
            fn.transact({"from": self.chain.addr(sender), "value": value})
        )
        assert receipt["status"] == 1
        return receipt

    def request_close(self) -> None:
        receipt = self.tx(self.chain.PaymentChannels.functions.requestClose(self.cid), "buyer")
        ts = int(self.chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"])
        self.closes_at = ts + CHALLENGE_PERIOD


@pytest.fixture
def scene(chain: Any) -> Scene:
    pc = chain.PaymentChannels
    domain = VoucherDomain(chain.w3.eth.chain_id, pc.address)
    ids = []
    for _ in range(2):
        receipt = chain.w3.eth.wait_for_transaction_receipt(
            pc.functions.open(
                chain.addr("seller"), chain.addr("operator"), ZERO, DEPOSIT, FEE_BPS
            ).transact({"from": chain.addr("buyer"), "value": DEPOSIT})
        )
        (log,) = pc.events.ChannelOpened().process_receipt(receipt, errors=DISCARD)
        ids.append(bytes(log["args"]["channelId"]))
    s = Scene(chain, domain, ids[0], ids[1], lane=chain.addr("operator"))
    s.tx(pc.functions.claim(s.cid, s.lane, CLAIMED, s.sign(CLAIMED)), "seller")
    return s


# --------------------------------------------------------------------------------------------
# signature surgery
# --------------------------------------------------------------------------------------------


def with_v(sig: bytes, v: int) -> bytes:
    return sig[:64] + bytes([v])


def with_r(sig: bytes, r: int) -> bytes:
    return r.to_bytes(32, "big") + sig[32:]


def with_s(sig: bytes, s: int) -> bytes:
    return sig[:32] + s.to_bytes(32, "big") + sig[64:]


def twin(sig: bytes) -> bytes:
    """The high-s twin, computed here; must equal the SDK's helper."""
    s = int.from_bytes(sig[32:64], "big")
    out = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    assert out == high_s_twin(sig)
    return out


def r_off_curve() -> int:
    """The smallest x with no curve point (x^3 + 7 not a square mod p): ecrecover fails."""
    x = 1
    while pow((x**3 + 7) % SECP256K1_P, (SECP256K1_P - 1) // 2, SECP256K1_P) == 1:
        x += 1
    return x


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------

Build = Callable[[Scene], tuple[bytes, int, bytes]]


def _settle_cooperatively(s: Scene) -> None:
    s.tx(s.chain.PaymentChannels.functions.cooperativeClose(s.cid, s.lane, 0, b""), "seller")


def _settle_by_withdraw(s: Scene) -> None:
    s.request_close()
    s.chain.time_travel(CHALLENGE_PERIOD + 1)
    s.tx(s.chain.PaymentChannels.functions.withdraw(s.cid), "buyer")


def _closing(offset: int) -> Callable[[Scene], None]:
    """Close requested; the claim happens at closes_at + offset (offset < 0: during)."""

    def prepare(s: Scene) -> None:
        s.request_close()
        assert s.closes_at is not None
        s.t = s.closes_at + offset

    return prepare


def _huge_token_channel(s: Scene) -> None:
    """Replace the channel under test by an ERC-20 channel with a 2**255 deposit and a fee."""
    chain, pc, token = s.chain, s.chain.PaymentChannels, s.chain.Token
    s.tx(token.functions.mint(chain.addr("buyer"), 2**255), "oracle")
    s.tx(token.functions.approve(pc.address, 2**255), "buyer")
    receipt = s.tx(
        pc.functions.open(
            chain.addr("seller"), chain.addr("operator"), token.address, 2**255, 1000
        ),
        "buyer",
    )
    (log,) = pc.events.ChannelOpened().process_receipt(receipt, errors=DISCARD)
    s.cid = bytes(log["args"]["channelId"])


@dataclass(frozen=True)
class Row:
    build: Build
    expect: Outcome
    prepare: Callable[[Scene], None] | None = None


ROWS: dict[str, Row] = {
    # -- pays -------------------------------------------------------------------------------
    "valid": Row(lambda s: (s.cid, 700, s.sign(700)), Pays(300)),
    "lane of nobody (not the operator, not its broker)": Row(
        lambda s: (s.cid, 700, s.sign(700)),
        Refused("PaymentChannelsInvalidLane"),
        lambda s: setattr(s, "lane", s.chain.addr("stranger")),
    ),
    "one above claimed": Row(lambda s: (s.cid, 401, s.sign(401)), Pays(1)),
    "exactly the deposit": Row(lambda s: (s.cid, DEPOSIT, s.sign(DEPOSIT)), Pays(600)),
    "over deposit (capped)": Row(lambda s: (s.cid, 1500, s.sign(1500)), Pays(600)),
    "uint256 max (capped)": Row(lambda s: (s.cid, 2**256 - 1, s.sign(2**256 - 1)), Pays(600)),
    "during challenge period": Row(lambda s: (s.cid, 700, s.sign(700)), Pays(300), _closing(-1800)),
    "last second of challenge period": Row(
        lambda s: (s.cid, 700, s.sign(700)), Pays(300), _closing(-1)
    ),
    # -- amount -----------------------------------------------------------------------------
    "lower cumulative": Row(
        lambda s: (s.cid, 300, s.sign(300)), Refused("PaymentChannelsNothingToClaim")
    ),
    "equal cumulative": Row(
        lambda s: (s.cid, CLAIMED, s.sign(CLAIMED)), Refused("PaymentChannelsNothingToClaim")
    ),
    "zero cumulative": Row(
        lambda s: (s.cid, 0, s.sign(0)), Refused("PaymentChannelsNothingToClaim")
    ),
    # -- domain and binding -----------------------------------------------------------------
    "wrong chain id": Row(
        lambda s: (
            s.cid,
            700,
            s.sign(700, domain=VoucherDomain(s.domain.chain_id + 1, s.domain.verifying_contract)),
        ),
        Refused("PaymentChannelsInvalidSigner"),
    ),
    "wrong contract": Row(
        lambda s: (
            s.cid,
            700,
            s.sign(700, domain=VoucherDomain(s.domain.chain_id, s.chain.Registry.address)),
        ),
        Refused("PaymentChannelsInvalidSigner"),
    ),
    "other channel's voucher": Row(
        lambda s: (s.cid, 700, s.sign(700, channel=s.other)),
        Refused("PaymentChannelsInvalidSigner"),
    ),
    "amount altered after signing": Row(
        lambda s: (s.cid, 701, s.sign(700)), Refused("PaymentChannelsInvalidSigner")
    ),
    "signed by a stranger": Row(
        lambda s: (s.cid, 700, s.sign(700, label="stranger")),
        Refused("PaymentChannelsInvalidSigner"),
    ),
    "signed by the payee": Row(
        lambda s: (s.cid, 700, s.sign(700, label="seller")), Refused("PaymentChannelsInvalidSigner")
    ),
    "s = n/2 exactly (low, recovers someone else)": Row(
        lambda s: (s.cid, 700, with_s(s.sign(700), SECP256K1_HALF_N)),
        Refused("PaymentChannelsInvalidSigner"),
    ),
    "v flipped 27<->28": Row(
        lambda s: (s.cid, 700, with_v(s.sign(700), 55 - s.sign(700)[64])),
        Refused("PaymentChannelsInvalidSigner"),
    ),
    # -- malformed signatures -----------------------------------------------------------------
    "high-s twin": Row(
        lambda s: (s.cid, 700, twin(s.sign(700))), Refused("PaymentChannelsInvalidSignature")
    ),
    "s = n/2 + 1": Row(
        lambda s: (s.cid, 700, with_s(s.sign(700), SECP256K1_HALF_N + 1)),
        Refused("PaymentChannelsInvalidSignature"),
    ),
    "v = 0": Row(
        lambda s: (s.cid, 700, with_v(s.sign(700), 0)), Refused("PaymentChannelsInvalidSignature")
    ),
    "v = 1": Row(
        lambda s: (s.cid, 700, with_v(s.sign(700), 1)), Refused("PaymentChannelsInvalidSignature")
    ),
    "v = 29": Row(
        lambda s: (s.cid, 700, with_v(s.sign(700), 29)), Refused("PaymentChannelsInvalidSignature")
    ),
    "truncated to 64 bytes": Row(
        lambda s: (s.cid, 700, s.sign(700)[:64]), Refused("PaymentChannelsInvalidSignature")
    ),
    "0 bytes": Row(lambda s: (s.cid, 700, b""), Refused("PaymentChannelsInvalidSignature")),
    "66 bytes": Row(
        lambda s: (s.cid, 700, s.sign(700) + b"\x1b"), Refused("PaymentChannelsInvalidSignature")
    ),
    "r = 0": Row(
        lambda s: (s.cid, 700, with_r(s.sign(700), 0)), Refused("PaymentChannelsInvalidSignature")
    ),
    "r = n": Row(
        lambda s: (s.cid, 700, with_r(s.sign(700), SECP256K1_N)),
        Refused("PaymentChannelsInvalidSignature"),
    ),
    "r off the curve": Row(
        lambda s: (s.cid, 700, with_r(s.sign(700), r_off_curve())),
        Refused("PaymentChannelsInvalidSignature"),
    ),
    "s = 0": Row(
        lambda s: (s.cid, 700, with_s(s.sign(700), 0)), Refused("PaymentChannelsInvalidSignature")
    ),
    # -- channel state ------------------------------------------------------------------------
    "claim at the end of the challenge period": Row(
        lambda s: (s.cid, 700, s.sign(700)),
        Refused("PaymentChannelsChallengePeriodOver"),
        _closing(0),
    ),
    "claim after challenge period": Row(
        lambda s: (s.cid, 700, s.sign(700)),
        Refused("PaymentChannelsChallengePeriodOver"),
        _closing(5000),
    ),
    "settled channel (cooperative close)": Row(
        lambda s: (s.cid, 700, s.sign(700)),
        Refused("PaymentChannelsChannelSettled"),
        _settle_cooperatively,
    ),
    "settled channel (withdrawn)": Row(
        lambda s: (s.cid, 700, s.sign(700)),
        Refused("PaymentChannelsChannelSettled"),
        _settle_by_withdraw,
    ),
    "unknown channel": Row(
        lambda s: (
            keccak(text="no such channel"),
            700,
            s.sign(700, channel=keccak(text="no such channel")),
        ),
        Refused("PaymentChannelsUnknownChannel"),
    ),
    # -- check order: channel, then signature, then amount ------------------------------------
    "after challenge period with a bad signature": Row(
        lambda s: (s.cid, 700, b""), Refused("PaymentChannelsChallengePeriodOver"), _closing(10)
    ),
    "settled with a stale voucher by a stranger": Row(
        lambda s: (s.cid, 1, s.sign(1, label="stranger")),
        Refused("PaymentChannelsChannelSettled"),
        _settle_cooperatively,
    ),
    "high-s twin of a stale voucher": Row(
        lambda s: (s.cid, 300, twin(s.sign(300))), Refused("PaymentChannelsInvalidSignature")
    ),
    "stale voucher by a stranger": Row(
        lambda s: (s.cid, 300, s.sign(300, label="stranger")),
        Refused("PaymentChannelsInvalidSigner"),
    ),
}

# Not a row: a channel whose operator refuses the native coin cannot be claimed at all (the
# fee transfer reverts), which the verifier cannot know. The broker meters only channels that
# name its own operator address, so it never meets one; test_payment_channels.py pins it in
# test_operator_that_cannot_receive_native_blocks_claims.
EXTRA_ROWS = {
    # Found by this table: the contract computed the fee as payout * feeBps and overflowed;
    # it uses mulDiv now, so the verifier (which ignores the fee) and the contract agree.
    "huge deposit with fee": pytest.param(
        Row(lambda s: (s.cid, 2**255, s.sign(2**255)), Pays(2**255), _huge_token_channel),
        id="huge deposit with fee",
    ),
}


@pytest.mark.parametrize(
    "row", [pytest.param(row, id=name) for name, row in ROWS.items()] + list(EXTRA_ROWS.values())
)
def test_contract_and_verifier_agree(chain: Any, scene: Scene, row: Row) -> None:
    if row.prepare is not None:
        row.prepare(scene)
    channel_id, cumulative, signature = row.build(scene)
    t = scene.t if scene.t is not None else next_free_time(chain)
    assert t >= next_free_time(chain), "row pinned a time in the past"

    # Python first: contract_outcome really claims when the voucher pays
    lane = scene.lane
    py_error, py_payout = python_outcome(
        chain, scene.domain, t, channel_id, lane, cumulative, signature
    )
    got = contract_outcome(chain, t, channel_id, lane, cumulative, signature)

    if isinstance(got, Refused):
        # agreement first (what the broker relies on), then the expected row outcome
        assert got.error in CONTRACT_TO_PYTHON, (
            f"contract refused with {got.error}{got.args}, which no verifier error maps to; Python "
            + (f"raised {py_error.__name__}" if py_error else f"would pay {py_payout}")
        )
        assert py_error is CONTRACT_TO_PYTHON[got.error], (
            f"contract refused with {got.error}{got.args}, Python "
            + (f"raised {py_error.__name__}" if py_error else f"would pay {py_payout}")
        )
        assert got == row.expect
        if got.error == "PaymentChannelsInvalidSigner":
            assert (
                recover_voucher_signer(
                    scene.domain, Voucher(channel_id, lane, cumulative, signature)
                )
                == got.args[0]
            )
            assert got.args[0] != chain.addr("buyer")
        if got.error == "PaymentChannelsInvalidSignature":
            with pytest.raises(VoucherSignatureError):
                recover_voucher_signer(
                    scene.domain, Voucher(channel_id, lane, cumulative, signature)
                )
        return

    assert py_error is None, f"contract pays {got.amount}, Python raised {py_error}"
    assert py_payout == got.amount, f"contract pays {got.amount}, Python says {py_payout}"
    assert got == row.expect


def test_verifier_pins_the_metered_channel(chain: Any, scene: Scene) -> None:
    """Stricter than the contract, on purpose: a voucher that is valid for *another* channel of
    the same payer is refused by the broker with VoucherChannelError when it meters
    ``scene.cid`` (on-chain it would pay into that other channel, not this one)."""
    voucher = sign_voucher(scene.key("buyer"), scene.domain, scene.other, scene.lane, 700)
    payer, _f, _c, settled, _p, _o, _t, deposit, claimed = chain.PaymentChannels.functions.channel(
        scene.other
    ).call()
    state = ChannelState(payer, deposit, claimed, None, settled)
    verifier = VoucherVerifier(scene.domain)
    assert verifier.verify(voucher, state, chain.now()) == 700
    with pytest.raises(VoucherChannelError):
        verifier.verify(voucher, state, chain.now(), channel_id=scene.cid)


def test_table_covers_every_claim_error(chain: Any) -> None:
    """Every way claim can refuse a voucher appears in the table and in the mapping."""
    claim_errors = {
        "PaymentChannelsUnknownChannel",
        "PaymentChannelsChannelSettled",
        "PaymentChannelsChallengePeriodOver",
        "PaymentChannelsInvalidSignature",
        "PaymentChannelsInvalidSigner",
        "PaymentChannelsNothingToClaim",
        "PaymentChannelsInvalidLane",
    }
    assert set(CONTRACT_TO_PYTHON) == claim_errors
    assert {r.expect.error for r in ROWS.values() if isinstance(r.expect, Refused)} == claim_errors
    abi_errors = {i["name"] for i in chain.PaymentChannels.abi if i["type"] == "error"}
    assert claim_errors <= abi_errors
