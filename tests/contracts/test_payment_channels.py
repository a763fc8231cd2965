"""PaymentChannels, function by function: every external function, event and revert, for the
native coin and for an ERC-20, on the embedded chain and on anvil.

Money is checked to the wei: every balance that may move is read before and after, and gas
is added back for the account that sent the transaction (native coin), so a payout that is
one wei off, or a refund that goes to the wrong party, fails. Expected amounts are computed
here from the contract's documented rules (payout = min(cumulative, deposit) - claimed,
fee = payout * feeBps // 10_000), never read back from the contract.

Timing: on anvil ``eth_estimateGas`` ignores ``evm_setNextBlockTimestamp``, so anything that
depends on the exact block time sets the next block's time (:func:`next_at`), simulates with
``eth_call`` on the *pending* block (which both chains build at that time) and sends with an
explicit gas limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from eth_abi import encode
from eth_utils import function_signature_to_4byte_selector, keccak

from blendsm.contracts import load_artifact
from blendsm.device_sdk import VoucherDomain

pytestmark = pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)

ZERO = "0x" + "00" * 20
CHALLENGE_PERIOD = 3600  # what tests/conftest.py deploys with
MAX_FEE_BPS = 1_000
BPS = 10_000
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
GAS = 1_000_000  # explicit limit for transactions whose block time is pinned


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def selector(signature: str) -> bytes:
    return function_signature_to_4byte_selector(signature)


def next_at(chain: Any, timestamp: int) -> None:
    """The next block (and eth_call on "pending") gets ``timestamp``."""
    if chain.tester is not None:
        chain.tester.time_travel(timestamp)
    else:
        chain.w3.provider.make_request("evm_setNextBlockTimestamp", [timestamp])


def free_time(chain: Any, ahead: int = 1) -> int:
    """A time at least ``ahead`` seconds after the latest block that the next block may still
    have (eth-tester's pending block may already be later, following the wall clock)."""
    return max(chain.now() + ahead, int(chain.w3.eth.get_block("pending")["timestamp"]))


def lane_of(pc: Any, channel_id: bytes) -> str:
    """The operator's own lane of a channel (zero with no operator): a one-broker deployment."""
    return str(pc.functions.channel(channel_id).call()[5])


def call_at(chain: Any, timestamp: int, fn: Any, sender: str) -> Any:
    """Simulate ``fn`` from ``sender`` in a block at ``timestamp`` (no block is mined)."""
    next_at(chain, timestamp)
    return fn.call({"from": chain.addr(sender)}, block_identifier="pending")


def state(chain: Any, channel_id: bytes) -> dict[str, Any]:
    payer, fee_bps, closes_at, settled, payee, operator, token, deposit, claimed = (
        chain.PaymentChannels.functions.channel(channel_id).call()
    )
    return {
        "payer": payer,
        "feeBps": fee_bps,
        "closesAt": closes_at,
        "settled": settled,
        "payee": payee,
        "operator": operator,
        "token": token,
        "deposit": deposit,
        "claimed": claimed,
    }


def split(payout: int, fee_bps: int) -> tuple[int, int]:
    """(to payee, to operator) for a payout, per the contract's documented rounding (floor)."""
    fee = payout * fee_bps // BPS
    return payout - fee, fee


def channel_id_of(chain: Any, payer: str, payee: str, token: str, nonce: int) -> bytes:
    return keccak(
        encode(
            ["uint256", "address", "address", "address", "address", "uint256"],
            [chain.w3.eth.chain_id, chain.PaymentChannels.address, payer, payee, token, nonce],
        )
    )


def deploy(chain: Any, name: str) -> Any:
    art = load_artifact(name)
    factory = chain.w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    receipt = chain.w3.eth.wait_for_transaction_receipt(
        factory.constructor().transact({"from": chain.addr("oracle")})
    )
    return chain.w3.eth.contract(address=receipt["contractAddress"], abi=art["abi"])


class Money:
    """One asset (the native coin, or an ERC-20) and everything that moves it.

    ``send`` transacts and remembers the gas each sender paid; ``deltas`` is then every
    watched party's balance change with that gas added back, so for the native coin as for
    the token it is exactly what the contract moved.
    """

    def __init__(self, chain: Any, token: Any | None) -> None:
        self.chain = chain
        self.token = token
        self.native = token is None
        self.address = ZERO if token is None else token.address
        self.kind = "native" if token is None else "token"
        self._before: dict[str, int] = {}
        self._gas: dict[str, int] = {}

    def who(self, label: str) -> str:
        if label == "contract":
            return str(self.chain.PaymentChannels.address)
        return str(self.chain.addr(label)) if label in self.chain.accounts else label

    def balance(self, label: str) -> int:
        return int(self.chain.balance(self.token, self.who(label)))

    def fund(self, label: str, amount: int) -> None:
        """Let ``label`` spend ``amount`` more through PaymentChannels (tokens: mint, approve)."""
        if self.token is None:
            return
        pc = self.chain.PaymentChannels.address
        owner = self.chain.addr(label)
        self._tx(self.token.functions.mint(owner, amount), "oracle")
        allowance = self.token.functions.allowance(owner, pc).call()
        self._tx(self.token.functions.approve(pc, allowance + amount), label)

    def value(self, amount: int) -> int:
        return amount if self.native else 0

    def _tx(self, fn: Any, sender: str, value: int = 0, gas: int | None = None) -> Any:
        params: dict[str, Any] = {"from": self.chain.addr(sender)}
        if value:
            params["value"] = value
        if gas is not None:
            params["gas"] = gas
        receipt = self.chain.w3.eth.wait_for_transaction_receipt(fn.transact(params))
        assert receipt["status"] == 1, "transaction reverted"
        return receipt

    # -- ledger -------------------------------------------------------------------------------

    def watch(self, *labels: str) -> None:
        self._before = {label: self.balance(label) for label in (*labels, "contract")}
        self._gas = {}

    def send(self, fn: Any, sender: str, value: int = 0, gas: int | None = None) -> Any:
        receipt = self._tx(fn, sender, value, gas)
        if self.native:
            cost = int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])
            self._gas[sender] = self._gas.get(sender, 0) + cost
        return receipt

    def send_at(self, timestamp: int, fn: Any, sender: str, value: int = 0) -> Any:
        next_at(self.chain, timestamp)
        receipt = self.send(fn, sender, value, gas=GAS)
        assert self.chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"] == timestamp
        return receipt

    def deltas(self) -> dict[str, int]:
        return {
            label: self.balance(label) - before + self._gas.get(label, 0)
            for label, before in self._before.items()
        }

    def assert_moved(self, **expected: int) -> None:
        """Every watched party moved exactly as given (unnamed ones: zero)."""
        got = self.deltas()
        want = {label: expected.get(label, 0) for label in got}
        assert set(expected) <= set(got), f"unwatched parties {set(expected) - set(got)}"
        assert got == want


