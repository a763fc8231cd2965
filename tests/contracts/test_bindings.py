"""The typed async bindings against real chains: every wrapper method round-trips on the
embedded chain, a money path runs on anvil, reverts and dead endpoints map into our errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import coincurve
import pytest
from eth_account.signers.local import LocalAccount
from support import enrol

from blendsm.contracts import (
    ORACLE_ROLE,
    ChannelInfo,
    ChannelOpening,
    ClaimReceipt,
    Deployment,
    Market,
    Marketplace,
    Participant,
    Policy,
    Role,
    Settlement,
    Status,
    TopicInfo,
    TxResult,
    connect,
    free_port,
)
from blendsm.device_sdk import MerkleTree, leaf_hash, sign_voucher
from blendsm.errors import ChainUnavailableError, ConfigError, ContractRevertError

ANVIL = pytest.mark.parametrize("chain", ["anvil"], indirect=True)
PRICE = 10**12
DEPOSIT = 10**18

MakeMp = Callable[[str], Marketplace]


#: The one lane of a channel opened with no operator.
NO_OPERATOR_LANE = "0x" + "00" * 20


def sign_digest(account: LocalAccount, digest: bytes) -> bytes:
    """r || s || v with v = recid + 27, as the contract's ECDSA.recover wants."""
    sig = coincurve.PrivateKey(bytes(account.key)).sign_recoverable(digest, hasher=None)
    return sig[:64] + bytes([sig[64] + 27])


def assert_tx(result: TxResult) -> None:
    assert len(result.tx_hash) == 32
    assert result.block_number > 0
    assert 21_000 < result.gas_used < 1_000_000


async def test_registry_round_trip(chain: Any, mp: MakeMp) -> None:
    reg = mp("seller").registry
    seller, device = chain.addr("seller"), chain.addr("device")
    assert await reg.participant(seller) == Participant(Role.NONE, Status.NONE)
    assert_tx(await reg.apply_for_role(Role.SELLER))
    assert await reg.participant(seller) == Participant(Role.SELLER, Status.PENDING)
    assert not await reg.is_active(seller)
    assert_tx(await mp("oracle").registry.approve(seller))
    info = await reg.participant(seller)
    assert info.active
    assert info.role is Role.SELLER
    assert info.status is Status.ACTIVE
    assert await reg.is_active(seller)
    assert await reg.has_active_role(seller, Role.SELLER)
    assert not await reg.has_active_role(seller, Role.BUYER)
    assert await reg.is_oracle(chain.addr("oracle"))
    assert not await reg.is_oracle(seller)

    assert await reg.device_owner(device) is None
    assert_tx(await reg.add_device(device))
    assert await reg.device_owner(device) == seller
    assert await reg.active_seller_of(device) == seller
    assert await reg.device_count(seller) == 1
    assert_tx(await reg.remove_device(device))
    assert await reg.device_owner(device) is None
    assert await reg.device_count(seller) == 0
    await reg.add_device(device)

    # reject, leave, revoke
    await mp("buyer2").registry.apply_for_role(Role.BUYER)
    assert_tx(await mp("oracle").registry.reject(chain.addr("buyer2")))
    assert (await reg.participant(chain.addr("buyer2"))).status is Status.REJECTED
    await enrol(mp, chain, "buyer", Role.BUYER)
    assert_tx(await mp("buyer").registry.leave())
    assert (await reg.participant(chain.addr("buyer"))).status is Status.LEFT
    assert_tx(await mp("oracle").registry.revoke(seller))
    assert (await reg.participant(seller)).status is Status.REVOKED
    assert await reg.device_owner(device) == seller
    assert await reg.active_seller_of(device) is None


