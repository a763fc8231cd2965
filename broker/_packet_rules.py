"""MQTT 3.1.1's rules for a client's packets, judged on the bytes alone: for the WebSocket
listeners, whose packets amqtt's own reader decodes.

Why: TCP and TLS connections are read whole-packet by :mod:`._conn_reader`, which closes the
connection on a protocol violation (section 4.8) and on a bad string (section 1.5.3). A
WebSocket connection kept amqtt's reader and all of its leniency: a SUBSCRIBE asking QoS 3 got
a SUBACK, a topic of ill-formed UTF-8 was published under the text of its bytes' repr. The
framing reader of those connections (:class:`~._packet_limit.PacketSizeLimit`) sees every
byte, so it asks these two functions about each packet: :func:`header_fault` once the fixed
header is read, :func:`body_fault` once the body is (only for the packets with strings), and a
fault ends the stream before amqtt decodes the packet. The rules are :func:`._conn_reader.violation`'s
and :mod:`._mqtt_strings`' own.
"""

from __future__ import annotations

from typing import Final

from amqtt.mqtt.packet import CONNECT, PUBLISH, SUBSCRIBE, UNSUBSCRIBE

from blendsm.broker._conn_reader import FIXED_FLAGS, SERVER_ONLY
from blendsm.broker._mqtt_strings import connect_strings_fault, raw_strings_fault

__all__ = ["WITH_STRINGS", "body_fault", "header_fault"]

WITH_STRINGS: Final = frozenset((CONNECT, PUBLISH, SUBSCRIBE, UNSUBSCRIBE))
"""The packets whose body :func:`body_fault` reads."""


def header_fault(first_byte: int, first_packet: bool) -> str | None:
    """Why a packet with this first byte breaks MQTT 3.1.1 whatever its body, or None."""
    kind, flags = first_byte >> 4, first_byte & 0x0F
    if kind in (0, 15):
        return f"a packet of reserved type {kind}"
    if kind in SERVER_ONLY:
        return f"a client sent packet type {kind}, which only a server sends"
    if kind == CONNECT and not first_packet:
        return "a second CONNECT (MQTT-3.1.0-2)"
    if kind == PUBLISH:
        return "PUBLISH with QoS 3 (MQTT-3.3.1-4)" if flags & 0x06 == 0x06 else None
    if flags != FIXED_FLAGS.get(kind, flags):
        return f"packet type {kind} with reserved flags {flags:#x} (MQTT-2.2.2-2)"
    return None


def body_fault(kind: int, body: bytes) -> str | None:
    """Why a CONNECT, PUBLISH, SUBSCRIBE or UNSUBSCRIBE body breaks MQTT 3.1.1, or None. A
    body cut short is left to the decoder, which refuses it."""
    if kind == CONNECT:
        return connect_strings_fault(body)
    if kind in (SUBSCRIBE, UNSUBSCRIBE) and len(body) <= 2:
        what = "SUBSCRIBE (MQTT-3.8.3-3)" if kind == SUBSCRIBE else "UNSUBSCRIBE (MQTT-3.10.3-2)"
        return f"{what} without a topic filter"
    return raw_strings_fault(kind, body)