PARTIES = ("buyer", "seller", "operator", "stranger")


@pytest.fixture(params=["native", "token"])
def money(request: pytest.FixtureRequest, chain: Any) -> Money:
    return Money(chain, None if request.param == "native" else chain.Token)


@pytest.fixture
def pc(chain: Any) -> Any:
    return chain.PaymentChannels


@pytest.fixture
def opened(chain: Any, money: Money, events: Callable[..., list[Any]]) -> Callable[..., bytes]:
    """Open a channel in ``money`` (funding the payer first); returns the channel id."""

    def open_(
        amount: int = 10_000,
        fee_bps: int = 0,
        payer: str = "buyer",
        payee: str = "seller",
        operator: str | None = "operator",
    ) -> bytes:
        money.fund(payer, amount)
        op = chain.addr(operator) if operator else ZERO
        fn = chain.PaymentChannels.functions.open(
            chain.addr(payee), op, money.address, amount, fee_bps
        )
        (ev,) = events(money.send(fn, payer, money.value(amount)), "ChannelOpened")
        return bytes(ev["channelId"])

    return open_


def close_requested(chain: Any, money: Money, events: Any, channel_id: bytes) -> int:
    receipt = money.send(chain.PaymentChannels.functions.requestClose(channel_id), "buyer")
    (ev,) = events(receipt, "CloseRequested")
    return int(ev["closesAt"])


# --------------------------------------------------------------------------------------------
# constants and views
# --------------------------------------------------------------------------------------------


def test_constants(pc: Any) -> None:
    assert pc.functions.MAX_FEE_BPS().call() == MAX_FEE_BPS
    assert pc.functions.challengePeriod().call() == CHALLENGE_PERIOD
    assert bytes(pc.functions.VOUCHER_TYPEHASH().call()) == keccak(
        text="Voucher(bytes32 channelId,address lane,uint256 cumulativeAmount)"
    )


def _domain_separator(chain_id: int, contract: str) -> bytes:
    """EIP-712 domain hash computed here, independently of the SDK."""
    return keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [
                keccak(
                    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
                ),
                keccak(text="BlendSM PaymentChannels"),
                keccak(text="2"),
                chain_id,
                contract,
            ],
        )
    )


def test_domain_separator_matches_python(chain: Any, pc: Any) -> None:
    expected = _domain_separator(chain.w3.eth.chain_id, pc.address)
    assert bytes(pc.functions.domainSeparator().call()) == expected
    assert VoucherDomain(chain.w3.eth.chain_id, pc.address).separator == expected
    fields, name, version, chain_id, contract, salt, extensions = pc.functions.eip712Domain().call()
    assert (fields, name, version, chain_id, contract, bytes(salt), list(extensions)) == (
        b"\x0f",
        "BlendSM PaymentChannels",
        "2",
        chain.w3.eth.chain_id,
        pc.address,
        bytes(32),
        [],
    )


@pytest.mark.parametrize("amount", [0, 1, 10**18, 2**256 - 1])
def test_voucher_digest_matches_python(chain: Any, pc: Any, amount: int) -> None:
    channel_id = keccak(text="any channel")
    lane = chain.addr("operator")
    separator = _domain_separator(chain.w3.eth.chain_id, pc.address)
    struct_hash = keccak(
        encode(
            ["bytes32", "bytes32", "address", "uint256"],
            [
                keccak(text="Voucher(bytes32 channelId,address lane,uint256 cumulativeAmount)"),
                channel_id,
                lane,
                amount,
            ],
        )
    )
    expected = keccak(b"\x19\x01" + separator + struct_hash)
    assert bytes(pc.functions.voucherDigest(channel_id, lane, amount).call()) == expected
    domain = VoucherDomain(chain.w3.eth.chain_id, pc.address)
    assert domain.digest(channel_id, lane, amount) == expected


def test_channel_view_of_unknown_id_is_empty(chain: Any) -> None:
    assert state(chain, keccak(text="nothing here")) == {
        "payer": ZERO,
        "feeBps": 0,
        "closesAt": 0,
        "settled": False,
        "payee": ZERO,
        "operator": ZERO,
        "token": ZERO,
        "deposit": 0,
        "claimed": 0,
    }


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda f, cid: (f.topUp(cid, 1), "buyer", 1), id="topUp"),
        pytest.param(
            lambda f, cid: (f.claim(cid, ZERO, 1, b"\x00" * 65), "stranger", 0), id="claim"
        ),
        pytest.param(lambda f, cid: (f.requestClose(cid), "buyer", 0), id="requestClose"),
        pytest.param(lambda f, cid: (f.withdraw(cid), "buyer", 0), id="withdraw"),
        pytest.param(
            lambda f, cid: (f.cooperativeClose(cid, ZERO, 0, b""), "seller", 0),
            id="cooperativeClose",
        ),
    ],
)
def test_unknown_channel_refused(chain: Any, pc: Any, reverts: Any, call: Any) -> None:
    channel_id = keccak(text="never opened")
    fn, sender, value = call(pc.functions, channel_id)
    with reverts("PaymentChannelsUnknownChannel", channel_id):
        fn.transact({"from": chain.addr(sender), "value": value})


# --------------------------------------------------------------------------------------------
# open
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fee_bps", "operator"),
    [(0, None), (0, "operator"), (250, "operator"), (MAX_FEE_BPS, "operator")],
)
def test_open_locks_deposit_and_records_channel(
    chain: Any, pc: Any, money: Money, events: Any, fee_bps: int, operator: str | None
) -> None:
    amount = 123_457
    money.fund("buyer", amount)
    op = chain.addr(operator) if operator else ZERO
    expected_id = channel_id_of(chain, chain.addr("buyer"), chain.addr("seller"), money.address, 0)
    fn = pc.functions.open(chain.addr("seller"), op, money.address, amount, fee_bps)
    # the return value is the id too
    assert (
        bytes(fn.call({"from": chain.addr("buyer"), "value": money.value(amount)})) == expected_id
    )

    money.watch(*PARTIES)
    receipt = money.send(fn, "buyer", money.value(amount))
    assert events(receipt, "ChannelOpened") == [
        {
            "channelId": expected_id,
            "payer": chain.addr("buyer"),
            "payee": chain.addr("seller"),
            "operator": op,
            "token": money.address,
            "deposit": amount,
            "feeBps": fee_bps,
        }
    ]
    money.assert_moved(buyer=-amount, contract=amount)
    assert state(chain, expected_id) == {
        "payer": chain.addr("buyer"),
        "feeBps": fee_bps,
        "closesAt": 0,
        "settled": False,
        "payee": chain.addr("seller"),
        "operator": op,
        "token": money.address,
        "deposit": amount,
        "claimed": 0,
    }
    assert pc.functions.nonces(chain.addr("buyer")).call() == 1