async def test_market_round_trip(chain: Any, mp: MakeMp) -> None:
    seller = await enrol(mp, chain, "seller", Role.SELLER)
    buyer = await enrol(mp, chain, "buyer", Role.BUYER)
    await mp("seller").registry.add_device(chain.addr("device"))
    market = mp("seller").market

    created = await market.create_topic("farm/1/temp", PRICE)
    assert_tx(created)
    assert created.topic_id == Market.topic_id("farm/1/temp")
    token = chain.Token.address
    other = await market.create_topic("farm/1/humidity", 5, token, Policy.ALLOWLIST)
    assert await market.topic(created.topic_id) == TopicInfo(
        topic_id=created.topic_id,
        name="farm/1/temp",
        seller=seller,
        token=None,
        price=PRICE,
        policy=Policy.OPEN,
        min_rating_x100=0,
        paused=False,
    )
    humidity = await market.topic(other.topic_id)
    assert humidity is not None
    assert humidity.token == token
    assert humidity.policy is Policy.ALLOWLIST
    assert await market.topic(Market.topic_id("nobody/sells/this")) is None
    assert await market.topic_count() == 2
    assert await market.topic_ids() == [created.topic_id, other.topic_id]

    assert await market.can_subscribe(buyer, created.topic_id)
    assert not await market.can_subscribe(buyer, other.topic_id)  # not on the allowlist
    assert_tx(await market.set_access(other.topic_id, [buyer, chain.addr("buyer2")]))
    assert await market.is_listed(other.topic_id, buyer)
    assert await market.can_subscribe(buyer, other.topic_id)
    assert_tx(await market.set_access(other.topic_id, [buyer], listed=False))
    assert not await market.can_subscribe(buyer, other.topic_id)

    assert_tx(await market.set_price(created.topic_id, 2 * PRICE))
    assert_tx(await market.set_policy(created.topic_id, Policy.MIN_RATING, 300))
    topic = await market.topic(created.topic_id)
    assert topic is not None
    assert (topic.price, topic.policy, topic.min_rating_x100) == (
        2 * PRICE,
        Policy.MIN_RATING,
        300,
    )
    assert not await market.can_subscribe(buyer, created.topic_id)  # unrated buyer
    await market.set_policy(created.topic_id, Policy.OPEN)

    assert await market.can_publish(chain.addr("device"), created.topic_id)
    assert not await market.can_publish(chain.addr("device2"), created.topic_id)
    assert_tx(await market.pause(created.topic_id))
    assert (await market.topic(created.topic_id)).paused  # type: ignore[union-attr]
    assert not await market.can_subscribe(buyer, created.topic_id)
    assert not await market.can_publish(chain.addr("device"), created.topic_id)
    assert_tx(await market.resume(created.topic_id))
    assert await market.can_subscribe(buyer, created.topic_id)


async def test_native_channel_round_trip(chain: Any, mp: MakeMp) -> None:
    seller = await enrol(mp, chain, "seller", Role.SELLER)
    buyer = await enrol(mp, chain, "buyer", Role.BUYER)
    operator = chain.addr("operator")
    channels = mp("buyer").channels
    assert await channels.challenge_period() == 3600
    assert await channels.max_fee_bps() == 1_000

    predicted = await channels.next_channel_id(buyer, seller)
    before = chain.balance(None, buyer)
    opened = await channels.open(seller, operator, None, DEPOSIT, 250)
    assert isinstance(opened, ChannelOpening)
    assert opened.approval is None
    assert_tx(opened)
    assert opened.channel_id == predicted
    assert opened.deposit == DEPOSIT
    assert before - chain.balance(None, buyer) >= DEPOSIT
    assert await channels.nonce_of(buyer) == 1
    assert await channels.channel(opened.channel_id) == ChannelInfo(
        channel_id=opened.channel_id,
        payer=buyer,
        payee=seller,
        operator=operator,
        token=None,
        deposit=DEPOSIT,
        claimed=0,
        fee_bps=250,
        closes_at=None,
        settled=False,
    )
    assert await channels.channel(b"\x01" * 32) is None

    domain = await channels.domain()
    assert (domain.chain_id, domain.verifying_contract) == (
        chain.deployment.chain_id,
        channels.address,
    )
    vdomain = domain.voucher_domain()
    assert vdomain.separator == await channels.domain_separator()
    assert vdomain.digest(opened.channel_id, operator, 7) == await channels.voucher_digest(
        opened.channel_id, operator, 7
    )
    assert await channels.is_lane(opened.channel_id, operator)
    assert not await channels.is_lane(opened.channel_id, seller)
    assert await channels.brokers_address() == chain.deployment.address("Brokers")

    # the operator submits vouchers on the payee's behalf
    key = chain.accounts["buyer"].key
    seller_before, op_before = chain.balance(None, seller), chain.balance(None, operator)
    v1 = sign_voucher(bytes(key), vdomain, opened.channel_id, operator, 4 * PRICE)
    first = await mp("operator").channels.claim(
        opened.channel_id, v1.lane, v1.cumulative_amount, v1.signature
    )
    assert isinstance(first, ClaimReceipt)
    assert (first.payout, first.fee, first.claimed, first.lane, first.lane_claimed) == (
        4 * PRICE,
        4 * PRICE * 250 // 10_000,
        4 * PRICE,
        operator,
        4 * PRICE,
    )
    assert not first.cut_short
    assert await channels.lane_claimed(opened.channel_id, operator) == 4 * PRICE
    v2 = sign_voucher(bytes(key), vdomain, opened.channel_id, operator, 10 * PRICE)
    second = await mp("operator").channels.claim(
        opened.channel_id, v2.lane, v2.cumulative_amount, v2.signature
    )
    assert (second.payout, second.claimed) == (6 * PRICE, 10 * PRICE)
    assert second.gas_used < first.gas_used  # claimed goes non-zero -> non-zero
    assert chain.balance(None, seller) - seller_before == 10 * PRICE - first.fee - second.fee
    assert (
        chain.balance(None, operator) - op_before >= first.fee + second.fee - 10**17
    )  # minus its gas

    assert_tx(await channels.top_up(opened.channel_id, DEPOSIT))
    closing = await channels.request_close(opened.channel_id)
    assert_tx(closing)
    info = await channels.channel(opened.channel_id)
    assert info is not None
    assert info.closing
    assert info.closes_at == closing.closes_at
    assert info.remaining == 2 * DEPOSIT - 10 * PRICE
    with pytest.raises(ContractRevertError) as err:
        await channels.top_up(opened.channel_id, 1)
    assert err.value.error_name == "PaymentChannelsClosing"
    assert err.value.error_args == {"channelId": opened.channel_id, "closesAt": closing.closes_at}
    with pytest.raises(ContractRevertError, match="PaymentChannelsChallengePeriodActive"):
        await channels.withdraw(opened.channel_id)
    chain.time_travel(3601)
    settled = await channels.withdraw(opened.channel_id)
    assert isinstance(settled, Settlement)
    assert (settled.refund, settled.payout) == (2 * DEPOSIT - 10 * PRICE, 0)
    after = await channels.channel(opened.channel_id)
    assert after is not None
    assert after.settled
    assert after.remaining == 0
    assert not after.closing

    # ratings: both parties of a channel that paid
    ratings = mp("buyer").ratings
    assert_tx(await ratings.rate(opened.channel_id, 4))
    await mp("seller").ratings.rate(opened.channel_id, 5)
    assert await ratings.has_rated(opened.channel_id, buyer)
    rating = await ratings.rating_of(seller)
    assert (rating.count, rating.total, rating.average_x100) == (1, 4, 400)
    assert await ratings.average_x100(seller) == 400
    assert await ratings.average_x100(buyer) == 500
    assert await ratings.average_x100(chain.addr("stranger")) == 0


