"""The stages of ``blendsm demo``, in the order :func:`~blendsm.cli._demo_run.run_demo` runs
them: set up the chain and enrol the parties, start the broker, connect the parties (open
channels, grant topic keys, subscribe, connect the devices), stream, settle (pay what is
outstanding, anchor and prove, claim on chain, rate), close the channels and withdraw.
The report and its invariants are in :mod:`blendsm.cli._demo_report`.

Each stage says what it does on the progress line before it does it, so a stalled demo
shows where it stalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coincurve import PrivateKey
from eth_account.signers.local import LocalAccount
from web3 import AsyncWeb3

from blendsm.broker import (
    ChainConnection,
    MarketplaceService,
    RunningBroker,
    parse_config,
    start_broker,
)
from blendsm.cli._demo_parts import (
    BUYERS,
    CHALLENGE_PERIOD,
    CREDIT_MESSAGES,
    DEPOSIT,
    DEVICES,
    ENCRYPTED_TOPIC,
    FEE_BPS,
    PAY_EVERY,
    PRICES,
    PROOF_SAMPLING,
    LoopChainReader,
    Progress,
    Tally,
    until,
)
from blendsm.contracts import (
    EMBEDDED,
    Deployment,
    Marketplace,
    Policy,
    Role,
    connect,
    deploy_suite,
    enrol_operator,
    new_embedded_chain,
    test_account,
)
from blendsm.device_sdk import (
    IntegrityKind,
    Publisher,
    Subscriber,
    SubscriberStats,
    TopicKeyring,
    TopicKeyService,
)
from blendsm.errors import ChainUnavailableError

__all__ = [
    "Closed",
    "DemoChain",
    "DemoMarket",
    "Settled",
    "close_and_withdraw",
    "connect_parties",
    "enrol_parties",
    "set_up_chain",
    "settle",
    "start_demo_broker",
    "stream",
]


@dataclass
class DemoChain:
    """The embedded chain with the suite deployed, and the TEST-ONLY parties on it."""

    tester: Any
    w3: AsyncWeb3[Any]
    deployment: Deployment
    accounts: dict[str, LocalAccount]
    addr: dict[str, str]
    mps: dict[str, Marketplace]
    """A Marketplace per party, signing as that party."""
    reader: Marketplace
    """A Marketplace that only reads."""


@dataclass
class DemoMarket:
    """The running marketplace: the chain, the broker, the SDK clients (closed at the end)
    and what each party did or saw."""

    chain: DemoChain
    running: RunningBroker
    tmp: Path
    view: Progress
    reader: LoopChainReader
    clients: list[Any] = field(default_factory=list)
    tallies: dict[str, Tally] = field(default_factory=lambda: {b: Tally() for b in BUYERS})
    published: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DEVICES, 0))
    subs: dict[str, Subscriber] = field(default_factory=dict)
    channels: dict[str, bytes] = field(default_factory=dict)
    keyrings: dict[str, TopicKeyring] = field(default_factory=dict)
    devices: dict[str, Publisher] = field(default_factory=dict)

    @property
    def service(self) -> MarketplaceService:
        return self.running.service

    @property
    def common(self) -> dict[str, Any]:
        """What every SDK client is given: where the broker is, whose it is, which chain."""
        return {
            "host": self.running.host,
            "port": self.running.port,
            "broker": self.chain.addr["operator"],
            "chain_id": self.chain.deployment.chain_id,
        }

    async def close(self) -> None:
        """Disconnect every client (newest first), then stop the broker."""
        for client in reversed(self.clients):
            closer: Callable[[], Any] = getattr(client, "close", None) or client.disconnect
            with contextlib.suppress(Exception):
                await asyncio.to_thread(closer)
        await self.running.stop()


@dataclass
class Settled:
    """What :func:`settle` left on chain."""

    claim_failures: list[Any]
    ratings: int
    seller_rating_x100: int


@dataclass
class Closed:
    """What :func:`close_and_withdraw` saw: each buyer's SDK figures before the close, and
    its refund."""

    stats: dict[str, SubscriberStats]
    vouchered: dict[str, int]
    refunds: dict[str, int]


# --- set up the chain and the broker ---------------------------------------------------------


async def set_up_chain(view: Progress) -> DemoChain:
    """An in-process chain, the suite deployed by the oracle, the operator enrolled."""
    labels = ("operator", "oracle", "seller", *BUYERS, *DEVICES)
    accounts = {label: test_account(f"demo:{label}") for label in labels}  # TEST ONLY
    addr: dict[str, str] = {label: acct.address for label, acct in accounts.items()}
    view.say("starting the in-process chain (TEST-ONLY accounts) and deploying the suite")
    tester = new_embedded_chain(fund=[addr[x] for x in ("operator", "oracle", "seller", *BUYERS)])
    w3 = connect(EMBEDDED, ethereum_tester=tester)
    deployment = await deploy_suite(w3, accounts["oracle"], challenge_period=CHALLENGE_PERIOD)
    await enrol_operator(w3, deployment, accounts["operator"], accounts["oracle"])
    mps = {label: Marketplace(w3, deployment, accounts[label]) for label in labels}
    return DemoChain(tester, w3, deployment, accounts, addr, mps, Marketplace(w3, deployment))


async def enrol_parties(chain: DemoChain, view: Progress) -> None:
    """The oracle admits the seller and the buyers; the seller registers its devices and
    lists the paid topics, one of them end-to-end encrypted."""
    mps, addr = chain.mps, chain.addr
    view.say("enrolling a seller with three devices and two buyers through the oracle")
    for label, role in (("seller", Role.SELLER), *((b, Role.BUYER) for b in BUYERS)):
        await mps[label].registry.apply_for_role(role)
        await mps["oracle"].registry.approve(addr[label])
    for device in DEVICES:
        await mps["seller"].registry.add_device(addr[device])
    topic_ids: dict[str, bytes] = {}
    for topic, price in PRICES.items():
        created = await mps["seller"].market.create_topic(topic, price, None, Policy.OPEN)
        topic_ids[topic] = created.topic_id
    await mps["seller"].market.set_encrypted(topic_ids[ENCRYPTED_TOPIC], True)


async def start_demo_broker(
    chain: DemoChain, data_dir: Path, duration: float, view: Progress
) -> RunningBroker:
    """The broker on 127.0.0.1 (a free port) over the demo's chain, settling twice per run."""
    config = parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "chain": {"endpoint": "embedded", "confirmations": 0, "poll_interval": 0.1},
            "payments": {
                "credit_messages": CREDIT_MESSAGES,
                "settlement": {"interval_seconds": max(2.0, duration / 2)},
            },
            "anchoring": {"batch_seconds": 1.0, "max_roots_per_hour": 3600},  # a root a second
            "data_dir": str(data_dir),
            "log_level": "WARNING",
        }
    )
    connection = ChainConnection(
        chain.w3, chain.deployment, chain.accounts["operator"], chain.tester
    )
    running = await start_broker(config, chain=connection)
    service = running.service
    if service.anchorer is None or service.settler is None:  # start_broker sets both
        await running.stop()
        raise ChainUnavailableError("the marketplace service did not start")
    view.say(
        f"broker listening on {running.host}:{running.port} (operator {chain.addr['operator']})"
    )
    return running


