"""Fixtures for the end-to-end tests: a real BlendSM broker on 127.0.0.1 (free port) in front of
the test chain (embedded py-evm, or anvil by indirect parametrisation), participants enrolled
through the contracts, and real paho MQTT clients authenticated with CONNECT tokens.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import Client, enrol, eventually, poll

from blendsm.broker import ChainConnection, ChainView, RunningBroker, parse_config, start_broker
from blendsm.contracts import Marketplace, Policy, Role, connect, disconnect, free_port
from blendsm.device_sdk import (
    ConnectTokenSigner,
    EnvelopeSigner,
    MessageDomain,
    Publisher,
    Subscriber,
    VoucherDomain,
    Web3ChainReader,
    decode_notice,
    encode_voucher,
    sign_voucher,
)

PRICE = 1_000
"""Price of one message on the default paid topic, in wei."""
OPERATOR_KEY_ENV = "BLENDSM_TEST_OPERATOR_KEY"
"""Environment variable a broker process reads the operator's TEST-ONLY key from."""


@dataclass
class Market:
    """An enrolled marketplace behind a running broker."""

    chain: Any
    mp: Callable[[str], Marketplace]
    running: RunningBroker
    topic: str
    topic_id: bytes
    clients: list[Client] = field(default_factory=list)
    price: int = PRICE

    @property
    def host(self) -> str:
        return self.running.host

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def service(self) -> Any:
        return self.running.service

    def signer(self, label: str) -> ConnectTokenSigner:
        return ConnectTokenSigner(
            bytes(self.chain.accounts[label].key),
            self.chain.deployment.chain_id,
            self.chain.accounts["operator"].address,
        )

    def envelope_signer(self, label: str) -> EnvelopeSigner:
        deployment = self.chain.deployment
        return EnvelopeSigner(
            bytes(self.chain.accounts[label].key),
            MessageDomain(deployment.chain_id, deployment.address("Registry")),
        )

    def client(self, label: str | None, **kwargs: Any) -> Client:
        """A raw client for the TEST-ONLY account ``label`` (None: anonymous); every account
        signs its market PUBLISHes as a device would (only devices are accepted there)."""
        account = None if label is None else self.chain.accounts[label]
        signer = None if label is None else self.signer(label)
        if label is not None:
            kwargs.setdefault("envelope_signer", self.envelope_signer(label))
        made = Client(self.host, self.port, account=account, signer=signer, **kwargs)
        self.clients.append(made)
        return made

    def sdk_subscriber(self, label: str = "buyer", **options: Any) -> Subscriber:
        """An SDK Subscriber for the TEST-ONLY account ``label``, paying through this
        broker (``options``: ``pay_every``, ``registry``, ``chain_reader``...).

        One voucher per message unless ``pay_every`` says otherwise: these tests follow the
        money message by message. The SDK's default schedule (half the quoted credit, the
        rest within ``pay_within``) has its own tests (``test_payment_schedule.py``) and runs
        in the demo and the benchmarks."""
        deployment = self.chain.deployment
        options.setdefault("pay_every", 1)
        return Subscriber(
            self.chain.accounts[label],
            host=self.host,
            port=self.port,
            broker=self.chain.addr("operator"),
            chain_id=deployment.chain_id,
            channels_contract=deployment.address("PaymentChannels"),
            **options,
        )

    def proving_subscriber(self, record: Path, label: str = "buyer") -> Subscriber:
        """An SDK Subscriber that checks every message's inclusion proof against anvil
        and keeps a record at ``record``."""
        deployment = self.chain.deployment
        assert self.chain.anvil is not None
        return self.sdk_subscriber(
            label,
            registry=deployment.address("Registry"),
            chain_reader=Web3ChainReader(self.chain.anvil.url, deployment),
            proof_sampling=1.0,
            record_path=record,
        )

    def sdk_publisher(self, state_dir: Path, label: str = "device", **options: Any) -> Publisher:
        """An SDK Publisher (a device) for the TEST-ONLY account ``label``, its state in
        ``state_dir``."""
        deployment = self.chain.deployment
        return Publisher(
            self.chain.accounts[label],
            host=self.host,
            port=self.port,
            broker=self.chain.addr("operator"),
            chain_id=deployment.chain_id,
            registry=deployment.address("Registry"),
            state_dir=state_dir,
            **options,
        )

    async def open_channel(self, buyer: str, deposit: int = 10**15, fee_bps: int = 0) -> bytes:
        return await open_channel(self.mp, self.chain, buyer, deposit, fee_bps)

    async def channel_client(self, label: str, **kwargs: Any) -> tuple[Client, bytes]:
        """A connected raw client for ``label`` with a fresh channel to the seller, subscribed
        to its own notice topic; and the channel id."""
        channel = await self.open_channel(label)
        await self.wait_channel(channel)
        client = self.client(label, **kwargs)
        assert await client.connect() == 0
        own = f"blendsm/ctl/{self.chain.addr(label).lower()}/notice"
        assert await client.subscribe(own) == [0]
        return client, channel

    async def queued_offline(self, label: str, client_id: str, count: int) -> bytes:
        """``label``'s persistent session ``client_id`` (a fresh channel), subscribed at QoS 1
        and gone, with ``count`` QoS 1 messages (``q0``, ``q1``...) queued for it; its channel."""
        client, channel = await self.channel_client(label, client_id=client_id, clean_session=False)
        assert await client.subscribe(self.topic, qos=1) == [1]
        client.close()
        device = await self.connected_device()
        for i in range(count):
            await device.publish(self.topic, b"q%d" % i, qos=1)
        return channel

    async def connected_device(self) -> Client:
        """The seller's registered device, connected (it signs what it publishes)."""
        device = self.client("device")
        assert await device.connect() == 0
        return device

    async def wait_view(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        """Wait until the broker's chain view reflects a change (it polls the chain)."""
        await eventually(predicate, within, what="the broker's chain view catching up")

    async def wait_channel(self, channel_id: bytes) -> None:
        await self.wait_view(lambda: self.service.view.channel(channel_id) is not None)

    def close_clients(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.close()


def broker_config(data_dir: Path, **overrides: Any) -> Any:
    config = parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "chain": {"endpoint": "embedded", "confirmations": 0, "poll_interval": 0.05},
            "payments": {"credit_messages": 5, "settlement": {"interval_seconds": 3600}},
            "data_dir": str(data_dir),
            "public_topics": True,
        }
    )
    return replace(config, **overrides) if overrides else config


