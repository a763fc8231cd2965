"""MQTT over TLS, WebSocket and secure WebSocket, several listeners at once, client certificates,
and the HTTP API over HTTPS, each with a real client: paho over TLS trusting a CA made in the test,
paho over websockets, the SDK Subscriber paying for a paid topic over mqtts and wss, raw sockets
for the silent or half-open connections our limits must close on every listener."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import os
import socket
import ssl
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support import Client, Issued, TestCA, connect_packet, eventually

from blendsm.broker import HttpConfig, LimitsConfig, MetricsConfig, TlsConfig, parse_config
from blendsm.contracts import free_port
from blendsm.device_sdk import (
    BrokerEndpoint,
    ClientTls,
    ReceivedMessage,
    Subscriber,
    decode_envelope,
)
from blendsm.errors import BrokerConnectionError, ConfigError

from .conftest import Market, StartMarket
from .test_protocol_violations import VIOLATIONS


class Pki:
    """A CA with a server certificate (127.0.0.1) and a client certificate, and a second CA
    that nobody here trusts, with a client certificate of its own."""

    def __init__(self, folder: Path) -> None:
        self.ca = TestCA(folder / "ca")
        self.server = self.ca.issue("server", "127.0.0.1", server=True)
        self.client = self.ca.issue("client", "device-7", server=False)
        self.rogue = TestCA(folder / "rogue", "rogue CA")
        self.rogue_client = self.rogue.issue("client", "device-7", server=False)

    def tls(self, **extra: Any) -> dict[str, Any]:
        return {"certfile": str(self.server.cert), "keyfile": str(self.server.key), **extra}

    def client_context(
        self, cert: Issued | None = None, *, ca: TestCA | None = None
    ) -> ssl.SSLContext:
        """What a client trusting ``ca`` (ours by default) uses, with an optional certificate."""
        context = ssl.create_default_context(cafile=(ca or self.ca).cert)
        if cert is not None:
            context.load_cert_chain(cert.cert, cert.key)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _listeners(**entries: dict[str, Any]) -> Any:
    """``listeners:`` through the config parser, as a broker config override."""
    return parse_config({"listeners": entries}).listeners


def _all_four(pki: Pki) -> Any:
    return _listeners(
        plain={"port": 0},
        tls={"port": 0, "tls": pki.tls()},
        ws={"type": "ws", "port": 0},
        wss={"type": "ws", "port": 0, "tls": pki.tls()},
    )


def _client(
    market: Market,
    listener: str,
    label: str | None = None,
    tls: ssl.SSLContext | None = None,
) -> Client:
    """A paho client on ``listener`` (websockets for ws/wss/mwss; TLS with ``tls``), as
    ``label`` or anonymous."""
    websocket = listener in ("ws", "wss", "mwss")
    kwargs: dict[str, Any] = {"transport": "websockets" if websocket else "tcp", "tls": tls}
    if label is not None:
        kwargs |= {
            "account": market.chain.accounts[label],
            "signer": market.signer(label),
            "envelope_signer": market.envelope_signer(label),
        }
    made = Client(market.host, market.running.ports[listener], **kwargs)
    market.clients.append(made)
    return made


async def test_one_market_on_plain_tls_ws_and_wss_listeners_at_once(
    start_market: StartMarket, pki: Pki
) -> None:
    market = await start_market(listeners=_all_four(pki))
    ports = market.running.ports
    assert list(ports) == ["plain", "tls", "ws", "wss"]
    assert len(set(ports.values())) == 4
    assert 0 not in ports.values()
    assert market.running.port == ports["plain"]
    subscribers = {
        name: _client(market, name, tls=pki.client_context() if name in ("tls", "wss") else None)
        for name in ports
    }
    for sub in subscribers.values():
        assert await sub.connect() == 0
        assert await sub.subscribe("public/room", qos=1) == [1]
    for name, publisher in subscribers.items():
        await publisher.publish("public/room", f"from {name}".encode(), qos=1)
    expected = sorted(f"from {name}".encode() for name in ports)
    for name, sub in subscribers.items():
        got = await sub.got.drain(within=2.0, until=4)
        assert sorted(m.payload for m in got) == expected, name


@pytest.mark.parametrize("listener", ["tls", "wss"])
async def test_a_paid_topic_through_the_sdk_over_tls(
    start_market: StartMarket, pki: Pki, listener: str
) -> None:
    market = await start_market(listeners=_all_four(pki))
    deployment = market.chain.deployment
    endpoint = BrokerEndpoint(
        "127.0.0.1",
        market.running.ports[listener],
        market.chain.addr("operator"),
        deployment.chain_id,
        transport="websockets" if listener == "wss" else "tcp",
        tls=ClientTls(ca_certs=str(pki.ca.cert)),
    )
    sub = Subscriber(
        market.chain.accounts["buyer"],
        endpoint=endpoint,
        channels_contract=deployment.address("PaymentChannels"),
    )
    channel = await sub.open_channel(market.mp("buyer"), market.chain.addr("seller"), 10**15)
    await market.wait_channel(channel)
    received: list[ReceivedMessage] = []
    sub.on_message = lambda _s, m: received.append(m)
    await asyncio.to_thread(sub.connect)
    try:
        assert await asyncio.to_thread(sub.subscribe, market.topic) == 0
        device = await market.connected_device()  # on the plain listener
        for n in range(5):  # the credit's worth
            await device.publish(market.topic, f"reading {n}".encode(), qos=1)
        await eventually(lambda: len(received) >= 5, 15, what="5 messages on credit")
        (account,) = market.service.meter.accounts.values()
        # Only paid for messages keep coming. On WebSocket (amqtt's path) a delivery refused
        # for credit is skipped, not held, so the next ones wait for the SDK's voucher.
        await eventually(lambda: account.paid >= 5 * market.price, 10, what="5 paid")
        for n in range(5, 8):
            await device.publish(market.topic, f"reading {n}".encode(), qos=1)
        await eventually(lambda: len(received) >= 8, 15, what="8 paid messages")
        payloads = [decode_envelope(m.payload).payload for m in received]
        assert payloads == [f"reading {n}".encode() for n in range(8)]
        assert account.charged == 8 * market.price
        await eventually(lambda: account.paid == account.charged, 10, what="all paid")
    finally:
        await asyncio.to_thread(sub.disconnect)


async def test_a_client_that_trusts_another_ca_refuses_the_broker(
    start_market: StartMarket, pki: Pki
) -> None:
    market = await start_market(listeners=_all_four(pki))
    for name in ("tls", "wss"):
        client = _client(market, name, tls=pki.client_context(ca=pki.rogue))
        with pytest.raises(ssl.SSLCertVerificationError):
            await client.connect()
    endpoint = BrokerEndpoint(
        "127.0.0.1",
        market.running.ports["tls"],
        market.chain.addr("operator"),
        market.chain.deployment.chain_id,
        tls=ClientTls(ca_certs=str(pki.rogue.cert)),
    )
    sub = Subscriber(
        market.chain.accounts["buyer"],
        endpoint=endpoint,
        channels_contract=market.chain.deployment.address("PaymentChannels"),
    )
    with pytest.raises(BrokerConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await asyncio.to_thread(sub.connect, 5.0)
    assert market.service.stats.connect_timeouts == 0


def _open_tls_sockets() -> set[int]:
    """Ids of this process's client TLS sockets that nobody closed yet (alive, since
    something still refers to them; a reset one counts too)."""
    return {
        id(thing)
        for thing in gc.get_objects()
        if isinstance(thing, ssl.SSLSocket) and thing.fileno() != -1
    }


@pytest.mark.parametrize(
    ("listener", "transport", "why"),
    [
        ("tls", "tcp", "a broker certificate it does not trust: the TLS handshake fails"),
        ("mwss", "websockets", "no client certificate: TLS 1.3 refuses it in the upgrade"),
    ],
)
async def test_a_failed_connection_set_up_leaves_no_socket_open(
    start_market: StartMarket, pki: Pki, listener: str, transport: str, why: str
) -> None:
    """paho drops the socket it opened when a step of the set-up fails (the TLS handshake,
    or the WebSocket upgrade after it): it stayed open for as long as the error lived, so an
    application keeping its errors kept a descriptor per attempt, and the garbage collector
    closed the others with a ResourceWarning."""
    required = pki.tls(cafile=str(pki.ca.cert), require_client_cert=True)
    market = await start_market(
        listeners=_listeners(
            plain={"port": 0},
            tls={"port": 0, "tls": pki.tls()},
            mwss={"type": "ws", "port": 0, "tls": required},
        )
    )
    port = market.running.ports[listener]
    trusted = pki.rogue if listener == "tls" else pki.ca
    endpoint = BrokerEndpoint(
        "127.0.0.1",
        port,
        market.chain.addr("operator"),
        market.chain.deployment.chain_id,
        transport=transport,
        tls=ClientTls(ca_certs=str(trusted.cert)),
    )
    sub = Subscriber(
        market.chain.accounts["buyer"],
        endpoint=endpoint,
        channels_contract=market.chain.deployment.address("PaymentChannels"),
    )
    kept: list[BaseException] = []  # as an application keeping its errors would
    gc.disable()
    try:
        before = _open_tls_sockets()
        for _ in range(3):  # each attempt fails the same clean way (paho's mark is cleared)
            with pytest.raises(BrokerConnectionError, match="cannot reach") as caught:
                await asyncio.to_thread(sub.connect, 5.0)
            kept.append(caught.value)
        assert len(_open_tls_sockets() - before) == 0, why
    finally:
        gc.enable()


def _tls_connect(
    port: int, context: ssl.SSLContext, client_id: str, signer: Any = None, address: str = ""
) -> int | str:
    """A raw TLS connection sending CONNECT: the CONNACK code, or why there was none."""
    password = None if signer is None else signer.token(client_id)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
        ):
            username = address or None
            sock.sendall(connect_packet(client_id, 30, username=username, password=password))
            answer = sock.recv(4)
    except (ssl.SSLError, OSError) as exc:
        return type(exc).__name__
    return answer[3] if len(answer) == 4 else f"closed after {answer!r}"


async def test_a_listener_requiring_client_certificates_admits_only_those_of_its_ca(
    start_market: StartMarket, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    required = pki.tls(cafile=str(pki.ca.cert), require_client_cert=True)
    market = await start_market(
        listeners=_listeners(
            plain={"port": 0},
            mtls={"port": 0, "tls": required},
            mwss={"type": "ws", "port": 0, "tls": required},
        )
    )
    port = market.running.ports["mtls"]
    signer = market.signer("buyer")
    address = market.chain.addr("buyer")
    for context in (pki.client_context(), pki.client_context(pki.rogue_client)):
        outcome = await asyncio.to_thread(_tls_connect, port, context, "c-1", signer, address)
        assert not isinstance(outcome, int), f"CONNACK {outcome} without a valid certificate"
    for context in (pki.client_context(), pki.client_context(pki.rogue_client)):
        ws = _client(market, "mwss", "buyer", tls=context)
        with pytest.raises((ssl.SSLError, OSError)):
            assert await ws.connect() != 0
    assert not market.running.broker._sessions
    with caplog.at_level(logging.INFO, logger="blendsm.broker"):
        valid = pki.client_context(pki.client)
        assert await asyncio.to_thread(_tls_connect, port, valid, "c-2", signer, address) == 0
        ws = _client(market, "mwss", "buyer", tls=valid)
        assert await ws.connect() == 0
    assert "connected with client certificate commonName=device-7" in caplog.text
    # The certificate admits to the transport only: the CONNECT token is still required.
    valid = pki.client_context(pki.client)
    assert await asyncio.to_thread(_tls_connect, port, valid, "c-3", None, address) == 5


# --------------------------------------------------------------------------- limits


def _seconds_until_eof(sock: socket.socket, within: float) -> float | None:
    """Seconds until the broker ends the connection (EOF, reset or TLS error), reading and
    ignoring whatever arrives; None if it is still open after ``within``."""
    started = time.monotonic()
    while (left := started + within - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(4096):
                return time.monotonic() - started
        except TimeoutError:
            return None
        except OSError:  # reset, or the TLS layer's view of it
            return time.monotonic() - started
    return None


def _raw_ws(port: int, context: ssl.SSLContext | None = None) -> socket.socket:
    """A WebSocket upgraded by hand (so the test controls every byte after it)."""
    sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=5)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: mqtt\r\n\r\n".encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(1024)
        assert chunk, f"closed during the upgrade: {response!r}"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def _ws_frame(payload: bytes) -> bytes:
    """One masked binary frame from a client (payload < 126 bytes)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x82, 0x80 | len(payload)]) + mask + masked