# --- connect the parties ---------------------------------------------------------------------


async def connect_parties(market: DemoMarket) -> None:
    """Channels first (the key service recovers buyers' public keys from those transactions),
    then topic keys, then the buyers subscribe and the devices connect."""
    await _open_channels(market)
    await _grant_topic_keys(market)
    await _subscribe_buyers(market)
    await _connect_devices(market)


async def _open_channels(market: DemoMarket) -> None:
    chain = market.chain
    registry = chain.deployment.address("Registry")
    for buyer in BUYERS:
        sub = Subscriber(
            chain.accounts[buyer],
            channels_contract=chain.deployment.address("PaymentChannels"),
            pay_every=PAY_EVERY,
            registry=registry,
            chain_reader=market.reader,
            proof_sampling=PROOF_SAMPLING,
            **market.common,
        )
        market.channels[buyer] = await sub.open_channel(
            chain.mps[buyer], chain.addr["seller"], DEPOSIT, fee_bps=FEE_BPS
        )
        market.subs[buyer] = sub
    market.view.say(
        f"opened {len(market.channels)} channels of {DEPOSIT} wei each,"
        f" operator fee {FEE_BPS / 100:g} %"
    )


async def _grant_topic_keys(market: DemoMarket) -> None:
    """The seller's key service grants the encrypted topic's key to its device and the buyers."""
    chain, common = market.chain, market.common
    accounts, addr = chain.accounts, chain.addr
    device_key = PrivateKey(bytes(accounts["device-3"].key)).public_key.format(False)
    keys = TopicKeyService(
        bytes(accounts["seller"].key),
        marketplace=chain.mps["seller"],
        topics=[ENCRYPTED_TOPIC],
        state_dir=market.tmp / "seller-keys",
        devices={addr["device-3"]: device_key},
        **common,
    )
    market.clients.append(keys)
    await asyncio.to_thread(keys.connect)
    market.keyrings.update(
        {
            label: TopicKeyring(
                bytes(accounts[label].key), topics={ENCRYPTED_TOPIC: addr["seller"]}, **common
            )
            for label in ("device-3", *BUYERS)
        }
    )
    for keyring in market.keyrings.values():
        market.clients.append(keyring)
        await asyncio.to_thread(keyring.connect)
    await keys.grant_devices()
    for buyer in BUYERS:
        await keys.grant(addr[buyer])
    for label, keyring in market.keyrings.items():
        if not await asyncio.to_thread(keyring.wait_for_epoch, ENCRYPTED_TOPIC, 1):
            raise ChainUnavailableError(f"{label} got no key for {ENCRYPTED_TOPIC}")
    market.view.say(f"topic keys of {ENCRYPTED_TOPIC} granted to the device and both buyers")