def test_channel_id_formula_and_nonces(chain: Any, pc: Any, events: Any) -> None:
    """Nonces count per payer; the id covers chain, contract, payer, payee, token, nonce."""
    token = chain.Token.address
    chain.w3.eth.wait_for_transaction_receipt(
        chain.Token.functions.mint(chain.addr("buyer"), 10**6).transact(
            {"from": chain.addr("oracle")}
        )
    )
    chain.w3.eth.wait_for_transaction_receipt(
        chain.Token.functions.approve(pc.address, 10**6).transact({"from": chain.addr("buyer")})
    )
    plan = [
        ("buyer", "seller", ZERO, 0),
        ("buyer", "seller", ZERO, 1),  # same parties and asset: only the nonce differs
        ("buyer", "seller", token, 2),
        ("buyer2", "seller", ZERO, 0),  # another payer has its own nonce
        ("buyer", "device", ZERO, 3),
        ("buyer2", "buyer", ZERO, 1),
    ]
    ids = []
    for payer, payee, asset, nonce in plan:
        assert pc.functions.nonces(chain.addr(payer)).call() == nonce
        value = 0 if asset == token else 77
        receipt = chain.w3.eth.wait_for_transaction_receipt(
            pc.functions.open(chain.addr(payee), ZERO, asset, 77, 0).transact(
                {"from": chain.addr(payer), "value": value}
            )
        )
        (ev,) = events(receipt, "ChannelOpened")
        expected = channel_id_of(chain, chain.addr(payer), chain.addr(payee), asset, nonce)
        assert bytes(ev["channelId"]) == expected
        ids.append(expected)
    assert len(set(ids)) == len(ids)
    assert pc.functions.nonces(chain.addr("buyer")).call() == 4
    assert pc.functions.nonces(chain.addr("buyer2")).call() == 2
    assert pc.functions.nonces(chain.addr("seller")).call() == 0


def test_ids_never_reused_after_settle(
    chain: Any, pc: Any, money: Money, opened: Any, events: Any
) -> None:
    first = opened(1000)
    money.send(pc.functions.cooperativeClose(first, lane_of(pc, first), 0, b""), "seller")
    assert state(chain, first)["settled"] is True
    second = opened(1000)
    assert second != first
    assert second == channel_id_of(
        chain, chain.addr("buyer"), chain.addr("seller"), money.address, 1
    )
    # the settled channel stays settled and untouched; the new one is fresh
    assert state(chain, first)["settled"] is True
    assert state(chain, second)["settled"] is False
    assert state(chain, second)["deposit"] == 1000


@pytest.mark.parametrize("payee", ["zero", "self"])
def test_open_rejects_invalid_payee(
    chain: Any, pc: Any, money: Money, reverts: Any, payee: str
) -> None:
    money.fund("buyer", 10)
    address = ZERO if payee == "zero" else chain.addr("buyer")
    with reverts("PaymentChannelsInvalidPayee", address):
        pc.functions.open(address, ZERO, money.address, 10, 0).transact(
            {"from": chain.addr("buyer"), "value": money.value(10)}
        )
    assert pc.functions.nonces(chain.addr("buyer")).call() == 0


@pytest.mark.parametrize(
    ("fee_bps", "operator"),
    [(MAX_FEE_BPS + 1, "operator"), (2**16 - 1, "operator"), (1, None), (MAX_FEE_BPS, None)],
)
def test_open_rejects_invalid_fee(
    chain: Any, pc: Any, money: Money, reverts: Any, fee_bps: int, operator: str | None
) -> None:
    money.fund("buyer", 10)
    op = chain.addr(operator) if operator else ZERO
    with reverts("PaymentChannelsInvalidFee", fee_bps):
        pc.functions.open(chain.addr("seller"), op, money.address, 10, fee_bps).transact(
            {"from": chain.addr("buyer"), "value": money.value(10)}
        )


def test_open_rejects_zero_amount(chain: Any, pc: Any, money: Money, reverts: Any) -> None:
    with reverts("PaymentChannelsZeroAmount"):
        pc.functions.open(chain.addr("seller"), ZERO, money.address, 0, 0).transact(
            {"from": chain.addr("buyer")}
        )


@pytest.mark.parametrize("sent", [0, 999, 1001, 2000])
def test_open_native_rejects_wrong_value(chain: Any, pc: Any, reverts: Any, sent: int) -> None:
    with reverts("PaymentChannelsWrongValue", 1000, sent):
        pc.functions.open(chain.addr("seller"), ZERO, ZERO, 1000, 0).transact(
            {"from": chain.addr("buyer"), "value": sent}
        )


def test_open_token_rejects_value(chain: Any, pc: Any, reverts: Any) -> None:
    money = Money(chain, chain.Token)
    money.fund("buyer", 1000)
    for sent in (1, 1000):
        with reverts("PaymentChannelsWrongValue", 0, sent):
            pc.functions.open(chain.addr("seller"), ZERO, money.address, 1000, 0).transact(
                {"from": chain.addr("buyer"), "value": sent}
            )


def test_open_token_needs_approval_and_balance(chain: Any, pc: Any, reverts: Any) -> None:
    token = chain.Token
    buyer = chain.addr("buyer")
    money = Money(chain, token)
    money._tx(token.functions.mint(buyer, 1000), "oracle")
    fn = pc.functions.open(chain.addr("seller"), ZERO, token.address, 1000, 0)
    with reverts("ERC20InsufficientAllowance", pc.address, 0, 1000):
        fn.transact({"from": buyer})
    money._tx(token.functions.approve(pc.address, 999), "buyer")
    with reverts("ERC20InsufficientAllowance", pc.address, 999, 1000):
        fn.transact({"from": buyer})
    money._tx(token.functions.approve(pc.address, 5000), "buyer")
    with reverts("ERC20InsufficientBalance", buyer, 1000, 2000):
        pc.functions.open(chain.addr("seller"), ZERO, token.address, 2000, 0).transact(
            {"from": buyer}
        )
    assert pc.functions.nonces(buyer).call() == 0
    assert token.functions.balanceOf(pc.address).call() == 0