def _silent_ws_client(port: int, keepalive: int, context: ssl.SSLContext | None) -> socket.socket:
    sock = _raw_ws(port, context)
    sock.sendall(_ws_frame(connect_packet(f"silent-{time.monotonic_ns()}", keepalive)))
    assert sock.recv(6) == b"\x82\x04\x20\x02\x00\x00"
    return sock


@pytest.mark.parametrize(
    "name",
    [
        "publish_topic_ill_formed_utf8",
        "publish_topic_nul",
        "subscribe_filter_ill_formed_utf8",
        "subscribe_qos3",
        "subscribe_empty",
        "subscribe_truncated",
        "unsubscribe_empty",
        "publish_qos3",
        "pubrel_flags",
        "second_connect",
        "connack_from_client",
    ],
)
async def test_a_protocol_violation_closes_a_websocket_connection(
    start_market: StartMarket, pki: Pki, name: str
) -> None:
    """The TCP listeners' rules hold on a WebSocket listener too (its packets go through
    amqtt's reader, which accepted them all: a SUBSCRIBE asking QoS 3 got a SUBACK, a topic
    of ill-formed UTF-8 was published under its bytes' repr)."""
    market = await start_market(listeners=_all_four(pki))
    port = market.running.ports["ws"]

    def violate() -> tuple[float | None, bytes]:
        sock = _silent_ws_client(port, 60, None)  # connected: CONNECT answered
        try:
            sock.sendall(_ws_frame(VIOLATIONS[name]))
            sock.settimeout(0.5)
            try:
                first = sock.recv(64)  # nothing, or the end of the stream
            except TimeoutError:
                return None, b""
            return (0.0 if not first else _seconds_until_eof(sock, 4.0)), first
        finally:
            sock.close()

    closed, answered = await asyncio.to_thread(violate)
    assert closed is not None, f"{name}: a WebSocket connection left open"
    assert b"\x90" not in answered[:4], f"{name}: the broker answered {answered!r}"  # no SUBACK
    assert market.service.stats.protocol_violations == 1
    client = _client(market, "ws")  # the listener still serves honest clients
    assert await client.connect() == 0
    client.close()