async def test_erc20_channel_and_cooperative_close(chain: Any, mp: MakeMp) -> None:
    seller = await enrol(mp, chain, "seller", Role.SELLER)
    buyer = await enrol(mp, chain, "buyer", Role.BUYER)
    token = chain.Token
    chain.w3.eth.wait_for_transaction_receipt(
        token.functions.mint(buyer, 10 * DEPOSIT).transact({"from": chain.addr("oracle")})
    )
    channels = mp("buyer").channels
    erc20 = mp("buyer").token(token.address)
    assert await erc20.balance_of(buyer) == 10 * DEPOSIT

    with pytest.raises(ContractRevertError) as err:  # no allowance yet
        await channels.open(seller, None, token.address, DEPOSIT)
    assert err.value.error_name == "ERC20InsufficientAllowance"
    assert err.value.error_args == {"spender": channels.address, "allowance": 0, "needed": DEPOSIT}

    opened = await channels.open(seller, None, token.address, DEPOSIT, approve=True)
    assert opened.approval is not None
    assert opened.approval.gas_used > 0
    assert await channels.allowance(token.address, buyer) == 0  # used up by the deposit
    info = await channels.channel(opened.channel_id)
    assert info is not None
    assert info.token == token.address
    assert info.operator is None
    assert_tx(await channels.approve_token(token.address, DEPOSIT))
    assert await channels.allowance(token.address, buyer) == DEPOSIT
    await channels.top_up(opened.channel_id, DEPOSIT)
    await channels.top_up(opened.channel_id, DEPOSIT, approve=True)
    assert (await channels.channel(opened.channel_id)).deposit == 3 * DEPOSIT  # type: ignore[union-attr]

    domain = (await channels.domain()).voucher_domain()
    final = sign_voucher(
        bytes(chain.accounts["buyer"].key), domain, opened.channel_id, NO_OPERATOR_LANE, 5 * PRICE
    )
    with pytest.raises(ContractRevertError) as err:
        await channels.cooperative_close(
            opened.channel_id, None, final.cumulative_amount, final.signature
        )
    assert err.value.error_name == "PaymentChannelsNotPayee"
    closed = await mp("seller").channels.cooperative_close(
        opened.channel_id, None, final.cumulative_amount, final.signature
    )
    assert (closed.payout, closed.fee, closed.refund) == (5 * PRICE, 0, 3 * DEPOSIT - 5 * PRICE)
    assert await erc20.balance_of(seller) == 5 * PRICE
    assert await erc20.balance_of(buyer) == 10 * DEPOSIT - 5 * PRICE
    assert_tx(await erc20.transfer(seller, 1))

    # a cooperative close without a new voucher just refunds
    again = await channels.open(seller, None, token.address, DEPOSIT, approve=True)
    plain = await mp("seller").channels.cooperative_close(again.channel_id)
    assert (plain.payout, plain.refund) == (0, DEPOSIT)