def test_open_with_a_token_that_is_no_contract_fails(chain: Any, pc: Any, reverts: Any) -> None:
    # balanceOf on an address without code returns nothing to decode: a revert without data
    with reverts(""):
        pc.functions.open(chain.addr("seller"), ZERO, chain.addr("stranger"), 1000, 0).transact(
            {"from": chain.addr("buyer")}
        )
    assert pc.functions.nonces(chain.addr("buyer")).call() == 0


def test_open_refuses_a_token_that_moves_a_different_amount(
    chain: Any, pc: Any, reverts: Any
) -> None:
    """A token whose transfer lands more than asked (here: it pushes extra tokens of its own
    to the contract during transferFrom) is refused, like a fee-on-transfer token."""
    tok = deploy(chain, "ReentrantToken")
    money = Money(chain, tok)
    money.fund("buyer", 1000)
    money._tx(tok.functions.mint(tok.address, 7), "oracle")
    money._tx(
        tok.functions.arm(tok.address, tok.encode_abi("transfer", args=[pc.address, 7])), "stranger"
    )
    with reverts("PaymentChannelsTokenTransferMismatch", 1000, 1007):
        pc.functions.open(chain.addr("seller"), ZERO, tok.address, 1000, 0).transact(
            {"from": chain.addr("buyer")}
        )


# --------------------------------------------------------------------------------------------
# topUp
# --------------------------------------------------------------------------------------------


def test_top_up_adds_to_deposit(
    chain: Any, pc: Any, money: Money, opened: Any, events: Any
) -> None:
    cid = opened(1000)
    money.fund("buyer", 555)
    money.watch(*PARTIES)
    receipt = money.send(pc.functions.topUp(cid, 555), "buyer", money.value(555))
    assert events(receipt, "ChannelToppedUp") == [
        {"channelId": cid, "amount": 555, "deposit": 1555}
    ]
    money.assert_moved(buyer=-555, contract=555)
    assert state(chain, cid)["deposit"] == 1555


@pytest.mark.parametrize("sender", ["seller", "operator", "stranger"])
def test_top_up_payer_only(
    chain: Any, pc: Any, money: Money, opened: Any, reverts: Any, sender: str
) -> None:
    cid = opened(1000)
    money.fund(sender, 5)
    with reverts("PaymentChannelsNotPayer", chain.addr(sender)):
        pc.functions.topUp(cid, 5).transact({"from": chain.addr(sender), "value": money.value(5)})


def test_top_up_refusals(
    chain: Any, pc: Any, money: Money, opened: Any, reverts: Any, events: Any
) -> None:
    cid = opened(1000)
    money.fund("buyer", 10)
    buyer = {"from": chain.addr("buyer")}
    with reverts("PaymentChannelsZeroAmount"):
        pc.functions.topUp(cid, 0).transact(buyer)
    if money.native:
        with reverts("PaymentChannelsWrongValue", 5, 4):
            pc.functions.topUp(cid, 5).transact({**buyer, "value": 4})
        with reverts("PaymentChannelsWrongValue", 5, 6):
            pc.functions.topUp(cid, 5).transact({**buyer, "value": 6})
    else:
        with reverts("PaymentChannelsWrongValue", 0, 5):
            pc.functions.topUp(cid, 5).transact({**buyer, "value": 5})
        with reverts("ERC20InsufficientAllowance", pc.address, 10, 11):
            pc.functions.topUp(cid, 11).transact(buyer)
    closes_at = close_requested(chain, money, events, cid)
    with reverts("PaymentChannelsClosing", cid, closes_at):
        pc.functions.topUp(cid, 5).transact({**buyer, "value": money.value(5)})
    assert state(chain, cid)["deposit"] == 1000


def test_top_up_overflow_panics(chain: Any, pc: Any, reverts: Any, events: Any) -> None:
    money = Money(chain, chain.Token)
    money.fund("buyer", 2**256 - 1)
    fn = pc.functions.open(chain.addr("seller"), ZERO, money.address, 2**256 - 2, 0)
    (ev,) = events(money.send(fn, "buyer"), "ChannelOpened")
    with reverts("Panic(uint256)", 0x11):
        pc.functions.topUp(ev["channelId"], 2).transact({"from": chain.addr("buyer")})


# --------------------------------------------------------------------------------------------
# claim
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fee_bps", [0, 1, 333, MAX_FEE_BPS])
@pytest.mark.parametrize("submitter", ["stranger", "seller", "operator", "buyer"])
def test_claim_pays_delta_minus_fee_exactly(
    chain: Any,
    pc: Any,
    money: Money,
    opened: Any,
    voucher: Any,
    events: Any,
    fee_bps: int,
    submitter: str,
) -> None:
    cid = opened(1_000_003, fee_bps)
    amount = 123_457  # fee rounds down for every fee_bps above
    money.watch(*PARTIES)
    receipt = money.send(
        pc.functions.claim(cid, lane_of(pc, cid), amount, voucher("buyer", cid, amount)), submitter
    )
    fee = {0: 0, 1: 12, 333: 4111, MAX_FEE_BPS: 12_345}[fee_bps]  # floor(123457 * bps / 10_000)
    to_payee = amount - fee
    assert events(receipt, "ChannelClaimed") == [
        {
            "channelId": cid,
            "cumulativeAmount": amount,
            "payout": amount,
            "fee": fee,
            "lane": lane_of(pc, cid),
            "laneClaimed": amount,
            "totalClaimed": amount,
        }
    ]
    money.assert_moved(seller=to_payee, operator=fee, contract=-amount)
    s = state(chain, cid)
    assert (s["claimed"], s["deposit"], s["settled"], s["closesAt"]) == (
        amount,
        1_000_003,
        False,
        0,
    )


def test_claim_with_no_operator(
    chain: Any, pc: Any, money: Money, opened: Any, voucher: Any
) -> None:
    cid = opened(1000, 0, operator=None)
    money.watch(*PARTIES)
    money.send(
        pc.functions.claim(cid, lane_of(pc, cid), 999, voucher("buyer", cid, 999)), "stranger"
    )
    money.assert_moved(seller=999, contract=-999)


def test_partial_claims_pay_each_delta(
    chain: Any, pc: Any, money: Money, opened: Any, voucher: Any, events: Any
) -> None:
    fee_bps = 250
    cid = opened(10_000, fee_bps)
    claimed = 0
    for cumulative in (1, 999, 1000, 4321, 9999, 10_000):
        money.watch(*PARTIES)
        receipt = money.send(
            pc.functions.claim(
                cid, lane_of(pc, cid), cumulative, voucher("buyer", cid, cumulative)
            ),
            "seller",
        )
        payout = cumulative - claimed
        to_payee, fee = split(payout, fee_bps)
        (ev,) = events(receipt, "ChannelClaimed")
        assert ev == {
            "channelId": cid,
            "cumulativeAmount": cumulative,
            "payout": payout,
            "fee": fee,
            "lane": lane_of(pc, cid),
            "laneClaimed": cumulative,
            "totalClaimed": cumulative,
        }
        money.assert_moved(seller=to_payee, operator=fee, contract=-payout)
        claimed = cumulative
        assert state(chain, cid)["claimed"] == claimed
        assert state(chain, cid)["settled"] is False