async def enrol_market(
    mp: Callable[[str], Marketplace],
    chain: Any,
    topic: str,
    *,
    price: int = PRICE,
    buyers: Sequence[str] = ("buyer", "buyer2"),
) -> bytes:
    """Enrol the seller, ``buyers`` and the operator, add the seller's device and create the
    paid open ``topic``; returns its topic id."""
    await enrol(mp, chain, "seller", Role.SELLER)
    for buyer in buyers:
        await enrol(mp, chain, buyer, Role.BUYER)
    await enrol(mp, chain, "operator", Role.OPERATOR)
    await mp("seller").registry.add_device(chain.addr("device"))
    created = await mp("seller").market.create_topic(topic, price, None, Policy.OPEN)
    return created.topic_id


async def open_channel(
    mp: Callable[[str], Marketplace],
    chain: Any,
    buyer: str,
    deposit: int = 10**15,
    fee_bps: int = 0,
) -> bytes:
    """A native-coin channel ``buyer`` -> seller through the operator; its id."""
    opened = await mp(buyer).channels.open(
        chain.addr("seller"), chain.addr("operator"), None, deposit, fee_bps
    )
    return opened.channel_id


def split_messages(messages: list[Any], topic: str) -> tuple[list[bytes], list[Any]]:
    """The payloads on ``topic`` and the decoded control notices, from what a client got."""
    data = [m.payload for m in messages if m.topic == topic]
    notices = [decode_notice(m.payload) for m in messages if m.topic.endswith("/notice")]
    return data, notices


def voucher_payload(
    chain: Any, label: str, channel: bytes, amount: int, lane: str | None = None
) -> bytes:
    """A voucher of the TEST-ONLY account ``label`` for ``amount`` (cumulative) on ``lane``
    (default: the operator's own, a broker without broker_key) of ``channel``, encoded as
    published on its voucher topic."""
    domain = VoucherDomain(chain.deployment.chain_id, chain.deployment.address("PaymentChannels"))
    key = bytes(chain.accounts[label].key)
    lane = lane or chain.addr("operator")
    return encode_voucher(sign_voucher(key, domain, channel, lane, amount))