@pytest.mark.parametrize("listener", ["ws", "wss"])
async def test_a_silent_websocket_client_is_dropped_after_its_keepalive(
    start_market: StartMarket, pki: Pki, listener: str
) -> None:
    market = await start_market(listeners=_all_four(pki))
    context = pki.client_context() if listener == "wss" else None
    port = market.running.ports[listener]
    sock = await asyncio.to_thread(_silent_ws_client, port, 1, context)
    try:
        # It reads (so it sees the end) but never answers a close frame, like a dead peer.
        closed_after = await asyncio.to_thread(_seconds_until_eof, sock, 8.0)
    finally:
        sock.close()
    assert closed_after is not None, "a silent WebSocket client held its connection past 8 s"
    assert closed_after < 4.0, closed_after  # 1.5 x 1 s, give or take the loop
    assert market.service.stats.keepalive_timeouts == 1


async def test_connect_timeout_and_handshake_timeout_hold_on_tls_and_websocket_listeners(
    start_market: StartMarket, pki: Pki
) -> None:
    market = await start_market(
        listeners=_all_four(pki), limits=LimitsConfig(connect_timeout_seconds=1.0)
    )
    ports = market.running.ports

    def silent_after_handshake(name: str) -> float | None:
        if name in ("ws", "wss"):
            sock = _raw_ws(ports[name], pki.client_context() if name == "wss" else None)
        else:
            raw = socket.create_connection(("127.0.0.1", ports[name]), timeout=5)
            sock = pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
        with sock:
            return _seconds_until_eof(sock, 6.0)

    def silent_before_handshake(name: str) -> float | None:
        with socket.create_connection(("127.0.0.1", ports[name]), timeout=5) as sock:
            return _seconds_until_eof(sock, 6.0)

    for name in ("tls", "ws", "wss"):
        after = await asyncio.to_thread(silent_after_handshake, name)
        assert after is not None, f"{name}: no CONNECT, still open after 6 s (timeout 1 s)"
        assert after < 4.0, (name, after)
    assert market.service.stats.connect_timeouts == 3
    # No TLS handshake (or no WebSocket upgrade) at all: bounded by the same timeout.
    for name in ("tls", "ws", "wss"):
        before = await asyncio.to_thread(silent_before_handshake, name)
        assert before is not None, f"{name}: a silent TCP connection held past 6 s (timeout 1 s)"
        assert before < 4.0, (name, before)