async def test_anchors_round_trip(chain: Any, mp: MakeMp) -> None:
    operator = await enrol(mp, chain, "operator", Role.OPERATOR)
    anchors = mp("operator").anchors
    leaves = [leaf_hash(f"message {i}".encode()) for i in range(5)]
    tree = MerkleTree(leaves)
    assert await anchors.latest_batch_id(operator) == 0
    assert await anchors.anchor_of(operator, 1) is None
    first = await anchors.anchor(1, tree.root, len(leaves))
    assert_tx(first)
    info = await anchors.anchor_of(operator, 1)
    assert info is not None
    assert (info.broker, info.batch_id, info.root, info.leaf_count, info.block_number) == (
        operator,
        1,
        tree.root,
        5,
        first.block_number,
    )
    assert info.anchored_at > 0
    assert await anchors.latest_batch_id(operator) == 1
    for i, leaf in enumerate(leaves):
        assert await anchors.verify(operator, 1, leaf, tree.proof(i))
    assert not await anchors.verify(operator, 1, leaf_hash(b"forged"), tree.proof(0))
    assert not await anchors.verify(operator, 2, leaves[0], tree.proof(0))
    second = await anchors.anchor(5, MerkleTree(leaves[:2]).root, 2)
    assert second.gas_used < first.gas_used  # latestBatchId slot already non-zero
    with pytest.raises(ContractRevertError) as err:
        await anchors.anchor(5, tree.root, 5)
    assert (err.value.error_name, err.value.error_args) == (
        "DataAnchorsBatchIdNotIncreasing",
        {"batchId": 5, "latest": 5},
    )


async def test_custom_errors_carry_name_and_args(chain: Any, mp: MakeMp) -> None:
    seller = chain.addr("seller")
    with pytest.raises(ContractRevertError) as err:
        await mp("seller").market.create_topic("t", 1)
    assert (err.value.error_name, err.value.error_args) == (
        "MarketNotActiveSeller",
        {"caller": seller},
    )
    with pytest.raises(ContractRevertError) as err:
        await mp("seller").registry.approve(chain.addr("buyer"))
    assert err.value.error_name == "AccessControlUnauthorizedAccount"
    assert err.value.error_args == {"account": seller, "neededRole": ORACLE_ROLE}
    await enrol(mp, chain, "seller", Role.SELLER)
    with pytest.raises(ContractRevertError) as err:
        await mp("seller").registry.apply_for_role(Role.BUYER)
    assert (err.value.error_name, err.value.error_args) == (
        "RegistryCannotApply",
        {"account": seller, "status": int(Status.ACTIVE)},
    )
    with pytest.raises(ContractRevertError, match=r"^RegistryInvalidRole\(\)$"):
        await mp("buyer").registry.apply_for_role(Role.NONE)

    # a voucher signed by someone else names the signer
    await enrol(mp, chain, "buyer", Role.BUYER)
    opened = await mp("buyer").channels.open(seller, None, None, DEPOSIT)
    digest = await mp("buyer").channels.voucher_digest(opened.channel_id, NO_OPERATOR_LANE, 1)
    forged = sign_digest(chain.accounts["stranger"], digest)
    with pytest.raises(ContractRevertError) as err:
        await mp("seller").channels.claim(opened.channel_id, NO_OPERATOR_LANE, 1, forged)
    assert err.value.error_args == {"signer": chain.addr("stranger")}