class Payer:
    """Signs vouchers for a TEST-ONLY account and publishes them on its voucher topic."""

    def __init__(self, market: Market, label: str, client: Any) -> None:
        chain = market.chain
        self.key = bytes(chain.accounts[label].key)
        self.domain = VoucherDomain(
            chain.deployment.chain_id, chain.deployment.address("PaymentChannels")
        )
        self.topic = f"blendsm/ctl/{chain.addr(label).lower()}/voucher"
        self.client = client
        self.lane = chain.addr("operator")
        """The broker's lane: the operator's own (no broker_key)."""

    async def pay(
        self,
        channel: bytes,
        amount: int,
        *,
        domain: VoucherDomain | None = None,
        key: bytes | None = None,
        lane: str | None = None,
    ) -> None:
        voucher = sign_voucher(
            key or self.key, domain or self.domain, channel, lane or self.lane, amount
        )
        await self.client.publish(self.topic, encode_voucher(voucher), qos=1)

    async def raw(self, payload: bytes) -> None:
        await self.client.publish(self.topic, payload, qos=1)


StartMarket = Callable[..., Awaitable[Market]]


@pytest.fixture
async def start_market(
    chain: Any, w3: Any, mp: Callable[[str], Marketplace], tmp_path: Path
) -> AsyncIterator[StartMarket]:
    """``await start_market(topic="paid/temp", *, buyers=("buyer", "buyer2"), **config)``: the
    marketplace of ``enrol_market`` behind a running broker (``broker_config`` with ``config``
    overrides, e.g. ``http=HttpConfig(port=0)``); clients closed and broker stopped after."""
    started: list[Market] = []

    async def start(
        topic: str = "paid/temp",
        *,
        buyers: Sequence[str] = ("buyer", "buyer2"),
        **overrides: Any,
    ) -> Market:
        topic_id = await enrol_market(mp, chain, topic, buyers=buyers)
        running = await start_broker(
            broker_config(tmp_path / "data", **overrides),
            chain=ChainConnection(w3, chain.deployment, chain.accounts["operator"], owned=False),
        )
        started.append(Market(chain, mp, running, topic, topic_id))
        return started[-1]

    try:
        yield start
    finally:
        for m in reversed(started):
            m.close_clients()
            await m.running.stop()


@pytest.fixture
async def market(start_market: StartMarket) -> Market:
    """Seller with one device, two buyers, a paid open topic, and a running broker."""
    return await start_market()


@dataclass
class ProxiedBroker:
    """A broker talking to anvil through a TCP proxy that the test can cut (the chain node
    going away), with a chain view that calls the chain unavailable one second after the
    node stops answering."""

    running: RunningBroker
    proxy: Any
    view: ChainView
    w3: Any


StartProxiedBroker = Callable[..., Awaitable[ProxiedBroker]]


def proxied_config(chain: Any, data_dir: Path, **sections: Any) -> Any:
    """The config of a broker for ``proxied_broker`` on the anvil chain (its chain endpoint
    is not dialled), public topics on, ``sections`` (``payments``, ``anchoring``...) added.
    No confirmations: anvil mines only on demand, so a claim would wait for blocks."""
    assert chain.anvil is not None
    return parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "chain": {
                "endpoint": chain.anvil.url,
                "deployment": "unused.json",
                "confirmations": 0,
                "poll_interval": 0.05,
            },
            "operator_key": {"env": "UNUSED"},
            "data_dir": str(data_dir),
            "public_topics": True,
            **sections,
        }
    )


