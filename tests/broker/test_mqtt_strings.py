"""MQTT's string rule read from the client's bytes (broker/_mqtt_strings.py, applied by
broker/_packet_rules.py): what amqtt's decoder made of a string is only a hint, the raw bytes
decide."""

from __future__ import annotations

import struct
from types import SimpleNamespace

from amqtt.mqtt.packet import PUBLISH, SUBSCRIBE, UNSUBSCRIBE

from blendsm.broker._mqtt_strings import connect_strings_fault
from blendsm.broker._packet_rules import body_fault


def _raw(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def _publish(topic_seen: str, topic_sent: bytes) -> tuple[bytes, object]:
    """(the body sent, amqtt's decoded packet with the topic it made of it)."""
    packet = SimpleNamespace(variable_header=SimpleNamespace(topic_name=topic_seen))
    return _raw(topic_sent) + b"\x00\x01payload", packet


def test_a_publish_is_judged_by_the_bytes_sent() -> None:
    # amqtt's fallback text for b"\xc0\xaf", and the bytes behind it
    assert body_fault(PUBLISH, *_publish("b'\\xc0\\xaf'", b"\xc0\xaf")) is not None
    # the same text sent as well-formed UTF-8 is a topic like any other
    assert body_fault(PUBLISH, *_publish("b'\\xc0\\xaf'", b"b'\\xc0\\xaf'")) is None
    assert (
        body_fault(PUBLISH, *_publish("a\x00b", b"a\x00b"))
        == "PUBLISH topic: U+0000 (MQTT-1.5.3-2)"
    )
    assert body_fault(PUBLISH, *_publish("sensors/t", b"sensors/t")) is None


def test_every_filter_of_a_subscribe_or_unsubscribe_is_checked() -> None:
    good = b"\x00\x07" + _raw(b"a/#") + b"\x01" + _raw(b"b/+") + b"\x00"
    assert body_fault(SUBSCRIBE, good) is None
    bad = b"\x00\x07" + _raw(b"a/#") + b"\x01" + _raw(b"b/\xed\xa0\x80") + b"\x00"
    assert body_fault(SUBSCRIBE, bad) == "topic filter: ill-formed UTF-8 (MQTT-1.5.3-1)"
    assert body_fault(UNSUBSCRIBE, b"\x00\x07" + _raw(b"ok") + _raw(b"x\x00")) is not None
    assert body_fault(UNSUBSCRIBE, b"\x00\x07" + _raw(b"ok") + _raw(b"fine")) is None


def _connect(client_id: bytes, will: tuple[bytes, bytes] | None, user: bytes | None) -> bytes:
    flags = 0x02 | (0x04 if will else 0) | (0x80 if user is not None else 0) | (0x40 if user else 0)
    body = _raw(b"MQTT") + bytes([4, flags]) + b"\x00\x3c" + _raw(client_id)
    if will:
        body += _raw(will[0]) + _raw(will[1])
    if user is not None:
        body += _raw(user) + _raw(b"\xff\xfe binary password")
    return body


def test_a_connect_checks_its_strings_but_not_its_binary_fields() -> None:
    binary = b"\xff\x00\xfe"  # a Will message and a password may hold anything
    assert connect_strings_fault(_connect(b"dev-1", (b"will/t", binary), b"user")) is None
    assert connect_strings_fault(_connect(b"\xff", None, None)) == (
        "CONNECT client id: ill-formed UTF-8 (MQTT-1.5.3-1)"
    )
    assert connect_strings_fault(_connect(b"ok", (b"w\x00", b"m"), None)) == (
        "CONNECT Will topic: U+0000 (MQTT-1.5.3-2)"
    )
    assert connect_strings_fault(_connect(b"ok", (b"w", b"m"), b"caf\xe9")) == (
        "CONNECT user name: ill-formed UTF-8 (MQTT-1.5.3-1)"
    )
    assert connect_strings_fault(_connect(b"ok", None, None)[:9]) is None  # cut short: not ours
