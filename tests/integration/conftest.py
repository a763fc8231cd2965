"""Fixtures for paid-delivery tests: a real BlendSM broker on 127.0.0.1 (free port) in front of
the test chain (embedded py-evm, or anvil by indirect parametrisation), participants enrolled
through the contracts, and real paho MQTT clients authenticated with CONNECT tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from blendsm.broker._chain_view import ChainView
from blendsm.broker._config import parse_config
from blendsm.broker._runner import ChainConnection, RunningBroker, start_broker
from blendsm.contracts import Marketplace
from blendsm.contracts._bindings import Policy, Role
from blendsm.contracts._connect import connect, disconnect
from blendsm.device_sdk import (
    ConnectTokenSigner,
    EnvelopeSigner,
    MessageDomain,
    decode_envelope,
)
from blendsm.errors import EnvelopeError

PRICE = 1_000
"""Price of one message on the default paid topic, in wei."""


# paho VERSION2 reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; map them back.
_CONNACK_V3 = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


@dataclass
class Received:
    """What one raw paho client got: messages, notices, SUBACKs, disconnects."""

    messages: queue.Queue[mqtt.MQTTMessage] = field(default_factory=queue.Queue)
    subacks: queue.Queue[list[int]] = field(default_factory=queue.Queue)
    connack: queue.Queue[int] = field(default_factory=queue.Queue)
    disconnected: threading.Event = field(default_factory=threading.Event)
    disconnected_at: float | None = None

    def _drain(self, within: float, until: int | None) -> list[mqtt.MQTTMessage]:
        got: list[mqtt.MQTTMessage] = []
        while until is None or len(got) < until:
            try:
                got.append(_unwrap(self.messages.get(timeout=within)))
            except queue.Empty:
                break
        return got

    async def drain(
        self, within: float = 0.5, *, until: int | None = None
    ) -> list[mqtt.MQTTMessage]:
        """Messages received until ``within`` seconds pass with none new (or ``until`` reached);
        waits on a thread so the broker, on this event loop, keeps running."""
        return await asyncio.to_thread(self._drain, within, until)


def _unwrap(message: mqtt.MQTTMessage) -> mqtt.MQTTMessage:
    """Replace a signed envelope's bytes by its payload, so tests compare readings."""
    if message.topic.startswith("blendsm/"):
        return message
    with contextlib.suppress(EnvelopeError):
        message.payload = decode_envelope(message.payload).payload
    return message


