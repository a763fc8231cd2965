"""PaymentChannels against a Python model, over random sequences of actions (hypothesis).

Actions: open (native coin and ERC-20, random fee up to the cap, random operator or none),
top-up, vouchers signed by the payer (stale ones and ones above the deposit come naturally)
or forged by a stranger, claims by anyone (also with a voucher of another channel),
request-close, withdraw, cooperative close, time travel, and refused variants (wrong sender,
bad parameters). Every action runs at a pinned block time ``T``: the model predicts the
outcome at ``T`` (pays / which custom error), ``eth_call`` on the pending block at ``T`` must
agree, and only then is the transaction sent in a block at ``T``.

Money is tracked to the wei for both assets: the model moves balances as the contract should,
and the gas each account pays is taken off its expected native balance, so per-party
balances are exact, not approximate. Invariants checked after every step (that mined a
block; refused actions are only simulated, so the state they leave was already checked):

- every party's balance and the contract's equal the model's (native and token);
- conservation: parties + contract (+ gas paid, native) == the totals at the start;
- the contract holds exactly sum(deposit - claimed) over its unsettled channels, per asset,
  computed from ``channel()`` on chain;
- each channel's on-chain state equals the model's; claimed <= deposit;
- what a channel's payee and operator actually received (measured from balance deltas) equals
  ``claimed`` and never exceeds the highest voucher its payer signed;
- fees: the operator got exactly floor(payout * feeBps / 10_000) <= MAX_FEE_BPS of the payout
  (checked on every payout), and a payer's withdrawal after the challenge period refunds
  exactly deposit - claimed (checked on every withdraw).

Each hypothesis example starts from a chain snapshot and reverts to it at teardown. Bounded:
25 examples of up to 25 steps on the embedded chain (``BLENDSM_CHANNELS_EXAMPLES=400`` for a
longer local hunt), 10 of up to 20 on anvil. ``-s`` prints how often each function met each
outcome, to see what the random runs actually reached.
"""

from __future__ import annotations

import ast
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from eth_abi import decode
from eth_tester.exceptions import TransactionFailed
from eth_utils import function_signature_to_4byte_selector
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD

from blendsm.device_sdk import ChannelState, Voucher, VoucherDomain, VoucherVerifier, sign_voucher
from blendsm.errors import (
    VoucherChannelError,
    VoucherError,
    VoucherNotNewerError,
    VoucherSignatureError,
)

ZERO = "0x" + "00" * 20
CHALLENGE_PERIOD = 3600
MAX_FEE_BPS = 1_000
BPS = 10_000
GAS = 1_000_000
TOKEN_FLOAT = 10**12
MAX_CHANNELS = 5  # each payer's token balance at the start of the run

PAYERS = ("buyer", "buyer2")
PAYEES = ("seller", "device", "buyer2")  # buyer2 pays on some channels and is paid on others
OPERATORS = ("operator", "validator", "seller", None)  # seller: operator of its own channel
SENDERS = ("buyer", "buyer2", "seller", "device", "operator", "stranger")
PARTIES = ("buyer", "buyer2", "seller", "device", "operator", "validator", "stranger")
ASSETS = ("native", "token")
MOSTLY = st.sampled_from([True, True, True, False])  # the rightful sender, mostly
WHEN = st.sampled_from(["now", "now", "just before close", "at close", "after close"])

_VERIFIER_ERROR = {
    "PaymentChannelsChannelSettled": VoucherChannelError,
    "PaymentChannelsChallengePeriodOver": VoucherChannelError,
    "PaymentChannelsInvalidSigner": VoucherSignatureError,
    "PaymentChannelsNothingToClaim": VoucherNotNewerError,
}


def _selector(signature: str) -> bytes:
    return function_signature_to_4byte_selector(signature)


