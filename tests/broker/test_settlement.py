"""The Settler against the real contracts (embedded py-evm and anvil): it claims by
threshold, interval and close deadline, claims every voucher exactly once across a crash,
backs off on reverts, warns on low gas, and rides out a node that goes away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import eventually, running

from blendsm.broker._chain_view import ChainView
from blendsm.broker._config import SettlementConfig
from blendsm.broker._settlement import Settler
from blendsm.broker._store import AsyncVoucherStore
from blendsm.contracts import Marketplace, test_account
from blendsm.device_sdk import Voucher, sign_voucher

BOTH = pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)
ANVIL = pytest.mark.parametrize("chain", ["anvil"], indirect=True)

MakeMp = Callable[[str], Marketplace]
DEPOSIT = 10**18
FEE_BPS = 250
NEVER = 10**6  # an interval no test reaches

#: The broker here meters the operator's own lane (one broker: no broker_key).
LANE = test_account("operator").address


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[AsyncVoucherStore]:
    s = await AsyncVoucherStore.open(tmp_path / "vouchers.sqlite3", lane=LANE)
    yield s
    await s.close()


def config(**kwargs: Any) -> SettlementConfig:
    kwargs.setdefault("interval_seconds", NEVER)
    kwargs.setdefault("before_close_margin_seconds", 0)
    kwargs.setdefault("min_gas_balance_wei", 0)
    return SettlementConfig(**kwargs)


def settler(
    store: AsyncVoucherStore, mp: MakeMp, view: ChainView | None = None, **kw: Any
) -> Settler:
    options = {k: kw.pop(k) for k in list(kw) if k not in SettlementConfig.__dataclass_fields__}
    options.setdefault("tick", 0.02)
    options.setdefault("backoff_base", 0.05)
    options.setdefault("backoff_max", 0.2)
    return Settler(store, mp("operator"), view, config(**kw), **options)


def proxied_settler(store: AsyncVoucherStore, chain: Any, w3: Any, **kw: Any) -> Settler:
    """A settler whose chain connection is ``w3`` (a link the test can cut), fast backoff."""
    operator = Marketplace(w3, chain.deployment, chain.accounts["operator"])
    return Settler(
        store, operator, None, config(**kw), tick=0.02, backoff_base=0.05, backoff_max=0.2
    )


async def open_channel(chain: Any, mp: MakeMp, deposit: int = DEPOSIT) -> bytes:
    opened = await mp("buyer").channels.open(
        chain.addr("seller"), chain.addr("operator"), None, deposit, FEE_BPS
    )
    return opened.channel_id


async def signed(chain: Any, mp: MakeMp, channel_id: bytes, amount: int) -> Voucher:
    domain = (await mp("buyer").channels.domain()).voucher_domain()
    return sign_voucher(bytes(chain.accounts["buyer"].key), domain, channel_id, LANE, amount)


async def accept(
    store: AsyncVoucherStore, s: Settler | None, chain: Any, mp: MakeMp, cid: bytes, amount: int
) -> None:
    """What the broker does with a verified voucher: store it, then hint the settler."""
    assert await store.accept(await signed(chain, mp, cid, amount))
    if s is not None:
        s.notify_voucher(cid, amount)


def claimed_onchain(chain: Any, cid: bytes) -> int:
    return int(chain.PaymentChannels.functions.channel(cid).call()[8])


def claim_events(chain: Any, cid: bytes) -> int:
    logs = chain.PaymentChannels.events.ChannelClaimed().get_logs(from_block=0)
    return sum(bytes(log["args"]["channelId"]) == cid for log in logs)


@contextlib.contextmanager
def mempool_held(chain: Any) -> Iterator[None]:
    """Automine off (anvil) for the block: transactions wait in the node's mempool; on exit
    automine is back on and one block mines them."""
    chain.w3.provider.make_request("evm_setAutomine", [False])
    try:
        yield
    finally:
        chain.w3.provider.make_request("evm_setAutomine", [True])
        chain.w3.provider.make_request("evm_mine", [])


@contextlib.asynccontextmanager
async def restarted(path: Path, mp: MakeMp, *, claimed: int) -> AsyncIterator[Settler]:
    """A broker restarted on the store at ``path``: its settler reconciles the one open
    intent, which the chain covers at ``claimed``, and (past any backoff) claims nothing
    again. Yields that settler while the store is still open."""
    store = await AsyncVoucherStore.open(path, lane=LANE)
    try:
        s = settler(store, mp)
        results = await s.reconcile()
        assert [(r.status, r.claimed) for r in results] == [("confirmed", claimed)]
        assert await store.pending_claims() == []
        assert await store.claimed_onchain(results[0].channel_id) == claimed
        await asyncio.sleep(0.3)  # past any backoff
        assert await s.settle_now() == []  # covered: the voucher is not claimed again
        yield s
    finally:
        await store.close()


# --- rules --------------------------------------------------------------------------------


@BOTH
async def test_threshold_claim(chain: Any, mp: MakeMp, store: AsyncVoucherStore) -> None:
    cid = await open_channel(chain, mp)
    s = settler(store, mp, threshold=1000)
    async with running(s):
        await accept(store, s, chain, mp, cid, 400)
        await asyncio.sleep(0.2)
        assert claimed_onchain(chain, cid) == 0  # below the threshold: nothing yet
        await accept(store, s, chain, mp, cid, 1200)
        await eventually(lambda: s.claims_confirmed == 1)
    assert claimed_onchain(chain, cid) == 1200
    assert await store.claimed_onchain(cid) == 1200
    assert s.amount_claimed == 1200
    assert s.gas_used > 0
    assert s.failures == 0


@BOTH
async def test_interval_claim(chain: Any, mp: MakeMp, store: AsyncVoucherStore) -> None:
    cids = [await open_channel(chain, mp) for _ in range(2)]
    s = settler(store, mp, threshold=0, interval_seconds=0.3)
    await accept(store, s, chain, mp, cids[0], 5)
    await accept(store, s, chain, mp, cids[1], 7)
    async with running(s):
        await asyncio.sleep(0.1)
        assert s.claims_confirmed == 0  # threshold 0: only the interval claims
        await eventually(lambda: s.claims_confirmed == 2)
    assert [claimed_onchain(chain, c) for c in cids] == [5, 7]


@BOTH
async def test_claim_before_close_deadline(
    chain: Any, mp: MakeMp, store: AsyncVoucherStore
) -> None:
    closing, quiet = await open_channel(chain, mp), await open_channel(chain, mp)
    s = settler(store, mp, before_close_margin_seconds=600, clock=chain.now)
    await accept(store, s, chain, mp, closing, 30)
    await accept(store, s, chain, mp, quiet, 40)
    request = await mp("buyer").channels.request_close(closing)
    async with running(s):
        await asyncio.sleep(0.2)
        assert s.claims_confirmed == 0  # an hour left: not yet
        chain.time_travel(request.closes_at - chain.now() - 500)
        await eventually(lambda: s.claims_confirmed == 1)
        await asyncio.sleep(0.1)
    assert claimed_onchain(chain, closing) == 30
    assert claimed_onchain(chain, quiet) == 0  # not closing: waits for threshold/interval


@BOTH
async def test_close_margin_boundary_is_inclusive(
    chain: Any, mp: MakeMp, store: AsyncVoucherStore
) -> None:
    """A channel whose challenge period ends exactly ``margin`` seconds from now is claimed
    in that round; one second earlier it is not yet (the boundary belongs to the claim)."""
    cid = await open_channel(chain, mp)
    request = await mp("buyer").channels.request_close(cid)
    margin = 600
    now = [float(request.closes_at - margin - 1)]
    s = settler(store, mp, before_close_margin_seconds=margin, clock=lambda: now[0])
    await accept(store, s, chain, mp, cid, 30)
    await s._round()  # one second outside the margin: nothing is due
    assert (s.claims_confirmed, claimed_onchain(chain, cid)) == (0, 0)
    now[0] += 1  # closes_at - now == margin
    await s._round()
    assert (s.claims_confirmed, claimed_onchain(chain, cid)) == (1, 30)
    assert claim_events(chain, cid) == 1


async def test_close_deadline_from_view(
    chain: Any, w3: Any, mp: MakeMp, store: AsyncVoucherStore
) -> None:
    cid = await open_channel(chain, mp)
    view = ChainView(w3, chain.deployment, confirmations=0, poll_interval=0.02, max_staleness=5.0)
    await view.sync()
    view_task = asyncio.create_task(view.run())
    try:
        s = settler(
            store,
            mp,
            view,
            before_close_margin_seconds=10_000,
            clock=chain.now,
            close_poll_seconds=NEVER,
        )
        await accept(store, s, chain, mp, cid, 30)
        async with running(s):
            await asyncio.sleep(0.2)
            assert s.claims_confirmed == 0
            await mp("buyer").channels.request_close(cid)
            await eventually(lambda: s.claims_confirmed == 1)
    finally:
        view.stop()
        await asyncio.wait_for(view_task, 5)
    assert claimed_onchain(chain, cid) == 30


# --- exactly once -------------------------------------------------------------------------


@BOTH
async def test_exactly_once_across_crash(chain: Any, mp: MakeMp, tmp_path: Path) -> None:
    """Crash after the hash was recorded and the claim broadcast: the next settler finds
    the receipt and confirms it; nothing is claimed twice."""
    path = tmp_path / "vouchers.sqlite3"
    cid = await open_channel(chain, mp)
    store = await AsyncVoucherStore.open(path, lane=LANE)
    await accept(store, None, chain, mp, cid, 77)
    intent = await store.begin_claim(cid)
    assert intent is not None
    call = mp("operator").channels.contract.functions.claim(cid, LANE, 77, intent.signature)

    async def record(tx_hash: bytes) -> None:
        await store.claim_sent(intent.intent_id, tx_hash)

    transactor = mp("operator").transactor
    assert transactor is not None
    await transactor.submit(call, before_send=record)
    await store.close()  # crash: the receipt was never read

    async with restarted(path, mp, claimed=77) as s, running(s):
        s.notify_voucher(cid, 77)
        await asyncio.sleep(0.1)
    assert claimed_onchain(chain, cid) == 77
    assert claim_events(chain, cid) == 1
    assert s.claims_confirmed == 1


@BOTH
async def test_reconcile_intent_without_hash(
    chain: Any, mp: MakeMp, store: AsyncVoucherStore
) -> None:
    """An intent whose fate the store cannot tell: covered on chain -> confirmed; not on
    chain (crash before the broadcast) -> failed and claimed again, once."""
    covered, lost = await open_channel(chain, mp), await open_channel(chain, mp)
    await accept(store, None, chain, mp, covered, 50)
    await accept(store, None, chain, mp, lost, 60)
    first = await store.begin_claim(covered)
    second = await store.begin_claim(lost)
    assert first is not None
    assert second is not None
    await mp("seller").channels.claim(covered, LANE, 50, first.signature)  # went out somehow
    await store.claim_sent(second.intent_id, b"\x42" * 32)  # hash recorded, never broadcast

    s = settler(store, mp)
    results = await s.reconcile()
    assert {r.channel_id: r.status for r in results} == {covered: "confirmed", lost: "failed"}
    again = await s.settle_now()
    assert [(r.channel_id, r.status, r.claimed) for r in again] == [(lost, "confirmed", 60)]
    assert await s.settle_now() == []
    assert claim_events(chain, covered) == claim_events(chain, lost) == 1
    assert (claimed_onchain(chain, covered), claimed_onchain(chain, lost)) == (50, 60)


@BOTH
async def test_deposit_capped_claim_not_resubmitted(
    chain: Any, mp: MakeMp, store: AsyncVoucherStore
) -> None:
    cid = await open_channel(chain, mp, deposit=100)
    s = settler(store, mp)
    await accept(store, s, chain, mp, cid, 150)
    (result,) = await s.settle_now()
    assert (result.status, result.claimed, result.payout) == ("confirmed", 100, 100)
    assert result.fee == 100 * FEE_BPS // 10_000
    assert await s.settle_now() == []  # the same voucher again would pay nothing
    assert claim_events(chain, cid) == 1


@BOTH
async def test_reconcile_deposit_capped_intent_after_crash(
    chain: Any, mp: MakeMp, tmp_path: Path
) -> None:
    """Crash with an open intent for a voucher above the deposit, whose claim went through
    while we were down (the payee submitted the same voucher; our recorded hash never
    reached this node): the chain's ``claimed`` is the deposit, less than the voucher, yet
    the intent is covered. Reconciliation confirms it and nothing is claimed again."""
    path = tmp_path / "vouchers.sqlite3"
    cid = await open_channel(chain, mp, deposit=100)
    store = await AsyncVoucherStore.open(path, lane=LANE)
    await accept(store, None, chain, mp, cid, 150)
    intent = await store.begin_claim(cid)
    assert intent is not None
    await store.claim_sent(intent.intent_id, b"\x42" * 32)  # recorded, then the crash
    await store.close()
    await mp("seller").channels.claim(cid, LANE, 150, intent.signature)  # pays the deposit, 100
    assert claimed_onchain(chain, cid) == 100

    async with restarted(path, mp, claimed=100) as s:
        pass
    assert s.failures == 0
    assert claim_events(chain, cid) == 1


@BOTH
async def test_confirmations_wait_for_depth(
    chain: Any, mp: MakeMp, store: AsyncVoucherStore
) -> None:
    cid = await open_channel(chain, mp)
    s = settler(store, mp, confirmations=1)
    await accept(store, s, chain, mp, cid, 33)
    (result,) = await s.settle_now()
    assert result.status == "pending"  # mined, but no block on top yet
    assert claimed_onchain(chain, cid) == 33
    assert s.claims_confirmed == 0
    chain.time_travel(1)  # one more block
    assert await s.settle_now() == []  # reconciled first, nothing new to claim
    assert s.claims_confirmed == 1
    assert await store.claimed_onchain(cid) == 33
    assert claim_events(chain, cid) == 1


# --- failures -----------------------------------------------------------------------------


@BOTH
async def test_reverted_claim_backs_off(chain: Any, mp: MakeMp, store: AsyncVoucherStore) -> None:
    cid = await open_channel(chain, mp)
    forged = Voucher(
        cid, LANE, 500, b"\x11" * 32 + b"\x22" * 32 + b"\x1b"
    )  # the store trusts its caller
    assert await store.accept(forged)
    s = settler(store, mp, threshold=1, backoff_base=0.1, backoff_max=0.4)
    (result,) = await s.settle_now()
    assert result.status == "failed"
    assert result.error is not None
    assert "PaymentChannels" in result.error
    async with running(s):
        await asyncio.sleep(0.6)
        # 0.1 + 0.2 + 0.4 (capped): a few retries, not one per tick
        assert 2 <= s.failures <= 5, s.failures
        await accept(store, s, chain, mp, cid, 600)  # a genuine, newer voucher
        await eventually(lambda: s.claims_confirmed == 1)
    assert claimed_onchain(chain, cid) == 600
    assert claim_events(chain, cid) == 1


@BOTH
async def test_payee_claimed_first_and_deadline_passed(
    chain: Any, mp: MakeMp, store: AsyncVoucherStore
) -> None:
    """Someone else claimed the voucher: confirmed, not retried. Past the challenge period:
    failed once, then never tried again (no endless reverts)."""
    claimed_by_payee, expired = await open_channel(chain, mp), await open_channel(chain, mp)
    s = settler(store, mp)
    await accept(store, s, chain, mp, claimed_by_payee, 20)
    await accept(store, s, chain, mp, expired, 30)
    v = await signed(chain, mp, claimed_by_payee, 20)
    await mp("seller").channels.claim(claimed_by_payee, LANE, 20, v.signature)
    request = await mp("buyer").channels.request_close(expired)
    chain.time_travel(request.closes_at - chain.now() + 1)
    results = {r.channel_id: r for r in await s.settle_now()}
    assert results[claimed_by_payee].status == "confirmed"
    assert results[expired].status == "failed"
    assert "ChallengePeriodOver" in str(results[expired].error)
    await asyncio.sleep(0.3)  # past any backoff
    assert await s.settle_now() == []
    assert s.failures == 1
    assert claim_events(chain, claimed_by_payee) == 1
    assert claim_events(chain, expired) == 0


@BOTH
async def test_low_gas_warning(
    chain: Any, mp: MakeMp, store: AsyncVoucherStore, caplog: pytest.LogCaptureFixture
) -> None:
    s = settler(store, mp, min_gas_balance_wei=2**200)
    with caplog.at_level(logging.WARNING, logger="blendsm.broker.settlement"):
        async with running(s):
            await eventually(lambda: s.low_gas)
            await asyncio.sleep(0.1)
    assert s.low_gas_warnings == 1  # warned once, not every check
    assert any("min_gas_balance_wei" in r.getMessage() for r in caplog.records)
    ok = settler(store, mp, min_gas_balance_wei=1)
    await ok.settle_now()
    assert not ok.low_gas
    assert ok.operator_balance is not None
    assert ok.operator_balance > 1


@ANVIL
async def test_claim_mined_late_is_reconciled(
    chain: Any, mp: MakeMp, store: AsyncVoucherStore
) -> None:
    """The receipt does not come in time: the claim stays open (no second broadcast while
    the node still holds it) and is confirmed once it is mined."""
    cid = await open_channel(chain, mp)
    transactor = mp("operator").transactor
    assert transactor is not None
    transactor.timeout = 0.3
    s = settler(store, mp)
    await accept(store, s, chain, mp, cid, 90)
    with mempool_held(chain):
        (result,) = await s.settle_now()
        assert result.status == "pending"
        assert result.tx_hash is not None
        assert await s.settle_now() == []  # in the mempool: not claimed again
        assert len(await store.pending_claims()) == 1
    async with running(s):
        await eventually(lambda: s.claims_confirmed == 1)
    assert await store.pending_claims() == []
    assert claimed_onchain(chain, cid) == 90
    assert claim_events(chain, cid) == 1


@ANVIL
async def test_claim_whose_answer_was_lost_is_not_sent_again(
    chain: Any, mp: MakeMp, store: AsyncVoucherStore, node_link: Any
) -> None:
    """The node took the claim transaction but its answer never came back (the link was cut
    as it replied): the claim may be out, so its intent stays open as sent, and no second
    claim is broadcast while the first waits in the mempool; once mined it is confirmed."""
    cid = await open_channel(chain, mp)
    operator = chain.addr("operator")
    nonce = chain.w3.eth.get_transaction_count(operator)
    s = proxied_settler(store, chain, node_link.w3)
    await accept(store, s, chain, mp, cid, 25)
    with mempool_held(chain):
        node_link.proxy.lose_reply_to(b"eth_sendRawTransaction")
        (result,) = await s.settle_now()
        assert node_link.proxy.replies_lost == 1
        assert (result.status, result.tx_hash is not None) == ("pending", True)
        assert [p.state for p in await store.pending_claims()] == ["sent"]
        await asyncio.sleep(0.3)  # past any backoff
        assert await s.settle_now() == []  # in the mempool: not broadcast again
        assert chain.w3.eth.get_transaction_count(operator, "pending") == nonce + 1
    async with running(s):
        await eventually(lambda: s.claims_confirmed == 1)
    assert await store.pending_claims() == []
    assert await store.claimed_onchain(cid) == 25
    assert claimed_onchain(chain, cid) == 25
    assert claim_events(chain, cid) == 1
    assert chain.w3.eth.get_transaction_count(operator) == nonce + 1  # one claim, ever


@ANVIL
async def test_node_down_then_back(
    chain: Any, mp: MakeMp, store: AsyncVoucherStore, node_link: Any
) -> None:
    cid = await open_channel(chain, mp)
    s = proxied_settler(store, chain, node_link.w3, threshold=10)
    await node_link.proxy.stop()  # the node goes away
    async with running(s):
        await accept(store, s, chain, mp, cid, 25)
        await eventually(lambda: s.failures >= 2)
        assert s.claims_confirmed == 0
        await node_link.proxy.start()  # same port: the node is back
        await eventually(lambda: s.claims_confirmed == 1)
    assert claimed_onchain(chain, cid) == 25
    assert claim_events(chain, cid) == 1
    assert await store.pending_claims() == []


# --- the claim rule: the highest accepted voucher within delivered value -----------------

EMBEDDED = pytest.mark.parametrize("chain", ["embedded"], indirect=True)


@BOTH
async def test_claims_the_highest_voucher_within_delivered_value(
    chain: Any, mp: MakeMp, store: AsyncVoucherStore
) -> None:
    """Vouchers 1000 -> 2000 -> 3000 while 2500 was delivered (the buyer's vouchers run ahead
    of the broker's count, e.g. after a kill): the latest is credit, but 2000 was delivered
    and is claimed now; 3000 once delivery reaches it. Never anything above delivered."""
    cid = await open_channel(chain, mp)
    delivered = {cid: 2500}
    s = settler(store, mp, delivered=delivered.__getitem__)
    for amount in (1000, 2000, 3000):
        await accept(store, s, chain, mp, cid, amount)
    (result,) = await s.settle_now()
    assert (result.status, result.amount, result.claimed) == ("confirmed", 2000, 2000)
    assert claimed_onchain(chain, cid) == 2000
    assert await s.settle_now() == []  # 3000 is still above what was delivered
    delivered[cid] = 3000
    (result,) = await s.settle_now()
    assert (result.amount, claimed_onchain(chain, cid)) == (3000, 3000)
    assert claim_events(chain, cid) == 2


@EMBEDDED
async def test_closing_channel_claims_the_highest_voucher_within_delivered_value(
    chain: Any, mp: MakeMp, store: AsyncVoucherStore
) -> None:
    """The margin-before-close claim follows the same rule: what was delivered is claimed
    before the payer can withdraw it, the undelivered rest of the latest voucher is not."""
    cid = await open_channel(chain, mp)
    s = settler(
        store, mp, before_close_margin_seconds=600, clock=chain.now, delivered={cid: 2500}.get
    )
    for amount in (1000, 2000, 3000):
        await accept(store, s, chain, mp, cid, amount)
    request = await mp("buyer").channels.request_close(cid)
    chain.time_travel(request.closes_at - chain.now() - 500)
    async with running(s):
        await eventually(lambda: s.claims_confirmed == 1)
        await asyncio.sleep(0.1)
    assert claimed_onchain(chain, cid) == 2000


@EMBEDDED
async def test_threshold_counts_what_is_claimable_not_the_latest_voucher(
    chain: Any, mp: MakeMp, store: AsyncVoucherStore
) -> None:
    """The threshold is there to amortise gas: a voucher far above delivered value must not
    trigger a claim of a claimable gain below the threshold (one per voucher would burn gas)."""
    cid = await open_channel(chain, mp)
    delivered = {cid: 0}
    s = settler(store, mp, threshold=1000, delivered=delivered.__getitem__)
    async with running(s):
        for amount in range(100, 1001, 100):  # each 100 above what was delivered before it
            delivered[cid] = amount - 100
            await accept(store, s, chain, mp, cid, amount)
            await asyncio.sleep(0.05)
        assert s.claims_confirmed == 0  # claimable 900 < threshold 1000: no claim yet
        delivered[cid] = 1000
        await accept(store, s, chain, mp, cid, 1100)
        await eventually(lambda: s.claims_confirmed == 1)
    assert claimed_onchain(chain, cid) == 1000