async def _subscribe_buyers(market: DemoMarket) -> None:
    """Each buyer's Subscriber counts into its tally, and subscribes once the broker's chain
    view knows every channel (so no delivery is refused for an unknown channel)."""
    for buyer in BUYERS:
        sub, tally = market.subs[buyer], market.tallies[buyer]
        sub.keyring = market.keyrings[buyer]
        sub.on_message = tally.on_message
        sub.on_integrity = tally.on_integrity
        sub.on_error = tally.on_error

    def channels_seen() -> bool:
        return all(market.service.view.channel(c) is not None for c in market.channels.values())

    if not await until(channels_seen, 15):
        raise ChainUnavailableError("the broker's chain view did not see the channels")
    for sub in market.subs.values():
        market.clients.append(sub)
        await asyncio.to_thread(sub.connect)
        for topic in PRICES:
            await asyncio.to_thread(sub.subscribe, topic, 0)
    market.service.meter.credit_messages = CREDIT_MESSAGES


async def _connect_devices(market: DemoMarket) -> None:
    registry = market.chain.deployment.address("Registry")
    for device in DEVICES:
        pub = Publisher(
            market.chain.accounts[device],
            registry=registry,
            state_dir=market.tmp / device,
            encryptor=market.keyrings["device-3"].encryptor if device == "device-3" else None,
            **market.common,
        )
        market.clients.append(pub)
        await asyncio.to_thread(pub.connect)
        market.devices[device] = pub


# --- stream ----------------------------------------------------------------------------------