async def test_connection_caps_count_every_listener(start_market: StartMarket, pki: Pki) -> None:
    market = await start_market(
        listeners=_all_four(pki), limits=LimitsConfig(max_connections_per_ip=2)
    )
    first = _client(market, "wss", tls=pki.client_context())
    second = _client(market, "tls", tls=pki.client_context())
    assert await first.connect() == 0
    assert await second.connect() == 0

    def refused(name: str) -> float | None:
        sock = _raw_ws(market.running.ports[name])
        with sock:
            return _seconds_until_eof(sock, 5.0)

    closed_after = await asyncio.to_thread(refused, "ws")
    assert closed_after is not None, "a 3rd connection (over ws) was served at a cap of 2"
    assert closed_after < 1.0, closed_after
    assert market.service.stats.connections_refused_at_limit == 1

    def refused_plain() -> float | None:
        with socket.create_connection(("127.0.0.1", market.running.ports["plain"])) as sock:
            return _seconds_until_eof(sock, 5.0)

    assert await asyncio.to_thread(refused_plain) is not None
    assert market.service.stats.connections_refused_at_limit == 2


# --------------------------------------------------------------------------- start-up


async def test_a_listener_that_cannot_bind_stops_the_start_and_closes_the_others(
    start_market: StartMarket, pki: Pki
) -> None:
    first_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(
            ConfigError, match=f"listeners.second: cannot listen on 127.0.0.1:{busy}"
        ):
            await start_market(
                listeners=_listeners(
                    first={"port": first_port, "tls": pki.tls()},
                    second={"type": "ws", "port": busy},
                )
            )
    with socket.socket() as again:  # the first listener was closed, not leaked
        again.bind(("127.0.0.1", first_port))