class Client:
    """A raw paho client (VERSION2 callbacks, TCP_NODELAY) for tests of the wire protocol.
    With ``envelope_signer`` (a device), payloads on market topics are signed envelopes."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        account: Any = None,
        signer: ConnectTokenSigner | None = None,
        client_id: str | None = None,
        clean_session: bool = True,
        password: str | None = None,
        username: str | None = None,
        envelope_signer: EnvelopeSigner | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.envelope_signer = envelope_signer
        self.sequence = 0
        self.account = account
        self.client_id = client_id or f"t-{uuid.uuid4().hex[:10]}"
        self.got = Received()
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=clean_session
        )
        if account is not None and signer is not None:
            c.username_pw_set(account.address, password or signer.token(self.client_id))
        elif username is not None or password is not None:
            c.username_pw_set(username, password)
        c.on_message = lambda _c, _u, m: self.got.messages.put(m)
        c.on_subscribe = lambda _c, _u, _m, codes, _p: self.got.subacks.put(
            [int(getattr(x, "value", x)) for x in codes]
        )
        c.on_connect = lambda _c, _u, _f, rc, _p: self.got.connack.put(
            _CONNACK_V3.get(int(getattr(rc, "value", rc)), -2)
        )

        def on_disconnect(*_a: Any) -> None:
            self.got.disconnected_at = time.monotonic()
            self.got.disconnected.set()

        c.on_disconnect = on_disconnect
        c.on_socket_open = lambda _c, _u, sock: sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        self.mqtt = c

    async def connect(self, within: float = 5.0) -> int:
        """CONNECT and return the CONNACK code (0 accepted, 5 not authorised, -1 none)."""
        await asyncio.to_thread(self.mqtt.connect, self.host, self.port, 30)
        self.mqtt.loop_start()
        try:
            return await asyncio.to_thread(self.got.connack.get, True, within)
        except queue.Empty:
            return -1

    async def subscribe(self, topic: str, qos: int = 0, within: float = 5.0) -> list[int]:
        self.mqtt.subscribe(topic, qos)
        return await asyncio.to_thread(self.got.subacks.get, True, within)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        *,
        sign: bool | None = None,
    ) -> None:
        """Publish; a device signs it unless the topic is public (``public/...``) or control."""
        signer = self.envelope_signer
        if sign is None:
            sign = signer is not None and not topic.startswith(("public/", "blendsm/"))
        if sign:
            assert signer is not None
            self.sequence += 1
            payload = signer.sign(topic, payload, self.sequence, int(time.time() * 1000)).encode()
        info = self.mqtt.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            await asyncio.to_thread(info.wait_for_publish, 5)

    async def wait_disconnected(self, within: float = 10.0) -> bool:
        return await asyncio.to_thread(self.got.disconnected.wait, within)

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


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

    async def open_channel(self, buyer: str, deposit: int = 10**15, fee_bps: int = 0) -> bytes:
        opened = await self.mp(buyer).channels.open(
            self.chain.addr("seller"), self.chain.addr("operator"), None, deposit, fee_bps
        )
        return opened.channel_id

    async def wait_view(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        """Wait until the broker's chain view reflects a change (it polls the chain)."""
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("broker chain view did not catch up in time")
            await asyncio.sleep(0.02)

    async def wait_channel(self, channel_id: bytes) -> None:
        await self.wait_view(lambda: self.service.view.channel(channel_id) is not None)

    def close_clients(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.close()


async def enrol(mp: Callable[[str], Marketplace], label: str, role: Role) -> None:
    await mp(label).registry.apply_for_role(role)
    await mp("oracle").registry.approve(mp(label).address or "")


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
    await enrol(mp, "seller", Role.SELLER)
    for buyer in buyers:
        await enrol(mp, buyer, Role.BUYER)
    await enrol(mp, "operator", Role.OPERATOR)
    await mp("seller").registry.add_device(chain.addr("device"))
    created = await mp("seller").market.create_topic(topic, price, None, Policy.OPEN)
    return created.topic_id


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


@pytest.fixture
async def proxied_broker(chain: Any, tcp_proxy: Any) -> AsyncIterator[StartProxiedBroker]:
    """``await proxied_broker(config, **start_broker_options)`` on the anvil chain: the broker
    is handed the proxied connection (``config``'s chain endpoint is not dialled); it is
    stopped and the connection closed after the test."""
    connections: list[Any] = []
    started: list[RunningBroker] = []

    async def start(config: Any, **options: Any) -> ProxiedBroker:
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
            max_staleness=1.0,
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


async def _until(predicate: Callable[[], bool], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


@pytest.fixture
def until() -> Callable[..., Any]:
    """``await until(predicate, within)``: poll without blocking the broker's event loop."""
    return _until


@pytest.fixture
def mqtt_client() -> type[Client]:
    """The raw test client class, for tests that run their own broker."""
    return Client


def _start_broker_process(config: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "blendsm.broker.cli", "broker", "-c", str(config)],
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
            return proc
    proc.kill()
    raise AssertionError("broker did not start:\n" + "".join(lines))


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


@pytest.fixture
def broker_process(chain: Any, tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """``broker_process(**sections)``: a :class:`BrokerProcess` on the test's anvil chain with
    the deployment saved beside it and ``sections`` added to the YAML (``anchoring``,
    ``payments``...). Every process started is killed if still running, its pipe closed."""
    made: list[BrokerProcess] = []

    def make(**sections: Any) -> BrokerProcess:
        from blendsm.contracts._devchain import free_port

        chain.deployment.save(tmp_path / "deployment.json")
        port = free_port()
        config = tmp_path / "broker.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": {"host": "127.0.0.1", "port": port},
                    "chain": {
                        "endpoint": chain.anvil.url,
                        "deployment": "deployment.json",
                        "confirmations": 0,
                        "poll_interval": 0.05,
                    },
                    "operator_key": {"env": "BLENDSM_TEST_OPERATOR_KEY"},
                    "data_dir": "data",
                    "log_level": "WARNING",
                    **sections,
                }
            )
        )
        env = {"BLENDSM_TEST_OPERATOR_KEY": chain.accounts["operator"].key.hex()}  # TEST ONLY
        made.append(BrokerProcess(config, port, env))
        return made[-1]

    yield make
    for proc in (p for b in made for p in b.started):
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
