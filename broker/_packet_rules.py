"""MQTT 3.1.1's rules for a client's packets, in one place for every listener: which fixed
headers a client may send (section 4.8 closes the connection otherwise) and what a body with
strings must hold (section 1.5.3: well-formed UTF-8, no U+0000; a filter and a QoS of 0-2).

Why one module: TCP and TLS connections are read whole-packet by :mod:`._conn_reader`;
WebSocket connections keep amqtt's reader, which accepted all of these (a SUBSCRIBE asking
QoS 3 got a SUBACK, a topic of ill-formed UTF-8 was published under the text of its bytes'
repr), so their framing reader (:class:`~._packet_limit.PacketSizeLimit`) asks the same two
functions about each packet before amqtt decodes it: :func:`header_fault` once the fixed
header is read, :func:`body_fault` once the body is.
"""

from __future__ import annotations

from typing import Final

from amqtt.mqtt.packet import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
)

from blendsm.broker._mqtt_strings import connect_strings_fault, plain_topic, raw_strings_fault

__all__ = ["WITH_STRINGS", "body_fault", "header_fault"]

_FIXED_FLAGS: Final = {
    CONNECT: 0,
    PUBACK: 0,
    PUBREC: 0,
    PUBREL: 2,
    PUBCOMP: 0,
    SUBSCRIBE: 2,
    UNSUBSCRIBE: 2,
    PINGREQ: 0,
    DISCONNECT: 0,
}
"""The fixed-header flags MQTT 3.1.1 requires of each packet a client may send other than
PUBLISH (MQTT-2.2.2-2: any other value is a protocol violation)."""
_SERVER_ONLY: Final = frozenset((CONNACK, SUBACK, UNSUBACK, PINGRESP))
"""Packets only a server sends: from a client, a protocol violation."""

WITH_STRINGS: Final = frozenset((CONNECT, PUBLISH, SUBSCRIBE, UNSUBSCRIBE))
"""The packets whose body :func:`body_fault` reads."""


def header_fault(first_byte: int, first_packet: bool) -> str | None:
    """Why a packet with this first byte breaks MQTT 3.1.1 whatever its body, or None."""
    kind, flags = first_byte >> 4, first_byte & 0x0F
    if kind in (0, 15):
        return f"a packet of reserved type {kind}"
    if kind in _SERVER_ONLY:
        return f"a client sent packet type {kind}, which only a server sends"
    if kind == CONNECT and not first_packet:
        return "a second CONNECT (MQTT-3.1.0-2)"
    if kind == PUBLISH:
        return "PUBLISH with QoS 3 (MQTT-3.3.1-4)" if flags & 0x06 == 0x06 else None
    if flags != _FIXED_FLAGS.get(kind, flags):
        return f"packet type {kind} with reserved flags {flags:#x} (MQTT-2.2.2-2)"
    return None


def body_fault(kind: int, body: bytes, decoded: object = None) -> str | None:
    """Why a CONNECT, PUBLISH, SUBSCRIBE or UNSUBSCRIBE body breaks MQTT 3.1.1, or None. A
    body cut short is left to the decoder, which refuses it. With amqtt's ``decoded`` packet,
    a PUBLISH whose decoded topic shows no sign of a bad string is not read again (the hot
    path pays one slice comparison)."""
    if kind == CONNECT:
        return connect_strings_fault(body)
    if kind == PUBLISH and decoded is not None and plain_topic(decoded):
        return None
    if kind in (SUBSCRIBE, UNSUBSCRIBE) and len(body) <= 2:
        what = "SUBSCRIBE (MQTT-3.8.3-3)" if kind == SUBSCRIBE else "UNSUBSCRIBE (MQTT-3.10.3-2)"
        return f"{what} without a topic filter"
    return raw_strings_fault(kind, body)