# --------------------------------------------------------------------------- HTTP over TLS


async def test_the_http_api_and_metrics_over_https(start_market: StartMarket, pki: Pki) -> None:
    tls = TlsConfig(pki.server.cert, pki.server.key)
    market = await start_market(
        http=HttpConfig(port=0, tls=tls), metrics=MetricsConfig(port=0, tls=tls)
    )
    http, metrics = market.running.http, market.running.metrics
    assert http is not None
    assert metrics is not None
    context = pki.client_context()

    def get(url: str, ctx: ssl.SSLContext | None = context) -> bytes:
        with urllib.request.urlopen(url, timeout=5, context=ctx) as answer:
            body: bytes = answer.read()
            return body

    status = json.loads(await asyncio.to_thread(get, f"https://127.0.0.1:{http.port}/api/status"))
    assert status["operator"] == market.chain.addr("operator")
    text = await asyncio.to_thread(get, f"https://127.0.0.1:{metrics.port}/metrics")
    assert b"blendsm_" in text
    rogue = pki.client_context(ca=pki.rogue)
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        await asyncio.to_thread(get, f"https://127.0.0.1:{http.port}/api/status", rogue)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        await asyncio.to_thread(get, f"http://127.0.0.1:{http.port}/api/status", None)


async def test_probes_of_a_websocket_listener_do_not_flood_the_log(
    start_market: StartMarket, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    market = await start_market(listeners=_all_four(pki))
    port = market.running.ports["ws"]

    def probe(times: int) -> None:
        for _ in range(times):  # connect and close without a word, like a port scanner
            socket.create_connection(("127.0.0.1", port), timeout=5).close()

    with caplog.at_level(logging.DEBUG, logger="websockets"):
        await asyncio.to_thread(probe, 20)
        await asyncio.sleep(0.5)
    # The chain view's own health lines (a loaded machine can make it lag) are not the
    # probes' doing: every other warning counts.
    loud = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and not r.name.startswith("blendsm.broker.chain_view")
    ]
    assert len(loud) == 1, [r.getMessage() for r in loud]
    assert "opening handshake failed" in loud[0].getMessage()
    assert loud[0].exc_info is None
    client = _client(market, "ws")  # and the listener still serves
    assert await client.connect() == 0


async def test_a_websocket_listener_named_default_leaves_the_others_plain_tcp(
    start_market: StartMarket,
) -> None:
    market = await start_market(
        listeners=_listeners(default={"type": "ws", "port": 0}, mqtt={"port": 0})
    )
    ws = Client(market.host, market.running.ports["default"], transport="websockets")
    tcp = Client(market.host, market.running.ports["mqtt"])
    market.clients += [ws, tcp]
    assert await ws.connect() == 0
    assert await tcp.connect() == 0