_ERROR_NAMES = {
    _selector(sig): sig.split("(")[0]
    for sig in (
        "PaymentChannelsInvalidPayee(address)",
        "PaymentChannelsInvalidFee(uint16)",
        "PaymentChannelsZeroAmount()",
        "PaymentChannelsWrongValue(uint256,uint256)",
        "PaymentChannelsChannelSettled(bytes32)",
        "PaymentChannelsNotPayer(address)",
        "PaymentChannelsNotPayee(address)",
        "PaymentChannelsClosing(bytes32,uint64)",
        "PaymentChannelsNotClosing(bytes32)",
        "PaymentChannelsChallengePeriodActive(uint64)",
        "PaymentChannelsChallengePeriodOver(uint64)",
        "PaymentChannelsInvalidSignature()",
        "PaymentChannelsInvalidSigner(address)",
        "PaymentChannelsNothingToClaim(uint256,uint256)",
        "ReentrancyGuardReentrantCall()",
        "FailedCall()",
    )
}
_PANIC = _selector("Panic(uint256)")

#: How often each function met each outcome in this session (printed with ``-s``).
OUTCOMES: Counter[str] = Counter()


def _revert_name(exc: BaseException) -> str:
    if isinstance(exc, ContractLogicError):
        raw = exc.data.get("data") if isinstance(exc.data, dict) else exc.data
        data = bytes.fromhex(str(raw)[2:]) if raw else b""
    else:
        message = str(exc.args[0])
        prefix = "execution reverted: "
        assert message.startswith(prefix), message
        data = bytes(ast.literal_eval(message[len(prefix) :]))
    if data[:4] == _PANIC:
        return f"Panic({decode(['uint256'], data[4:])[0]:#x})"
    return _ERROR_NAMES.get(data[:4], f"unknown 0x{data.hex()}")


@dataclass
class Ch:
    """The model of one channel."""

    cid: bytes
    payer: str
    payee: str
    operator: str | None
    asset: str
    fee: int
    deposit: int
    claimed: int = 0
    closes_at: int | None = None
    settled: bool = False
    max_signed: int = 0  # the highest cumulative amount the payer signed
    received: int = 0  # what payee + operator actually got (from balance deltas)


@dataclass(frozen=True)
class SignedVoucher:
    cid: bytes
    cumulative: int
    signature: bytes
    by_payer: bool