@dataclass
class Participants:
    """Raw clients of the TEST-ONLY accounts on a broker the test started itself (devices
    sign what they publish); :meth:`close` closes them all."""

    chain: Any
    port: int
    made: list[Client] = field(default_factory=list)

    def client(self, label: str | None) -> Client:
        chain = self.chain
        if label is None:
            made = Client("127.0.0.1", self.port)
        else:
            key = bytes(chain.accounts[label].key)
            deployment = chain.deployment
            made = Client(
                "127.0.0.1",
                self.port,
                account=chain.accounts[label],
                signer=ConnectTokenSigner(key, deployment.chain_id, chain.addr("operator")),
                envelope_signer=EnvelopeSigner(
                    key, MessageDomain(deployment.chain_id, deployment.address("Registry"))
                ),
            )
        self.made.append(made)
        return made

    def close(self) -> None:
        for c in self.made:
            with contextlib.suppress(Exception):
                c.close()


@pytest.fixture
async def proxied_broker(chain: Any, tcp_proxy: Any) -> AsyncIterator[StartProxiedBroker]:
    """``await proxied_broker(config, **start_broker_options)`` on the anvil chain: the broker
    is handed the proxied connection (``config``'s chain endpoint is not dialled) and a chain
    view that fails closed after ``max_staleness`` (1 s) without catching up; it is stopped
    and the connection closed after the test."""
    connections: list[Any] = []
    started: list[RunningBroker] = []

    async def start(config: Any, *, max_staleness: float = 1.0, **options: Any) -> ProxiedBroker:
        assert chain.anvil is not None
        proxy = tcp_proxy(chain.anvil.port)
        await proxy.start()
        w3 = connect(f"http://127.0.0.1:{proxy.port}", request_timeout=1.0)
        connections.append(w3)
        view = ChainView(
            w3,
            chain.deployment,
            confirmations=0,
            poll_interval=0.05,
            max_staleness=max_staleness,
            backoff_max=0.5,
        )
        running = await start_broker(
            config,
            chain=ChainConnection(w3, chain.deployment, chain.accounts["operator"], owned=False),
            view=view,
            **options,
        )
        started.append(running)
        return ProxiedBroker(running, proxy, view, w3)

    try:
        yield start
    finally:
        for running in reversed(started):
            await running.stop()
        for w3 in connections:
            await disconnect(w3)


@pytest.fixture
def until() -> Callable[..., Any]:
    """``await until(predicate, within)``: poll without blocking the broker's event loop."""
    return poll


@pytest.fixture
def mqtt_client() -> type[Client]:
    """The raw test client class (``support.Client``), for tests that run their own broker."""
    return Client