def test_claim_capped_by_deposit_then_top_up_pays_the_rest(
    chain: Any, pc: Any, money: Money, opened: Any, voucher: Any, events: Any, reverts: Any
) -> None:
    fee_bps = 100
    cid = opened(1000, fee_bps)
    sig = voucher("buyer", cid, 2500)
    money.watch(*PARTIES)
    receipt = money.send(pc.functions.claim(cid, lane_of(pc, cid), 2500, sig), "stranger")
    assert events(receipt, "ChannelClaimed") == [
        {
            "channelId": cid,
            "lane": lane_of(pc, cid),
            "cumulativeAmount": 2500,
            "payout": 1000,
            "fee": 10,
            "laneClaimed": 1000,
            "totalClaimed": 1000,
        }
    ]
    money.assert_moved(seller=990, operator=10, contract=-1000)
    # deposit exhausted: the same voucher pays nothing more
    with reverts("PaymentChannelsNothingToClaim", 2500, 1000):
        pc.functions.claim(cid, lane_of(pc, cid), 2500, sig).transact(
            {"from": chain.addr("stranger")}
        )
    money.fund("buyer", 800)
    money.send(pc.functions.topUp(cid, 800), "buyer", money.value(800))
    money.watch(*PARTIES)
    money.send(pc.functions.claim(cid, lane_of(pc, cid), 2500, sig), "stranger")
    money.assert_moved(seller=792, operator=8, contract=-800)
    money.fund("buyer", 5000)
    money.send(pc.functions.topUp(cid, 5000), "buyer", money.value(5000))
    money.watch(*PARTIES)
    money.send(pc.functions.claim(cid, lane_of(pc, cid), 2500, sig), "stranger")
    money.assert_moved(seller=693, operator=7, contract=-700)
    s = state(chain, cid)
    assert (s["deposit"], s["claimed"]) == (6800, 2500)


def test_claim_refuses_lower_and_equal_cumulative(
    chain: Any, pc: Any, money: Money, opened: Any, voucher: Any, reverts: Any
) -> None:
    cid = opened(1000)
    with reverts("PaymentChannelsNothingToClaim", 0, 0):
        pc.functions.claim(cid, lane_of(pc, cid), 0, voucher("buyer", cid, 0)).transact(
            {"from": chain.addr("seller")}
        )
    money.send(pc.functions.claim(cid, lane_of(pc, cid), 600, voucher("buyer", cid, 600)), "seller")
    money.watch(*PARTIES)
    for cumulative in (0, 1, 599, 600):
        with reverts("PaymentChannelsNothingToClaim", cumulative, 600):
            pc.functions.claim(
                cid, lane_of(pc, cid), cumulative, voucher("buyer", cid, cumulative)
            ).transact({"from": chain.addr("seller")})
    money.assert_moved()
    assert state(chain, cid)["claimed"] == 600


@pytest.mark.parametrize("signer", ["stranger", "seller", "operator", "buyer2"])
def test_claim_refuses_other_signers(
    chain: Any, pc: Any, money: Money, opened: Any, voucher: Any, reverts: Any, signer: str
) -> None:
    cid = opened(1000)
    with reverts("PaymentChannelsInvalidSigner", chain.addr(signer)):
        pc.functions.claim(cid, lane_of(pc, cid), 500, voucher(signer, cid, 500)).transact(
            {"from": chain.addr("seller")}
        )


def test_claim_refuses_a_voucher_for_another_channel_or_amount(
    chain: Any, pc: Any, money: Money, opened: Any, voucher: Any, reverts: Any
) -> None:
    cid = opened(1000)
    other = opened(1000)
    with reverts("PaymentChannelsInvalidSigner", ...) as r:
        pc.functions.claim(cid, lane_of(pc, cid), 500, voucher("buyer", other, 500)).transact(
            {"from": chain.addr("seller")}
        )
    assert r.args[0] != chain.addr("buyer")
    with reverts("PaymentChannelsInvalidSigner", ...) as r:
        pc.functions.claim(cid, lane_of(pc, cid), 501, voucher("buyer", cid, 500)).transact(
            {"from": chain.addr("seller")}
        )
    assert r.args[0] != chain.addr("buyer")


def _malformed(sig: bytes) -> dict[str, bytes]:
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    return {
        "empty": b"",
        "64 bytes (EIP-2098 style truncation)": sig[:64],
        "66 bytes": sig + b"\x00",
        "130 bytes": sig + sig,
        "high-s twin": r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v]),
        "v=0": sig[:64] + b"\x00",
        "v=1": sig[:64] + b"\x01",
        "v=29": sig[:64] + bytes([29]),
        "r=0": bytes(32) + sig[32:],
        "s=0": r + bytes(32) + sig[64:],
        "r=n": SECP256K1_N.to_bytes(32, "big") + sig[32:],
        "all zero": bytes(65),
    }


def test_claim_refuses_malformed_signatures(
    chain: Any, pc: Any, money: Money, opened: Any, voucher: Any, reverts: Any
) -> None:
    cid = opened(1000)
    good = voucher("buyer", cid, 500)
    money.watch(*PARTIES)
    for name, bad in _malformed(good).items():
        with reverts("PaymentChannelsInvalidSignature"):
            pc.functions.claim(cid, lane_of(pc, cid), 500, bad).transact(
                {"from": chain.addr("seller")}
            )
        assert name
    # the flipped-v sibling is well formed but recovers someone else
    with reverts("PaymentChannelsInvalidSigner", ...) as r:
        pc.functions.claim(cid, lane_of(pc, cid), 500, good[:64] + bytes([55 - good[64]])).transact(
            {"from": chain.addr("seller")}
        )
    assert r.args[0] != chain.addr("buyer")
    money.assert_moved()
    money.send(
        pc.functions.claim(cid, lane_of(pc, cid), 500, good), "seller"
    )  # the good one still works
    assert state(chain, cid)["claimed"] == 500