class ChannelsMachine(RuleBasedStateMachine):
    chain: Any  # set by the test on a subclass

    channels = Bundle("channels")
    vouchers = Bundle("vouchers")

    def __init__(self) -> None:
        super().__init__()
        chain = self.chain
        self.snap = chain.snapshot()
        self.pc = chain.PaymentChannels
        self.token = chain.Token
        self.reader = chain.addr("oracle")  # "from" of views (funded; not a party)
        self.domain = VoucherDomain(chain.w3.eth.chain_id, self.pc.address)
        self.model: dict[bytes, Ch] = {}
        self.expected = {
            asset: {p: self._balance(asset, p) for p in (*PARTIES, "contract")} for asset in ASSETS
        }
        self.totals = {asset: sum(self.expected[asset].values()) for asset in ASSETS}
        self.gas_paid = 0
        self.checked_block = -1

    def teardown(self) -> None:
        self.chain.revert(self.snap)

    # -- plumbing ---------------------------------------------------------------------------

    def _addr(self, label: str | None) -> str:
        if label is None:
            return ZERO
        if label == "contract":
            return str(self.pc.address)
        return str(self.chain.addr(label))

    def _balance(self, asset: str, label: str) -> int:
        who = self._addr(label)
        if asset == "native":
            return int(self.chain.w3.eth.get_balance(who))
        # an explicit "from" spares web3's eth-tester middleware guessing one (slow)
        return int(self.token.functions.balanceOf(who).call({"from": self.reader}))

    def _asset_address(self, asset: str) -> str:
        return ZERO if asset == "native" else str(self.token.address)

    def _time(self, target: int | None = None) -> int:
        """Pin the time ``t`` of the next block and return it: ``target`` if it is still
        ahead, else the earliest time the chain allows.

        eth-tester fixes the pending block's timestamp when it creates it, so without a target
        the pending block is already pinned; anvil's follows the wall clock, so it is set
        explicitly.
        """
        pending = int(self.chain.w3.eth.get_block("pending")["timestamp"])
        earliest = max(self.chain.now() + 1, pending)
        if target is not None and target > earliest:
            t = target
        elif self.chain.tester is not None:
            return pending
        else:
            t = earliest
        if self.chain.tester is not None:
            self.chain.tester.time_travel(t)
        else:
            self.chain.w3.provider.make_request("evm_setNextBlockTimestamp", [t])
        return t

    def _when(self, c: Ch, when: str) -> int:
        """The block time for an action on ``c``: now, or pinned around its closesAt."""
        if c.closes_at is None or when == "now":
            return self._time()
        offset = {"just before close": -1, "at close": 0, "after close": 100}[when]
        return self._time(c.closes_at + offset)

    def _run(self, fn: Any, sender: str, t: int, expect: str | None, value: int = 0) -> Any:
        """Simulate at ``t`` (pinned by :meth:`_time`), compare with the model's ``expect``
        (None: succeeds, else the error name), and send the transaction at ``t`` when it
        succeeds."""
        params: dict[str, Any] = {"from": self.chain.addr(sender), "value": value}
        try:
            fn.call(params, block_identifier="pending")
            got = None
        except (ContractLogicError, TransactionFailed) as exc:
            got = _revert_name(exc)
        assert got == expect, f"contract: {got or 'succeeds'}, model: {expect or 'succeeds'}"
        OUTCOMES[f"{fn.fn_name}: {expect or 'ok'}"] += 1
        if expect is not None:
            return None
        receipt = self.chain.w3.eth.wait_for_transaction_receipt(
            fn.transact({**params, "gas": GAS})
        )
        assert receipt["status"] == 1
        assert int(self.chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"]) == t
        cost = int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])
        self.expected["native"][sender] -= cost
        self.gas_paid += cost
        return receipt

    def _move(self, asset: str, frm: str, to: str, amount: int) -> None:
        self.expected[asset][frm] -= amount
        self.expected[asset][to] += amount

    def _event(self, receipt: Any, name: str) -> list[dict[str, Any]]:
        return [
            dict(e["args"])
            for e in getattr(self.pc.events, name)().process_receipt(receipt, errors=DISCARD)
        ]

    def _received(self, ch: Ch, before: dict[str, int], gas_sender: str | None, gas: int) -> int:
        """What payee and operator got in one transaction, gas added back for the sender."""
        total = 0
        for who in {ch.payee, ch.operator} - {None}:
            assert who is not None
            delta = self._balance(ch.asset, who) - before[who]
            if ch.asset == "native" and who == gas_sender:
                delta += gas
            total += delta
        return total

    def _pay(
        self, ch: Ch, cumulative: int, receipt: Any, sender: str, before: dict[str, int]
    ) -> None:
        """Model a voucher payout and check the event, the fee and what was received."""
        payable = min(cumulative, ch.deposit)
        payout = payable - ch.claimed
        fee = payout * ch.fee // BPS
        assert fee * BPS <= payout * MAX_FEE_BPS
        assert self._event(receipt, "ChannelClaimed") == [
            {
                "channelId": ch.cid,
                "lane": self._lane(ch),
                "cumulativeAmount": cumulative,
                "payout": payout,
                "fee": fee,
                "laneClaimed": payable,
                "totalClaimed": payable,
            }
        ]
        if ch.operator is not None:
            self._move(ch.asset, "contract", ch.operator, fee)
        else:
            assert fee == 0
        self._move(ch.asset, "contract", ch.payee, payout - fee)
        ch.claimed = payable
        gas = int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])
        got = self._received(ch, before, sender, gas)
        assert got == payout, f"payee+operator received {got}, payout {payout}"
        ch.received += got
        if ch.operator is not None and ch.operator != ch.payee:
            op_delta = self._balance(ch.asset, ch.operator) - before[ch.operator]
            if ch.asset == "native" and ch.operator == sender:
                op_delta += gas
            assert op_delta == fee

    def _balances(self, asset: str) -> dict[str, int]:
        return {p: self._balance(asset, p) for p in PARTIES}

    # -- predictions ------------------------------------------------------------------------

    def _voucher_error(self, ch: Ch, cumulative: int, valid_sig: bool) -> str | None:
        if not valid_sig:
            return "PaymentChannelsInvalidSigner"
        if min(cumulative, ch.deposit) <= ch.claimed:
            return "PaymentChannelsNothingToClaim"
        return None

    def _payer_error(self, ch: Ch, sender: str) -> str | None:
        """How topUp, requestClose and withdraw all begin: the channel is live, the sender pays."""
        if ch.settled:
            return "PaymentChannelsChannelSettled"
        if sender != ch.payer:
            return "PaymentChannelsNotPayer"
        return None

    def _open_payer_error(self, ch: Ch, sender: str) -> str | None:
        """topUp and requestClose: a payer action, refused once a close was requested."""
        error = self._payer_error(ch, sender)
        if error is None and ch.closes_at is not None:
            return "PaymentChannelsClosing"
        return error

    def _claim_error(self, ch: Ch, t: int, cumulative: int, valid_sig: bool) -> str | None:
        if ch.settled:
            return "PaymentChannelsChannelSettled"
        if ch.closes_at is not None and t >= ch.closes_at:
            return "PaymentChannelsChallengePeriodOver"
        return self._voucher_error(ch, cumulative, valid_sig)

    # -- rules ------------------------------------------------------------------------------

    @initialize(target=channels, amount=st.integers(1, 10**6), fee=st.integers(0, MAX_FEE_BPS))
    def first_native_channel(self, amount: int, fee: int) -> Any:
        return self.open_channel("buyer", "seller", "operator", "native", amount, fee)

    @initialize(target=channels, amount=st.integers(1, 10**6), fee=st.integers(0, MAX_FEE_BPS))
    def first_token_channel(self, amount: int, fee: int) -> Any:
        return self.open_channel("buyer2", "device", "validator", "token", amount, fee)

    # a few channels are enough: steps go to the money, not to opens
    @precondition(lambda self: len(self.model) < MAX_CHANNELS)
    @rule(
        target=channels,
        payer=st.sampled_from(PAYERS),
        payee=st.sampled_from(PAYEES),
        operator=st.sampled_from(OPERATORS),
        asset=st.sampled_from(ASSETS),
        amount=st.integers(1, 10**6),
        fee=st.integers(0, MAX_FEE_BPS),
    )
    def open_channel(
        self, payer: str, payee: str, operator: str | None, asset: str, amount: int, fee: int
    ) -> Any:
        if payee == payer:
            payee = "seller"
        if operator is None:
            fee = 0
        t = self._time()
        nonce = self.pc.functions.nonces(self._addr(payer)).call({"from": self.reader})
        fn = self.pc.functions.open(
            self._addr(payee), self._addr(operator), self._asset_address(asset), amount, fee
        )
        value = amount if asset == "native" else 0
        receipt = self._run(fn, payer, t, None, value)
        (ev,) = self._event(receipt, "ChannelOpened")
        cid = bytes(ev["channelId"])
        assert cid not in self.model, "channel id reused"
        assert self.pc.functions.nonces(self._addr(payer)).call({"from": self.reader}) == nonce + 1
        self.model[cid] = Ch(cid, payer, payee, operator, asset, fee, amount)
        self._move(asset, payer, "contract", amount)
        return cid

    @rule(
        payer=st.sampled_from(PAYERS),
        bad=st.sampled_from(
            [
                "fee above cap",
                "fee without operator",
                "zero amount",
                "payee is payer",
                "wrong value",
            ]
        ),
        asset=st.sampled_from(ASSETS),
    )
    def open_refused(self, payer: str, bad: str, asset: str) -> None:
        payee, operator, amount, fee = "seller", "operator", 1000, 10
        value_delta = 0
        expect = {
            "fee above cap": "PaymentChannelsInvalidFee",
            "fee without operator": "PaymentChannelsInvalidFee",
            "zero amount": "PaymentChannelsZeroAmount",
            "payee is payer": "PaymentChannelsInvalidPayee",
            "wrong value": "PaymentChannelsWrongValue",
        }[bad]
        if bad == "fee above cap":
            fee = MAX_FEE_BPS + 1
        elif bad == "fee without operator":
            operator = None
        elif bad == "zero amount":
            amount = 0
        elif bad == "payee is payer":
            payee = payer
        else:
            value_delta = 1
        value = (amount if asset == "native" else 0) + value_delta
        fn = self.pc.functions.open(
            self._addr(payee), self._addr(operator), self._asset_address(asset), amount, fee
        )
        self._run(fn, payer, self._time(), expect, value)

    @rule(ch=channels, amount=st.integers(0, 10**6), by_payer=MOSTLY)
    def top_up(self, ch: bytes, amount: int, by_payer: bool) -> None:
        c = self.model[ch]
        sender = c.payer if by_payer else "stranger"
        expect = self._open_payer_error(c, sender)
        if expect is None and amount == 0:
            expect = "PaymentChannelsZeroAmount"
        value = amount if c.asset == "native" else 0
        receipt = self._run(
            self.pc.functions.topUp(ch, amount), sender, self._time(), expect, value
        )
        if receipt is not None:
            c.deposit += amount
            self._move(c.asset, c.payer, "contract", amount)
            assert self._event(receipt, "ChannelToppedUp") == [
                {"channelId": ch, "amount": amount, "deposit": c.deposit}
            ]

    def _lane(self, c: Ch) -> str:
        """The operator's own lane (zero with no operator): one broker per channel here; the
        lanes' arithmetic is the subject of test_payment_channels' lane tests."""
        return self._addr(c.operator)

    def _claim(self, ch: bytes, v: SignedVoucher, submitter: str, t: int) -> None:
        """Submit ``v`` as a claim on ``ch`` at ``t``; the model and the verifier predict."""
        c = self.model[ch]
        valid = v.by_payer and v.cid == ch  # the digest covers the channel id
        expect = self._claim_error(c, t, v.cumulative, valid)
        # the broker's verifier must predict the same
        state = ChannelState(self._addr(c.payer), c.deposit, c.claimed, c.closes_at, c.settled)
        try:
            predicted: int | type[VoucherError] = VoucherVerifier(self.domain).verify(
                Voucher(ch, self._lane(c), v.cumulative, v.signature), state, t
            )
        except VoucherError as exc:
            predicted = type(exc)
        if expect is None:
            assert predicted == min(v.cumulative, c.deposit) - c.claimed
        else:
            assert predicted is _VERIFIER_ERROR[expect]
        before = self._balances(c.asset)
        receipt = self._run(
            self.pc.functions.claim(ch, self._lane(c), v.cumulative, v.signature),
            submitter,
            t,
            expect,
        )
        if receipt is not None:
            self._pay(c, v.cumulative, receipt, submitter, before)

    def _sign(self, c: Ch, kind: str, per_mille: int, forged: bool = False) -> SignedVoucher:
        """A voucher of the payer (or forged by a stranger) for a cumulative amount that is
        ``stale`` (at or below what was claimed), ``new`` (between claimed and the deposit) or
        ``over`` the deposit (by up to 100 %)."""
        if kind == "stale":
            cumulative = c.claimed * per_mille // 1000
        elif kind == "new":
            cumulative = c.claimed + 1 + (c.deposit - c.claimed) * per_mille // 1000
        else:
            cumulative = c.deposit + 1 + c.deposit * per_mille // 1000
        signer = "stranger" if forged else c.payer
        sig = sign_voucher(
            bytes(self.chain.accounts[signer].key), self.domain, c.cid, self._lane(c), cumulative
        ).signature
        if not forged:
            c.max_signed = max(c.max_signed, cumulative)
        return SignedVoucher(c.cid, cumulative, sig, not forged)

    @rule(
        target=vouchers,
        ch=channels,
        kind=st.sampled_from(["new", "new", "new", "stale", "over"]),
        per_mille=st.integers(0, 1000),
        forged=st.sampled_from([False, False, False, True]),
        submitter=st.sampled_from(SENDERS),
        when=WHEN,
    )
    def sign_and_claim(
        self, ch: bytes, kind: str, per_mille: int, forged: bool, submitter: str, when: str
    ) -> SignedVoucher:
        """The payer signs a new, stale or over-deposit voucher (or a stranger forges one); it
        is claimed at once (at ``when``) and kept for replays."""
        c = self.model[ch]
        v = self._sign(c, kind, per_mille, forged)
        self._claim(ch, v, submitter, self._when(c, when))
        return v

    @rule(v=vouchers, submitter=st.sampled_from(SENDERS))
    def claim_again(self, v: SignedVoucher, submitter: str) -> None:
        """Replay an earlier voucher: stale, or paying again after a top-up."""
        self._claim(v.cid, v, submitter, self._time())

    @rule(v=vouchers, ch=channels)
    def claim_on_another_channel(self, v: SignedVoucher, ch: bytes) -> None:
        self._claim(ch, v, "stranger", self._time())

    @rule(ch=channels, by_payer=MOSTLY)
    def request_close(self, ch: bytes, by_payer: bool) -> None:
        c = self.model[ch]
        sender = c.payer if by_payer else "seller" if c.payee != "seller" else "device"
        t = self._time()
        expect = self._open_payer_error(c, sender)
        receipt = self._run(self.pc.functions.requestClose(ch), sender, t, expect)
        if receipt is not None:
            c.closes_at = t + CHALLENGE_PERIOD
            assert self._event(receipt, "CloseRequested") == [
                {"channelId": ch, "closesAt": c.closes_at}
            ]

    @rule(ch=channels, by_payer=MOSTLY, when=WHEN)
    def withdraw(self, ch: bytes, by_payer: bool, when: str) -> None:
        c = self.model[ch]
        sender = c.payer if by_payer else "stranger"
        t = self._when(c, when)
        expect = self._payer_error(c, sender)
        if expect is None:
            if c.closes_at is None:
                expect = "PaymentChannelsNotClosing"
            elif t < c.closes_at:
                expect = "PaymentChannelsChallengePeriodActive"
        before = self._balance(c.asset, c.payer)
        receipt = self._run(self.pc.functions.withdraw(ch), sender, t, expect)
        if receipt is not None:
            refund = c.deposit - c.claimed
            assert self._event(receipt, "ChannelSettled") == [{"channelId": ch, "refund": refund}]
            gas = (
                int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])
                if c.asset == "native"
                else 0
            )
            # after the challenge period the payer recovers exactly deposit - claimed
            assert self._balance(c.asset, c.payer) - before + gas == refund
            self._move(c.asset, "contract", c.payer, refund)
            c.settled = True

    @rule(
        ch=channels,
        when=st.sampled_from(["just before close", "at close", "after close"]),
        payee_races=st.booleans(),
        per_mille=st.integers(0, 1000),
    )
    def payer_exit(self, ch: bytes, when: str, payee_races: bool, per_mille: int) -> None:
        """The payer's whole exit in one step: request the close (if none was); maybe the
        payee races it with a new voucher, just before, at or after the end of the challenge
        period; then the payer tries to withdraw at that same time."""
        self.request_close(ch, True)
        c = self.model[ch]
        if payee_races and not c.settled:
            self._claim(ch, self._sign(c, "new", per_mille), c.payee, self._when(c, when))
        self.withdraw(ch, True, when)

    @rule(ch=channels, v=st.one_of(st.none(), vouchers), by_payee=MOSTLY, when=WHEN)
    def cooperative_close(
        self, ch: bytes, v: SignedVoucher | None, by_payee: bool, when: str
    ) -> None:
        c = self.model[ch]
        sender = c.payee if by_payee else c.payer
        t = self._when(c, when)
        if v is None:
            cumulative, signature, valid = 0, b"", False
        else:
            cumulative, signature, valid = v.cumulative, v.signature, v.by_payer and v.cid == ch
        expect: str | None
        if c.settled:
            expect = "PaymentChannelsChannelSettled"
        elif sender != c.payee:
            expect = "PaymentChannelsNotPayee"
        elif c.closes_at is not None and t >= c.closes_at:
            expect = "PaymentChannelsChallengePeriodOver"
        elif min(cumulative, c.deposit) > c.claimed:
            # A voucher that adds nothing (even one above the deposit once all of it was
            # claimed) is not checked: the payee settles, and the payer gets the rest.
            expect = self._voucher_error(c, cumulative, valid)
        else:
            expect = None
        before = self._balances(c.asset)
        payer_before = self._balance(c.asset, c.payer)
        receipt = self._run(
            self.pc.functions.cooperativeClose(ch, self._lane(c), cumulative, signature),
            sender,
            t,
            expect,
        )
        if receipt is None:
            return
        if min(cumulative, c.deposit) > c.claimed:
            self._pay(c, cumulative, receipt, sender, before)
        else:
            assert self._event(receipt, "ChannelClaimed") == []
        refund = c.deposit - c.claimed
        assert self._event(receipt, "ChannelSettled") == [{"channelId": ch, "refund": refund}]
        assert self._balance(c.asset, c.payer) - payer_before == refund  # the payer sent nothing
        self._move(c.asset, "contract", c.payer, refund)
        c.settled = True

    @rule(
        seconds=st.sampled_from(
            [1, 59, 1800, CHALLENGE_PERIOD - 1, CHALLENGE_PERIOD, CHALLENGE_PERIOD + 1, 7200]
        )
    )
    def time_travel(self, seconds: int) -> None:
        # never ask for less than the chain's own clock already allows
        self.chain.time_travel(max(seconds, self._time() - self.chain.now()))

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def invariants(self) -> None:
        # Refused actions only eth_call; if no block was mined since the last check the chain
        # state is the one already checked, so the checks are skipped (a speed-up only).
        block = self.chain.w3.eth.block_number
        if block == self.checked_block:
            return
        self.checked_block = block
        self._balances_match_the_model_and_are_conserved()
        self._contract_holds_exactly_the_open_balances()

    def _balances_match_the_model_and_are_conserved(self) -> None:
        for asset in ASSETS:
            actual = {p: self._balance(asset, p) for p in (*PARTIES, "contract")}
            assert actual == self.expected[asset], asset
            paid = self.gas_paid if asset == "native" else 0
            assert sum(actual.values()) + paid == self.totals[asset], f"{asset} not conserved"

    def _contract_holds_exactly_the_open_balances(self) -> None:
        held = dict.fromkeys(ASSETS, 0)
        for cid, c in self.model.items():
            payer, fee, closes_at, settled, payee, operator, token, deposit, claimed = (
                self.pc.functions.channel(cid).call({"from": self.reader})
            )
            assert (payer, payee, operator, token) == (
                self._addr(c.payer),
                self._addr(c.payee),
                self._addr(c.operator),
                self._asset_address(c.asset),
            )
            assert (fee, closes_at or None, settled, deposit, claimed) == (
                c.fee,
                c.closes_at,
                c.settled,
                c.deposit,
                c.claimed,
            )
            assert fee <= MAX_FEE_BPS
            assert claimed <= deposit
            # payee + operator got exactly what was claimed, never more than the payer signed
            assert c.received == claimed <= c.max_signed
            if not settled:
                held[c.asset] += deposit - claimed
        for asset in ASSETS:
            assert self._balance(asset, "contract") == held[asset], (
                f"{asset}: contract balance != open balances"
            )


def _prepare(chain: Any) -> None:
    """Give each payer tokens and an unlimited allowance (once, before the snapshots)."""
    pc = chain.PaymentChannels
    for payer in PAYERS:
        for fn, sender in (
            (chain.Token.functions.mint(chain.addr(payer), TOKEN_FLOAT), "oracle"),
            (chain.Token.functions.approve(pc.address, 2**256 - 1), payer),
        ):
            chain.w3.eth.wait_for_transaction_receipt(fn.transact({"from": chain.addr(sender)}))


RUNS = {
    "embedded": settings(
        max_examples=int(os.environ.get("BLENDSM_CHANNELS_EXAMPLES", "25")),
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    ),
    "anvil": settings(
        max_examples=10,
        stateful_step_count=20,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    ),
}


@pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)
def test_payment_channels_match_the_model(chain: Any) -> None:
    _prepare(chain)
    machine = type("Machine", (ChannelsMachine,), {"chain": chain})
    OUTCOMES.clear()
    run_state_machine_as_test(machine, settings=RUNS[chain.kind])
    print(f"\n{chain.kind}: outcomes over all examples:")
    for outcome, n in sorted(OUTCOMES.items()):
        print(f"  {n:5d}  {outcome}")
