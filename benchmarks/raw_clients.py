"""Raw-socket MQTT clients for the broker benchmarks: one asyncio subscriber that can also be a
paying BlendSM member, and a paced publisher that can sign envelopes as a registered device.

Why not paho or the SDK: a benchmark that compares brokers needs clients that cost the same
(and little) whatever the broker, so the broker bounds the rate and the latency, not the
clients. A paho client runs a network thread per connection and its callbacks contend for the
GIL with the others of its process (a 5 ms switch interval each time), which puts tens of
milliseconds into a latency tail that the broker did not cause; the SDK Subscriber adds its
own bookkeeping and signature checks (66-79 µs per delivery). These clients are one
``asyncio.Protocol`` per connection on one event loop per process, packets parsed by hand.

A paying subscriber (``Payer``) does what the SDK does on the wire (docs/protocol.md, control
topics): CONNECT with the member's address and a CONNECT token, subscribe to its notice topic
and the paid topic, learn the channel and price from the Quote, send a voucher for the value
received every ``pay_every`` paid messages, and answer a PaymentRequest with a voucher for
``min(charged, received)`` (or re-send its latest). It does not verify envelope signatures
(the broker did; the SDK's subscriber-side checks are measured elsewhere). Keys are
TEST-ONLY, on chains that hold no value.

Imported as ``raw_clients``, a sibling module, like ``broker_process``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker_process import connect_packet, subscribe_packet

__all__ = ["Payer", "RawPublisher", "RawSubscriber", "Tally"]

TIMESTAMP = struct.Struct("!d")


def publish_packet(topic: str, payload: bytes, packet_id: int = 0) -> bytes:
    """A PUBLISH, not retained, encoded by hand (~1 µs; amqtt's codec, used by
    ``broker_process.publish_packet``, takes ~60 µs, which a paced publisher cannot afford):
    QoS 0, or QoS 1 with ``packet_id`` (1-65535)."""
    t = topic.encode()
    pid = packet_id.to_bytes(2, "big") if packet_id else b""
    n = 2 + len(t) + len(pid) + len(payload)
    length = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    header = b"\x32" if packet_id else b"\x30"
    return header + bytes(length) + len(t).to_bytes(2, "big") + t + pid + payload


@dataclass
class Tally:
    """What the subscribers of one process received: data messages, the newest receive time,
    and end-to-end latencies (receive time - the send time in the payload's last 8 bytes) of
    the messages sent at or after ``sample_from`` (time.time(); a warm-up before it is left
    out), at most ``max_samples``."""

    sample_from: float = 0.0
    max_samples: int = 1_000_000
    received: int = 0
    last: float = 0.0
    latencies: list[float] = field(default_factory=list)
    timeline: list[tuple[float, float]] | None = None
    counters: dict[str, int] = field(default_factory=dict)

    def data(self, payload: bytes | bytearray) -> None:
        now = time.time()
        self.received += 1
        self.last = now
        if len(payload) >= 8 and len(self.latencies) < self.max_samples:
            sent = TIMESTAMP.unpack_from(payload, len(payload) - 8)[0]
            if sent >= self.sample_from:
                self.latencies.append(now - sent)
                if self.timeline is not None:
                    self.timeline.append((sent, now - sent))

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


class Payer:
    """A member's paying side: its CONNECT credentials and its vouchers (one channel per
    payer, learnt from the Quote)."""

    def __init__(
        self,
        key: bytes,
        chain_id: int,
        broker: str,
        channels_contract: str,
        pay_every: int,
        phase: int = 0,
    ) -> None:
        from blendsm.device_sdk import (
            NOTICE,
            VOUCHER,
            ConnectTokenSigner,
            VoucherDomain,
            VoucherSigner,
            control_topic,
        )

        self._tokens = ConnectTokenSigner(key, chain_id, broker)
        self.address = self._tokens.address
        self._signer = VoucherSigner(key, VoucherDomain(chain_id, channels_contract))
        self._lane = self._tokens.broker  # the broker's lane: the operator's own
        self.notice_topic = control_topic(self.address, NOTICE)
        self.voucher_topic = control_topic(self.address, VOUCHER)
        self.pay_every = pay_every
        # The first voucher after pay_every - phase messages, then every pay_every: members
        # that joined together would otherwise all pay on the same message.
        self._first = max(1, pay_every - phase % pay_every)
        self.channel: bytes | None = None
        self.price = 0
        self.received = 0  # value received (price x paid messages)
        self.vouchered = 0
        self._latest: bytes | None = None  # the latest voucher PUBLISH, to re-send

    def token(self, client_id: str) -> str:
        return self._tokens.token(client_id)

    def on_data(self) -> bool:
        """A paid message arrived: True if a voucher is due (:meth:`pay` makes it)."""
        if self.channel is None or not self.price:
            return False
        self.received += self.price
        due = self.pay_every if self.vouchered else self._first
        return self.received - self.vouchered >= due * self.price

    def pay(self, tally: Tally) -> bytes | None:
        """The voucher PUBLISH for everything received, unless it is paid already."""
        if self.channel is None or self.received <= self.vouchered:
            return None
        return self._voucher(self.received, tally)

    def on_notice(self, payload: bytes, tally: Tally) -> bytes | None:
        """A notice arrived: learn the Quote, answer a PaymentRequest; count the rest."""
        from blendsm.device_sdk import PaymentRequest, Quote, Receipt, Refusal, decode_notice

        notice = decode_notice(payload)
        if isinstance(notice, Quote):
            self.channel, self.price = notice.channel_id, notice.price
            tally.count("quotes")
        elif isinstance(notice, Receipt):
            tally.count("receipts")
        elif isinstance(notice, Refusal):
            tally.count(f"refused:{notice.code.value}")
        elif isinstance(notice, PaymentRequest):
            tally.count("payment_requests")
            amount = min(notice.charged, self.received)
            if amount > self.vouchered:
                return self._voucher(amount, tally)
            if self._latest is not None:
                tally.count("vouchers_resent")
                return self._latest
        return None

    def _voucher(self, amount: int, tally: Tally) -> bytes:
        from blendsm.device_sdk import encode_voucher

        assert self.channel is not None
        packet = publish_packet(
            self.voucher_topic, encode_voucher(self._signer.sign(self.channel, self._lane, amount))
        )
        self.vouchered, self._latest = amount, packet
        tally.count("vouchers_sent")
        return packet


class RawSubscriber(asyncio.Protocol):
    """CONNECT (anonymous, or as ``payer`` with a CONNECT token), SUBSCRIBE to ``topic`` (and
    the payer's notice topic first), then count PUBLISHes of ``topic`` into ``tally``; QoS 1
    deliveries are acknowledged. ``ready`` resolves at the SUBACK of ``topic``."""

    def __init__(
        self,
        client_id: str,
        topic: str,
        qos: int,
        ready: asyncio.Future[None],
        tally: Tally,
        payer: Payer | None = None,
    ) -> None:
        self.client_id, self.topic, self.qos = client_id, topic, qos
        self.ready, self.tally, self.payer = ready, tally, payer
        self.buffer = bytearray()
        self.transport: Any = None
        self._topic_bytes = topic.encode()
        self._notice_bytes = payer.notice_topic.encode() if payer is not None else b""
        self._pending: list[bytes | None] = []  # notices (None: a voucher due) to answer

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.payer is None:
            transport.write(connect_packet(self.client_id))
        else:
            token = self.payer.token(self.client_id)
            transport.write(connect_packet(self.client_id, 0, self.payer.address, token))

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos = 0
        out: list[bytes] = []
        while len(buf) - pos >= 2:
            kind = buf[pos] >> 4
            length, shift, i = 0, 0, pos + 1
            while i < len(buf):
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                shift += 7
                i += 1
                if not byte & 0x80:
                    break
            else:
                break
            if len(buf) - i < length:
                break
            end = i + length
            if kind == 3:  # PUBLISH
                self._publish(buf, pos, i, end, out)
            elif kind == 2:  # CONNACK
                if buf[i + 1] != 0 and not self.ready.done():
                    self.ready.set_exception(RuntimeError(f"CONNACK {buf[i + 1]}"))
                if self.payer is not None:  # notices first: the Quote comes on SUBSCRIBE
                    out.append(subscribe_packet([(self.payer.notice_topic, 0)], 1))
                out.append(subscribe_packet([(self.topic, self.qos)], 2))
            elif kind == 9 and not self.ready.done():  # SUBACK
                if buf[i + 2] == 0x80:
                    self.ready.set_exception(RuntimeError(f"SUBACK refused ({self.client_id})"))
                elif int.from_bytes(buf[i : i + 2], "big") == 2:
                    self.ready.set_result(None)
            pos = end
        del buf[:pos]
        if out:
            self.transport.write(b"".join(out))

    def _publish(self, buf: bytearray, pos: int, i: int, end: int, out: list[bytes]) -> None:
        tlen = int.from_bytes(buf[i : i + 2], "big")
        topic = bytes(buf[i + 2 : i + 2 + tlen])
        at = i + 2 + tlen
        if buf[pos] & 0x06:  # QoS 1: acknowledge (PUBACK with the packet id)
            out.append(b"\x40\x02" + bytes(buf[at : at + 2]))
            at += 2
        payload = bytes(buf[at:end])
        payer = self.payer
        if topic == self._topic_bytes:
            self.tally.data(payload)
            if payer is not None and payer.on_data():
                self._later(None)
        elif payer is not None and topic == self._notice_bytes:
            if payer.channel is None:  # the Quote: before the data that follows it
                answer = payer.on_notice(payload, self.tally)
                if answer is not None:
                    out.append(answer)
            else:
                self._later(payload)

    def _later(self, notice: bytes | None) -> None:
        """Sign and answer in the loop's next turn, not in this ``data_received``: the other
        subscribers of this process stamp what arrived with them first (ten members in one
        process stand for ten devices; one's signing is not another's latency)."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._answer)
        self._pending.append(notice)

    def _answer(self) -> None:
        pending, self._pending = self._pending, []
        payer, out = self.payer, []
        assert payer is not None
        for notice in pending:
            packet = (
                payer.pay(self.tally) if notice is None else payer.on_notice(notice, self.tally)
            )
            if packet is not None:
                out.append(packet)
        if out and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed: {exc}"))
        else:
            self.tally.count("connections_lost")


class RawPublisher:
    """A blocking raw-socket publisher (QoS 0, or 1): anonymous, or a registered device that
    connects with a CONNECT token and signs every message into an envelope. ``publish`` puts
    ``time.time()`` at the moment of sending into the payload's last 8 bytes. At QoS 1 a
    thread reads the PUBACKs (counted in ``acked``); the sends never wait for them."""

    def __init__(
        self,
        port: int,
        *,
        device_key: bytes | None = None,
        chain_id: int = 0,
        broker: str = "",
        registry: str = "",
        qos: int = 0,
    ) -> None:
        self._sign: Callable[[str, bytes], bytes] | None = None
        self.qos = qos
        self.acked = 0  # PUBACKs read (QoS 1)
        self._next_id = 0
        self.late = 0  # sends more than 1 ms behind their schedule
        self.build_s = 0.0  # time spent building (and signing) packets
        client_id = f"pub-{time.monotonic_ns()}"
        username = password = None
        if device_key is not None:
            from blendsm.device_sdk import ConnectTokenSigner, EnvelopeSigner, MessageDomain

            tokens = ConnectTokenSigner(device_key, chain_id, broker)
            username, password = tokens.address, tokens.token(client_id)
            signer = EnvelopeSigner(device_key, MessageDomain(chain_id, registry))
            sequence = [0]

            def sign(topic: str, payload: bytes) -> bytes:
                sequence[0] += 1
                envelope = signer.sign(topic, payload, sequence[0], int(time.time() * 1000))
                return envelope.encode()

            self._sign = sign
        self.sock = socket.create_connection(("127.0.0.1", port), 10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(connect_packet(client_id, 0, username, password))
        ack = self.sock.recv(4)
        if ack[:1] != b"\x20" or len(ack) < 4 or ack[3] != 0:
            raise RuntimeError(f"publisher: CONNACK {ack!r}")
        if qos:
            threading.Thread(target=self._read_acks, daemon=True, name="pub-acks").start()

    def _read_acks(self) -> None:
        """Count the PUBACKs (4 bytes each) until the socket closes."""
        pending = b""
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(65536):
                pending += chunk
                whole = len(pending) - len(pending) % 4
                self.acked += whole // 4
                pending = pending[whole:]

    def _packet(self, topic: str, payload: bytes) -> bytes:
        if not self.qos:
            return publish_packet(topic, payload)
        self._next_id = self._next_id % 65535 + 1
        return publish_packet(topic, payload, self._next_id)

    def publish(self, topic: str, body: bytes, at: float | None = None) -> None:
        """Send ``body`` + the send time. ``at`` (time.time() units): wait until then first.
        The timestamp is taken right before the packet is built (and, for a device, signed),
        so a publisher that falls behind its schedule (descheduled on a shared machine) does
        not count as broker latency; a device's signing does (``build_s`` measures it)."""
        if at is not None:
            delay = at - time.time()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.001:
                self.late += 1
        t = time.perf_counter()
        payload = body + TIMESTAMP.pack(time.time())
        if self._sign is not None:  # the signature covers the timestamp too
            payload = self._sign(topic, payload)
        packet = self._packet(topic, payload)
        self.build_s += time.perf_counter() - t
        self.sock.sendall(packet)

    def prepare(self, topic: str, body: bytes) -> bytes:
        """A PUBLISH built (and signed) now, stamped now, to send later (a burst)."""
        payload = body + TIMESTAMP.pack(time.time())
        if self._sign is not None:
            payload = self._sign(topic, payload)
        return self._packet(topic, payload)

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        finally:
            self.sock.close()