def test_claim_during_challenge_period_then_refused(
    chain: Any, pc: Any, money: Money, opened: Any, voucher: Any, events: Any, reverts: Any
) -> None:
    fee_bps = 500
    cid = opened(1000, fee_bps)
    closes_at = close_requested(chain, money, events, cid)
    assert closes_at == chain.now() + CHALLENGE_PERIOD
    assert state(chain, cid)["closesAt"] == closes_at
    money.watch(*PARTIES)
    money.send(
        pc.functions.claim(cid, lane_of(pc, cid), 100, voucher("buyer", cid, 100)), "stranger"
    )
    money.assert_moved(seller=95, operator=5, contract=-100)
    # last second of the challenge period: still claimable
    money.watch(*PARTIES)
    money.send_at(
        closes_at - 1,
        pc.functions.claim(cid, lane_of(pc, cid), 300, voucher("buyer", cid, 300)),
        "stranger",
    )
    money.assert_moved(seller=190, operator=10, contract=-200)
    # at closesAt it is over, for claims and for cooperative closes
    late = voucher("buyer", cid, 400)
    with reverts("PaymentChannelsChallengePeriodOver", closes_at):
        call_at(chain, closes_at, pc.functions.claim(cid, lane_of(pc, cid), 400, late), "stranger")
    with reverts("PaymentChannelsChallengePeriodOver", closes_at):
        call_at(
            chain,
            closes_at,
            pc.functions.cooperativeClose(cid, lane_of(pc, cid), 400, late),
            "seller",
        )
    chain.time_travel(CHALLENGE_PERIOD * 5)
    money.watch(*PARTIES)
    with reverts("PaymentChannelsChallengePeriodOver", closes_at):
        pc.functions.claim(cid, lane_of(pc, cid), 400, late).transact(
            {"from": chain.addr("stranger")}
        )
    with reverts("PaymentChannelsChallengePeriodOver", closes_at):
        pc.functions.cooperativeClose(cid, lane_of(pc, cid), 0, b"").transact(
            {"from": chain.addr("seller")}
        )
    money.assert_moved()
    assert state(chain, cid)["claimed"] == 300


def test_claim_on_settled_channel_refused(
    chain: Any, pc: Any, money: Money, opened: Any, voucher: Any, reverts: Any
) -> None:
    cid = opened(1000)
    sig = voucher("buyer", cid, 700)
    money.send(pc.functions.cooperativeClose(cid, lane_of(pc, cid), 0, b""), "seller")
    with reverts("PaymentChannelsChannelSettled", cid):
        pc.functions.claim(cid, lane_of(pc, cid), 700, sig).transact({"from": chain.addr("seller")})


# --------------------------------------------------------------------------------------------
# requestClose and withdraw
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sender", ["seller", "operator", "stranger"])
def test_request_close_payer_only(
    chain: Any, pc: Any, opened: Any, reverts: Any, sender: str
) -> None:
    cid = opened(1000)
    with reverts("PaymentChannelsNotPayer", chain.addr(sender)):
        pc.functions.requestClose(cid).transact({"from": chain.addr(sender)})
    assert state(chain, cid)["closesAt"] == 0


def test_request_close_once(
    chain: Any, pc: Any, money: Money, opened: Any, events: Any, reverts: Any
) -> None:
    cid = opened(1000)
    t = free_time(chain, 17)
    money.watch(*PARTIES)
    receipt = money.send_at(t, pc.functions.requestClose(cid), "buyer")
    assert events(receipt, "CloseRequested") == [
        {"channelId": cid, "closesAt": t + CHALLENGE_PERIOD}
    ]
    money.assert_moved()
    assert state(chain, cid)["closesAt"] == t + CHALLENGE_PERIOD
    with reverts("PaymentChannelsClosing", cid, t + CHALLENGE_PERIOD):
        pc.functions.requestClose(cid).transact({"from": chain.addr("buyer")})
    chain.time_travel(CHALLENGE_PERIOD * 2)  # still refused after the period
    with reverts("PaymentChannelsClosing", cid, t + CHALLENGE_PERIOD):
        pc.functions.requestClose(cid).transact({"from": chain.addr("buyer")})


@pytest.mark.parametrize("sender", ["seller", "operator", "stranger"])
def test_withdraw_payer_only(
    chain: Any, pc: Any, money: Money, opened: Any, events: Any, reverts: Any, sender: str
) -> None:
    cid = opened(1000)
    close_requested(chain, money, events, cid)
    chain.time_travel(CHALLENGE_PERIOD + 1)
    with reverts("PaymentChannelsNotPayer", chain.addr(sender)):
        pc.functions.withdraw(cid).transact({"from": chain.addr(sender)})


@pytest.mark.parametrize(("fee_bps", "claimed"), [(0, 0), (300, 401), (MAX_FEE_BPS, 1000)])
def test_withdraw_after_challenge_period_refunds_exactly(
    chain: Any,
    pc: Any,
    money: Money,
    opened: Any,
    voucher: Any,
    events: Any,
    reverts: Any,
    fee_bps: int,
    claimed: int,
) -> None:
    cid = opened(1000, fee_bps)
    with reverts("PaymentChannelsNotClosing", cid):
        pc.functions.withdraw(cid).transact({"from": chain.addr("buyer")})
    if claimed:
        money.send(
            pc.functions.claim(cid, lane_of(pc, cid), claimed, voucher("buyer", cid, claimed)),
            "seller",
        )
    closes_at = close_requested(chain, money, events, cid)
    with reverts("PaymentChannelsChallengePeriodActive", closes_at):
        pc.functions.withdraw(cid).transact({"from": chain.addr("buyer")})
    with reverts("PaymentChannelsChallengePeriodActive", closes_at):
        call_at(chain, closes_at - 1, pc.functions.withdraw(cid), "buyer")
    money.watch(*PARTIES)
    receipt = money.send_at(closes_at, pc.functions.withdraw(cid), "buyer")
    refund = 1000 - claimed
    assert events(receipt, "ChannelSettled") == [{"channelId": cid, "refund": refund}]
    money.assert_moved(buyer=refund, contract=-refund)
    s = state(chain, cid)
    assert (s["settled"], s["deposit"], s["claimed"]) == (True, 1000, claimed)
    assert money.balance("contract") == 0
    # settled: nothing more can happen to it
    with reverts("PaymentChannelsChannelSettled", cid):
        pc.functions.withdraw(cid).transact({"from": chain.addr("buyer")})
    with reverts("PaymentChannelsChannelSettled", cid):
        pc.functions.requestClose(cid).transact({"from": chain.addr("buyer")})
    with reverts("PaymentChannelsChannelSettled", cid):
        pc.functions.topUp(cid, 1).transact({"from": chain.addr("buyer"), "value": money.value(1)})
    with reverts("PaymentChannelsChannelSettled", cid):
        pc.functions.claim(cid, lane_of(pc, cid), 1000, voucher("buyer", cid, 1000)).transact(
            {"from": chain.addr("seller")}
        )
    with reverts("PaymentChannelsChannelSettled", cid):
        pc.functions.cooperativeClose(cid, lane_of(pc, cid), 0, b"").transact(
            {"from": chain.addr("seller")}
        )