def anvil_broker_config(
    chain: Any, folder: Path, operator: str = "operator"
) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``chain``, ``operator_key`` and ``data_dir`` sections of a broker YAML in ``folder``
    on the test's anvil chain (its deployment saved there), and the environment holding the
    TEST-ONLY key of the ``operator`` account that ``operator_key`` names."""
    chain.deployment.save(folder / "deployment.json")
    sections = {
        "chain": {
            "endpoint": chain.anvil.url,
            "deployment": "deployment.json",
            "confirmations": 0,
            "poll_interval": 0.05,
        },
        "operator_key": {"env": OPERATOR_KEY_ENV},
        "data_dir": "data",
    }
    return sections, {OPERATOR_KEY_ENV: chain.accounts[operator].key.hex()}  # TEST ONLY


@dataclass
class PlainAmqttMarket:
    """A broker built by amqtt from a plain config naming ``MarketplacePlugin`` (and any other
    plugins), on the test's anvil chain: seller with a device, a buyer with an open channel to
    the seller on ``topic``. ``client(label)`` makes a raw client for a TEST-ONLY account."""

    broker: Any
    port: int
    channel: bytes
    chain: Any

    @contextlib.asynccontextmanager
    async def running(self, until: Callable[..., Any]) -> AsyncIterator[tuple[Client, ...]]:
        """Start the broker, wait for the buyer's channel in its view, and yield raw clients
        (not connected) for buyer, device and anonymous; closed and stopped after."""
        await self.broker.start()
        clients = tuple(self.client(label) for label in ("buyer", "device", None))
        try:
            service = self.broker.service
            await until(lambda: service.view.channel(self.channel) is not None, 10)
            yield clients
        finally:
            for c in clients:
                c.close()
            await self.broker.shutdown()

    def client(self, label: str | None) -> Client:
        if label is None:
            return Client("127.0.0.1", self.port)
        chain = self.chain
        account, deployment = chain.accounts[label], chain.deployment
        key = bytes(account.key)
        return Client(
            "127.0.0.1",
            self.port,
            account=account,
            signer=ConnectTokenSigner(key, deployment.chain_id, chain.addr("operator")),
            envelope_signer=EnvelopeSigner(
                key, MessageDomain(deployment.chain_id, deployment.address("Registry"))
            ),
        )


async def plain_amqtt_market(
    chain: Any,
    mp: Callable[[str], Marketplace],
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    topic: str,
    plugins: dict[str, Any] | None = None,
    **sections: Any,
) -> PlainAmqttMarket:
    """Enrol the market on anvil and build (not start) an amqtt ``Broker`` from a plain config:
    ``MarketplacePlugin`` reading a BlendSM YAML (``sections`` added to it), then ``plugins``."""
    from amqtt.broker import Broker

    # The broker's operator is an active Operator, as Brokers.isServing requires of it.
    for label, role in (
        ("seller", Role.SELLER),
        ("buyer", Role.BUYER),
        ("operator", Role.OPERATOR),
    ):
        await enrol(mp, chain, label, role)
    await mp("seller").registry.add_device(chain.addr("device"))
    await mp("seller").market.create_topic(topic, PRICE, None, Policy.OPEN)
    channel = (
        await mp("buyer").channels.open(chain.addr("seller"), chain.addr("operator"), None, 10**15)
    ).channel_id
    config, env = anvil_broker_config(chain, folder)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (folder / "blendsm.yaml").write_text(yaml.safe_dump({**config, **sections}))
    port = free_port()
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "blendsm.plugins.MarketplacePlugin": {"config": str(folder / "blendsm.yaml")},
                **(plugins or {}),
            },
        }
    )
    return PlainAmqttMarket(broker, port, channel, chain)


def _start_broker_process(config: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "blendsm.cli", "broker", "-c", str(config)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "listening on" in line:
            _drain_in_background(proc)
            return proc
    proc.kill()
    raise AssertionError("broker did not start:\n" + "".join(lines))


def _drain_in_background(proc: subprocess.Popen[str]) -> None:
    """Keep reading the broker's output after it listens: a pipe nobody reads fills (64 KiB)
    and a chatty broker then blocks in its next log write, which a crash test would take for
    a hung broker. The last lines are kept on ``proc.output_tail`` for failure messages."""
    tail: deque[str] = deque(maxlen=200)
    proc.output_tail = tail  # type: ignore[attr-defined]
    stream = proc.stdout
    assert stream is not None

    def drain() -> None:
        try:
            for line in stream:
                tail.append(line)
        except (OSError, ValueError):  # the pipe was closed by the test's clean-up
            return

    threading.Thread(target=drain, name=f"broker-{proc.pid}-output", daemon=True).start()


@dataclass
class BrokerProcess:
    """A ``blendsm broker -c`` configuration on anvil (``config`` in the test's tmp_path, the
    operator's TEST-ONLY key in the environment) that :meth:`start` runs as a real process."""

    config: Path
    port: int
    env: dict[str, str]
    started: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(self) -> subprocess.Popen[str]:
        """Start the broker; returns once it listens (for crash tests that SIGKILL it)."""
        self.started.append(_start_broker_process(self.config, self.env))
        return self.started[-1]

    @staticmethod
    def stop(proc: subprocess.Popen[str], within: float = 20.0) -> None:
        """SIGTERM ``proc`` if still running; SIGKILL if it has not exited ``within`` s."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(within)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def broker_process(chain: Any, tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """``broker_process(**sections)``: a :class:`BrokerProcess` on the test's anvil chain with
    the deployment saved beside it and ``sections`` added to the YAML (``anchoring``,
    ``payments``...). Every process started is killed if still running, its pipe closed."""
    made: list[BrokerProcess] = []

    def make(**sections: Any) -> BrokerProcess:
        anvil, env = anvil_broker_config(chain, tmp_path)
        port = free_port()
        config = tmp_path / "broker.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": {"host": "127.0.0.1", "port": port},
                    **anvil,
                    "log_level": "WARNING",
                    **sections,
                }
            )
        )
        made.append(BrokerProcess(config, port, env))
        return made[-1]

    yield make
    for proc in (p for b in made for p in b.started):
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