async def test_read_only_and_wrong_deployment(chain: Any, w3: Any) -> None:
    ro = Marketplace(w3, chain.deployment)
    assert ro.address is None
    assert not await ro.registry.is_active(chain.addr("seller"))
    with pytest.raises(ConfigError, match="read-only"):
        await ro.registry.apply_for_role(Role.BUYER)
    await ro.check()
    signer = ro.as_account(chain.accounts["buyer"])
    assert signer.address == chain.addr("buyer")

    wrong_chain = Deployment(**{**_fields(chain.deployment), "chain_id": 999})
    with pytest.raises(ConfigError, match="chain id 999"):
        await Marketplace(w3, wrong_chain).check()
    no_code = Deployment(
        **{
            **_fields(chain.deployment),
            "addresses": {
                **chain.deployment.addresses,
                "Market": chain.addr("stranger"),
            },
        }
    )
    with pytest.raises(ConfigError, match="no contract code for Market"):
        await Marketplace(w3, no_code).check()
    with pytest.raises(ValueError, match="32 bytes"):
        await ro.market.topic(b"short")


def _fields(dep: Deployment) -> dict[str, Any]:
    return {name: getattr(dep, name) for name in Deployment.__dataclass_fields__}


async def test_unreachable_endpoint_is_chain_unavailable(embedded_chain: Any) -> None:
    w3 = connect(f"http://127.0.0.1:{free_port()}", request_timeout=2)
    mp = Marketplace(w3, embedded_chain.deployment, embedded_chain.accounts["buyer"])
    try:
        with pytest.raises(ChainUnavailableError) as err:
            await mp.registry.is_active(embedded_chain.addr("buyer"))
        assert err.value.__cause__ is not None  # the transport error, kept with `from`
        w3.provider.exception_retry_configuration = None  # once is enough for the write
        with pytest.raises(ChainUnavailableError):
            await mp.registry.apply_for_role(Role.BUYER)
    finally:
        await w3.provider.disconnect()


@ANVIL
async def test_money_path_on_anvil(chain: Any, mp: MakeMp) -> None:
    """Open, claim with vouchers signed over the contract's own digest, close, withdraw."""
    seller = await enrol(mp, chain, "seller", Role.SELLER)
    buyer = await enrol(mp, chain, "buyer", Role.BUYER)
    operator = await enrol(mp, chain, "operator", Role.OPERATOR)
    channels = mp("buyer").channels
    opened = await channels.open(seller, operator, None, DEPOSIT, 100)
    assert (await channels.channel(opened.channel_id)).payer == buyer  # type: ignore[union-attr]

    seller_before = chain.balance(None, seller)
    digest = await channels.voucher_digest(opened.channel_id, operator, 3 * PRICE)
    claim = await mp("operator").channels.claim(
        opened.channel_id, operator, 3 * PRICE, sign_digest(chain.accounts["buyer"], digest)
    )
    assert (claim.payout, claim.fee, claim.claimed) == (3 * PRICE, 3 * PRICE // 100, 3 * PRICE)
    assert chain.balance(None, seller) - seller_before == claim.payout - claim.fee
    with pytest.raises(ContractRevertError) as err:  # the same voucher again pays nothing
        await mp("operator").channels.claim(
            opened.channel_id, operator, 3 * PRICE, sign_digest(chain.accounts["buyer"], digest)
        )
    assert (err.value.error_name, err.value.error_args) == (
        "PaymentChannelsNothingToClaim",
        {"cumulativeAmount": 3 * PRICE, "claimed": 3 * PRICE},
    )

    closing = await channels.request_close(opened.channel_id)
    with pytest.raises(ContractRevertError) as err:
        await channels.withdraw(opened.channel_id)
    assert err.value.error_args == {"closesAt": closing.closes_at}
    chain.time_travel(3601)
    buyer_before = chain.balance(None, buyer)
    settled = await channels.withdraw(opened.channel_id)
    assert settled.refund == DEPOSIT - 3 * PRICE
    assert chain.balance(None, buyer) > buyer_before + settled.refund - 10**16  # minus gas
    info = await channels.channel(opened.channel_id)
    assert info is not None
    assert info.settled
    assert info.claimed == 3 * PRICE
    with pytest.raises(ContractRevertError, match="PaymentChannelsChannelSettled"):
        await channels.withdraw(opened.channel_id)


def test_revert_enums_decode_to_their_names() -> None:
    from eth_abi import encode
    from eth_utils import keccak

    from blendsm.contracts import Status, decode_revert

    who = "0x" + "ab" * 20
    data = keccak(text="RegistryWrongStatus(address,uint8)")[:4] + encode(
        ["address", "uint8"], [who, 4]
    )
    err = decode_revert(data)
    assert err.error_name == "RegistryWrongStatus"
    assert err.error_args["status"] is Status.REVOKED
    assert err.error_args["status"] == 4
    assert str(err).endswith("status=Status.REVOKED)")
    # A value outside the enum stays a plain number rather than failing the decode.
    data = data[:-32] + encode(["uint8"], [9])
    assert decode_revert(data).error_args["status"] == 9