def test_withdraw_leaves_other_channels_alone(
    chain: Any, pc: Any, money: Money, opened: Any, voucher: Any, events: Any
) -> None:
    a = opened(1000, 100)
    b = opened(2000, 100, payer="buyer2")
    money.send(pc.functions.claim(b, lane_of(pc, b), 500, voucher("buyer2", b, 500)), "seller")
    close_requested(chain, money, events, a)
    chain.time_travel(CHALLENGE_PERIOD)
    money.watch("buyer2", *PARTIES)
    money.send(pc.functions.withdraw(a), "buyer")
    money.assert_moved(buyer=1000, contract=-1000)
    assert money.balance("contract") == 1500
    money.watch("buyer2", *PARTIES)
    money.send(pc.functions.claim(b, lane_of(pc, b), 2000, voucher("buyer2", b, 2000)), "seller")
    money.assert_moved(seller=1485, operator=15, contract=-1500)


# --------------------------------------------------------------------------------------------
# cooperativeClose
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sender", ["buyer", "operator", "stranger"])
def test_cooperative_close_payee_only(
    chain: Any, pc: Any, opened: Any, voucher: Any, reverts: Any, sender: str
) -> None:
    cid = opened(1000)
    with reverts("PaymentChannelsNotPayee", chain.addr(sender)):
        pc.functions.cooperativeClose(
            cid, lane_of(pc, cid), 500, voucher("buyer", cid, 500)
        ).transact({"from": chain.addr(sender)})


@pytest.mark.parametrize("closing", [False, True])
@pytest.mark.parametrize(
    ("fee_bps", "before", "final", "payout"),
    [
        (0, 0, 600, 600),
        (777, 0, 1000, 1000),
        (777, 123, 999, 876),
        (MAX_FEE_BPS, 300, 5000, 700),  # over the deposit: capped, nothing refunded
    ],
)
def test_cooperative_close_pays_delta_then_refunds(
    chain: Any,
    pc: Any,
    money: Money,
    opened: Any,
    voucher: Any,
    events: Any,
    fee_bps: int,
    before: int,
    final: int,
    payout: int,
    closing: bool,
) -> None:
    cid = opened(1000, fee_bps)
    if before:
        money.send(
            pc.functions.claim(cid, lane_of(pc, cid), before, voucher("buyer", cid, before)),
            "stranger",
        )
    if closing:
        close_requested(chain, money, events, cid)
        chain.time_travel(CHALLENGE_PERIOD - 100)
    money.watch(*PARTIES)
    receipt = money.send(
        pc.functions.cooperativeClose(cid, lane_of(pc, cid), final, voucher("buyer", cid, final)),
        "seller",
    )
    to_payee, fee = split(payout, fee_bps)
    refund = 1000 - before - payout
    names = [name for name, _ in events(receipt) if name.startswith("PaymentChannels.")]
    assert names == ["PaymentChannels.ChannelClaimed", "PaymentChannels.ChannelSettled"]
    assert events(receipt, "ChannelClaimed") == [
        {
            "channelId": cid,
            "cumulativeAmount": final,
            "payout": payout,
            "fee": fee,
            "lane": lane_of(pc, cid),
            "laneClaimed": before + payout,
            "totalClaimed": before + payout,
        }
    ]
    assert events(receipt, "ChannelSettled") == [{"channelId": cid, "refund": refund}]
    money.assert_moved(seller=to_payee, operator=fee, buyer=refund, contract=-(payout + refund))
    s = state(chain, cid)
    assert (s["settled"], s["claimed"]) == (True, before + payout)


@pytest.mark.parametrize("final", [0, 1, 400])
@pytest.mark.parametrize("signature", [b"", b"\xff" * 65, b"junk"])
def test_cooperative_close_without_new_voucher_ignores_signature(
    chain: Any,
    pc: Any,
    money: Money,
    opened: Any,
    voucher: Any,
    events: Any,
    final: int,
    signature: bytes,
) -> None:
    cid = opened(1000, 500)
    money.send(
        pc.functions.claim(cid, lane_of(pc, cid), 400, voucher("buyer", cid, 400)), "stranger"
    )
    money.watch(*PARTIES)
    receipt = money.send(
        pc.functions.cooperativeClose(cid, lane_of(pc, cid), final, signature), "seller"
    )
    assert events(receipt, "ChannelClaimed") == []
    assert events(receipt, "ChannelSettled") == [{"channelId": cid, "refund": 600}]
    money.assert_moved(buyer=600, contract=-600)
    assert state(chain, cid)["settled"] is True


def test_cooperative_close_checks_a_new_voucher(
    chain: Any, pc: Any, money: Money, opened: Any, voucher: Any, reverts: Any
) -> None:
    cid = opened(1000)
    with reverts("PaymentChannelsInvalidSignature"):
        pc.functions.cooperativeClose(cid, lane_of(pc, cid), 1, b"").transact(
            {"from": chain.addr("seller")}
        )
    with reverts("PaymentChannelsInvalidSigner", chain.addr("seller")):
        pc.functions.cooperativeClose(
            cid, lane_of(pc, cid), 500, voucher("seller", cid, 500)
        ).transact({"from": chain.addr("seller")})
    assert state(chain, cid)["settled"] is False


def test_cooperative_close_with_deposit_fully_claimed(
    chain: Any, pc: Any, money: Money, opened: Any, voucher: Any, events: Any
) -> None:
    """Once the whole deposit was claimed, the payee can still close with the payer's newest
    voucher (cumulative above the deposit): it pays nothing new, so it is not read."""
    cid = opened(1000)
    sig = voucher("buyer", cid, 1500)
    money.send(pc.functions.claim(cid, lane_of(pc, cid), 1500, sig), "seller")
    money.watch(*PARTIES)
    receipt = money.send(pc.functions.cooperativeClose(cid, lane_of(pc, cid), 1500, sig), "seller")
    assert events(receipt, "ChannelClaimed") == []
    assert events(receipt, "ChannelSettled") == [{"channelId": cid, "refund": 0}]
    money.assert_moved()


# --------------------------------------------------------------------------------------------
# reentrancy
# --------------------------------------------------------------------------------------------

GUARD = selector("ReentrancyGuardReentrantCall()")