async def stream(market: DemoMarket, duration: float, rate_hz: float) -> None:
    """Every device publishes signed readings on its topic at ``rate_hz`` for ``duration``
    seconds (a thread each); then wait until every message is delivered or held back for
    credit and the Subscribers are idle."""
    service, published = market.service, market.published
    topic_of = dict(zip(DEVICES, PRICES, strict=True))
    market.view.say(f"streaming signed readings from {len(DEVICES)} devices for {duration:g} s")
    stop = threading.Event()

    def publish(device: str) -> None:
        pub, topic = market.devices[device], topic_of[device]
        period = 1.0 / rate_hz
        nxt = time.monotonic()
        i = 0
        while not stop.is_set():
            reading = f'{{"device":"{device}","n":{i},"t":{time.time():.3f}}}'.encode()
            pub.publish(topic, reading, qos=1)
            published[device] += 1
            i += 1
            nxt += period
            stop.wait(max(0.0, nxt - time.monotonic()))

    threads = [threading.Thread(target=publish, args=(d,), daemon=True) for d in DEVICES]
    for t in threads:
        t.start()
    stream_start = time.monotonic()

    def line() -> str:
        vouchered = sum(market.subs[b].vouchered(market.channels[b]) for b in BUYERS)
        proofs = sum(
            t.events.get(str(IntegrityKind.PROOF_VERIFIED), 0) for t in market.tallies.values()
        )
        return (
            f"  {time.monotonic() - stream_start:5.1f}s  published {sum(published.values())}"
            f"  delivered {service.meter.delivered}  vouchers {service.stats.vouchers_accepted}"
            f" ({vouchered} wei)  anchors {service.stats.anchor_notices}"
            f"  proofs ok {proofs}"
        )

    try:
        while time.monotonic() - stream_start < duration:
            market.view.show(line())
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            await asyncio.to_thread(t.join, 10)
    market.view.show(line(), force=True)
    for pub in market.devices.values():
        await asyncio.to_thread(pub.flush, 15)
    expected = sum(published.values()) * len(BUYERS)
    await until(lambda: service.meter.delivered + service.meter.denied_no_credit >= expected, 15)
    for sub in market.subs.values():
        await asyncio.to_thread(sub.wait_idle, 15)


# --- settle ----------------------------------------------------------------------------------


async def settle(market: DemoMarket) -> Settled:
    """Pay what is outstanding, anchor the last leaves and check the sampled proofs, claim
    the vouchers on chain, and have both sides of every channel that paid rate each other."""
    service, subs, channels, view = market.service, market.subs, market.channels, market.view
    anchorer, settler = service.anchorer, service.settler
    # start_demo_broker refused to start without them
    assert anchorer is not None
    assert settler is not None

    view.say("paying the outstanding vouchers")

    def paid_up() -> bool:
        for sub in subs.values():
            sub.pay_outstanding()
        return all(
            (a := service.meter.accounts.get(channels[b])) is not None
            and a.paid == a.charged == subs[b].vouchered(channels[b])
            for b in BUYERS
        )

    await until(paid_up, 20, 0.1)

    view.say("anchoring the last leaves and checking sampled proofs against the chain")
    await anchorer.anchor_now()
    await until(lambda: all(s.pending_proofs() == 0 for s in subs.values()), 20, 0.1)
    for sub in subs.values():
        await asyncio.to_thread(sub.wait_idle, 15)

    view.say("settling the vouchers on chain")
    results = await settler.settle_now()
    claim_failures = [r for r in results if r.status != "confirmed"]

    chain = market.chain
    ratings = 0
    for buyer in BUYERS:
        info = await chain.reader.channels.channel(channels[buyer])
        if info is not None and info.claimed > 0:
            await chain.mps[buyer].ratings.rate(channels[buyer], 5)
            await chain.mps["seller"].ratings.rate(channels[buyer], 4)
            ratings += 2
    seller_rating = await chain.reader.ratings.average_x100(chain.addr["seller"])
    view.say(f"rated both sides of every channel ({ratings} ratings)")
    return Settled(claim_failures, ratings, seller_rating)


# --- close and withdraw ----------------------------------------------------------------------


async def close_and_withdraw(market: DemoMarket) -> Closed:
    """Every buyer requests the close of its channel; the chain's clock jumps past the
    challenge period and the buyers withdraw what was not claimed."""
    chain, subs, channels = market.chain, market.subs, market.channels
    market.view.say("closing the channels and withdrawing the rest after the challenge period")
    stats = {b: subs[b].stats for b in BUYERS}
    vouchered = {b: subs[b].vouchered(channels[b]) for b in BUYERS}
    for buyer, sub in subs.items():
        await sub.close_channel(chain.mps[buyer], channels[buyer])
    latest = await chain.w3.eth.get_block("latest")
    chain.tester.time_travel(int(latest["timestamp"]) + CHALLENGE_PERIOD + 1)
    chain.tester.mine_blocks(1)
    refunds: dict[str, int] = {}
    for buyer, sub in subs.items():
        refunds[buyer] = (await sub.withdraw(chain.mps[buyer], channels[buyer])).refund
    return Closed(stats, vouchered, refunds)