@pytest.fixture
def evil(chain: Any, events: Any, voucher: Any) -> dict[str, Any]:
    """A ReentrantToken with two channels on it: A (the one acted on) and B (the victim a
    re-entrant call tries to claim; its voucher is valid, so only the guard can stop it)."""
    tok = deploy(chain, "ReentrantToken")
    money = Money(chain, tok)
    pc = chain.PaymentChannels
    ids = []
    for _ in range(2):
        money.fund("buyer", 1000)
        fn = pc.functions.open(chain.addr("seller"), chain.addr("operator"), tok.address, 1000, 500)
        (ev,) = events(money.send(fn, "buyer"), "ChannelOpened")
        ids.append(bytes(ev["channelId"]))
    a, b = ids
    return {
        "token": tok,
        "money": money,
        "a": a,
        "b": b,
        "claim_b": pc.encode_abi("claim", args=[b, lane_of(pc, b), 600, voucher("buyer", b, 600)]),
        "claim_a": pc.encode_abi("claim", args=[a, lane_of(pc, a), 900, voucher("buyer", a, 900)]),
        "withdraw_a": pc.encode_abi("withdraw", args=[a]),
        "sig_a": voucher("buyer", a, 400),
    }


def test_reentrant_token_harness_works_outside_the_guard(chain: Any, evil: dict[str, Any]) -> None:
    """Control: armed with claim(B), a plain token transfer (not through PaymentChannels)
    does claim B, so in the tests below only the reentrancy guard makes it fail."""
    tok, money = evil["token"], evil["money"]
    money._tx(tok.functions.arm(chain.PaymentChannels.address, evil["claim_b"]), "stranger")
    money._tx(tok.functions.mint(chain.addr("stranger"), 5), "oracle")
    money._tx(tok.functions.transfer(chain.addr("device"), 5), "stranger")
    assert tok.functions.lastCallSucceeded().call() is True
    assert state(chain, evil["b"])["claimed"] == 600


@pytest.mark.parametrize("inner", ["claim_b", "claim_a", "withdraw_a"])
@pytest.mark.parametrize("outer", ["claim", "withdraw", "cooperativeClose", "topUp", "open"])
def test_reentrancy_is_refused_and_funds_stay_exact(
    chain: Any, pc: Any, evil: dict[str, Any], events: Any, inner: str, outer: str
) -> None:
    tok, money, a, b = evil["token"], evil["money"], evil["a"], evil["b"]
    if outer == "withdraw":
        close_requested(chain, money, events, a)
        chain.time_travel(CHALLENGE_PERIOD)
    if outer in ("topUp", "open"):
        money.fund("buyer", 300)
    money._tx(tok.functions.arm(pc.address, evil[inner]), "stranger")
    money.watch(*PARTIES)
    attempts = tok.functions.attempts().call()
    fns = {
        "claim": (
            pc.functions.claim(a, lane_of(pc, a), 400, evil["sig_a"]),
            "stranger",
            dict(seller=380, operator=20, contract=-400),
        ),
        "withdraw": (pc.functions.withdraw(a), "buyer", dict(buyer=1000, contract=-1000)),
        "cooperativeClose": (
            pc.functions.cooperativeClose(a, lane_of(pc, a), 400, evil["sig_a"]),
            "seller",
            dict(seller=380, operator=20, buyer=600, contract=-1000),
        ),
        "topUp": (pc.functions.topUp(a, 300), "buyer", dict(buyer=-300, contract=300)),
        "open": (
            pc.functions.open(chain.addr("seller"), ZERO, tok.address, 300, 0),
            "buyer",
            dict(buyer=-300, contract=300),
        ),
    }
    fn, sender, moved = fns[outer]
    money.send(fn, sender)
    # every transfer re-entered, and every re-entry hit the guard
    transfers = {"claim": 2, "withdraw": 1, "cooperativeClose": 3, "topUp": 1, "open": 1}[outer]
    assert tok.functions.attempts().call() - attempts == transfers
    assert tok.functions.lastCallSucceeded().call() is False
    assert bytes(tok.functions.lastRevertData().call()) == GUARD
    money.assert_moved(**moved)
    assert state(chain, b)["claimed"] == 0
    sa = state(chain, a)
    assert sa["claimed"] == (400 if outer in ("claim", "cooperativeClose") else 0)
    assert sa["settled"] is (outer in ("withdraw", "cooperativeClose"))
    assert money.balance("contract") == sum(
        s["deposit"] - s["claimed"] for s in (sa, state(chain, b)) if not s["settled"]
    ) + (300 if outer == "open" else 0)


# --------------------------------------------------------------------------------------------
# pinned sharp edges (see the report): the payee depends on the operator being able to receive
# --------------------------------------------------------------------------------------------


def test_operator_that_cannot_receive_native_blocks_claims(
    chain: Any, pc: Any, voucher: Any, reverts: Any, events: Any
) -> None:
    """The payer picks the operator at open. With a native channel, a fee and an operator
    that rejects the coin (here: a contract with no receive function), every claim reverts,
    so after the challenge period the payer takes everything back. The payee/broker must
    check ``operator`` (and ``feeBps``) of a channel before delivering against it."""
    money = Money(chain, None)
    fn = pc.functions.open(chain.addr("seller"), chain.Token.address, ZERO, 1000, 100)
    (ev,) = events(money.send(fn, "buyer", 1000), "ChannelOpened")
    cid = bytes(ev["channelId"])
    with reverts("FailedCall"):
        pc.functions.claim(cid, lane_of(pc, cid), 1000, voucher("buyer", cid, 1000)).transact(
            {"from": chain.addr("seller")}
        )
    # with a payout small enough for the fee to round to zero the operator is skipped
    money.watch(*PARTIES)
    money.send(pc.functions.claim(cid, lane_of(pc, cid), 99, voucher("buyer", cid, 99)), "seller")
    money.assert_moved(seller=99, contract=-99)


def test_huge_token_deposit_with_fee_is_claimable(
    chain: Any, pc: Any, voucher: Any, events: Any
) -> None:
    money = Money(chain, chain.Token)
    deposit = 2**255
    money.fund("buyer", deposit)
    fn = pc.functions.open(
        chain.addr("seller"), chain.addr("operator"), money.address, deposit, MAX_FEE_BPS
    )
    (ev,) = events(money.send(fn, "buyer"), "ChannelOpened")
    cid = bytes(ev["channelId"])
    claim = pc.functions.claim(cid, lane_of(pc, cid), deposit, voucher("buyer", cid, deposit))
    # payout * feeBps would overflow uint256: the contract must use mulDiv
    money.watch(*PARTIES)
    money.send(claim, "seller")
    to_payee, fee = split(deposit, MAX_FEE_BPS)
    money.assert_moved(seller=to_payee, operator=fee, contract=-deposit)
