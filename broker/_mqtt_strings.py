"""MQTT's rule for strings, checked on a packet's raw bytes: well-formed UTF-8, no U+0000.

Why: MQTT 3.1.1 section 1.5.3 says a server that receives a packet with ill-formed UTF-8
(MQTT-1.5.3-1) or the null character U+0000 (MQTT-1.5.3-2) in a string MUST close the
connection. amqtt 0.12.1's decoder does not: a string that fails to decode becomes the text of
its bytes' repr, so a PUBLISH whose topic was the bytes ``c0 af`` went out on the topic
``b'\\xc0\\xaf'`` and a client id or a filter got the same treatment. Here the strings are
read from the packet body as the client sent it (``str.decode`` is strict: overlong forms and
surrogates fail), so a legitimate topic that happens to look like a bytes repr is not refused.
A PUBLISH is checked only when amqtt's topic shows a sign of either case (its fallback's
``b'`` or ``b"`` prefix, or a U+0000): the hot path pays one slice comparison.
"""

from __future__ import annotations

from typing import Final

from amqtt.mqtt.packet import PUBLISH, SUBSCRIBE, UNSUBSCRIBE

__all__ = ["connect_strings_fault", "plain_topic", "raw_strings_fault"]

_FALLBACK: Final = ("b'", 'b"')
"""How amqtt's ``decode_string`` fallback (``str(bytes)``) begins."""


def _fault(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "ill-formed UTF-8 (MQTT-1.5.3-1)"
    if "\x00" in text:
        return "U+0000 (MQTT-1.5.3-2)"
    return None


def _string_at(body: bytes, at: int) -> tuple[bytes, int] | None:
    """The length-prefixed string at ``at`` and the offset after it; None if cut short (the
    decoder has refused such a packet already)."""
    if at + 2 > len(body):
        return None
    end = at + 2 + int.from_bytes(body[at : at + 2], "big")
    return (body[at + 2 : end], end) if end <= len(body) else None


def plain_topic(packet: object) -> bool:
    """Whether amqtt's decoded PUBLISH topic shows no sign of a bad string (neither its
    fallback's prefix nor a U+0000): then its bytes need no second look."""
    topic = getattr(getattr(packet, "variable_header", None), "topic_name", None)
    return isinstance(topic, str) and topic[:2] not in _FALLBACK and "\x00" not in topic


def raw_strings_fault(kind: int, body: bytes) -> str | None:
    """Why a PUBLISH topic or a SUBSCRIBE or UNSUBSCRIBE filter breaks the string rule, or a
    SUBSCRIBE's requested QoS is over 2 (MQTT-3.8.3-4); None if neither."""
    if kind == PUBLISH:
        found = _string_at(body, 0)
        why = None if found is None else _fault(found[0])
        return None if why is None else f"PUBLISH topic: {why}"
    if kind not in (SUBSCRIBE, UNSUBSCRIBE):
        return None
    at = 2  # after the packet id
    while (found := _string_at(body, at)) is not None:
        text, at = found
        if (why := _fault(text)) is not None:
            return f"topic filter: {why}"
        if kind == SUBSCRIBE:
            if at < len(body) and body[at] > 2:
                return "SUBSCRIBE requesting QoS > 2 or reserved bits set (MQTT-3.8.3-4)"
            at += 1
    if at != len(body):  # a filter's length past the packet's end: amqtt read what was there
        return "malformed topic filter list"
    return None


def connect_strings_fault(body: bytes) -> str | None:
    """Why a CONNECT's client id, Will topic or user name breaks the string rule, or None
    (the Will message and the password are binary)."""
    found = _string_at(body, 0)  # the protocol name, already checked to be "MQTT"
    if found is None or found[1] + 4 > len(body):
        return None
    flags, at = body[found[1] + 1], found[1] + 4  # level, flags, keepalive
    kinds = ["client id"]
    if flags & 0x04:
        kinds += ["Will topic", ""]  # "": the Will message, binary
    if flags & 0x80:
        kinds.append("user name")
    for what in kinds:
        if (found := _string_at(body, at)) is None:
            return None
        raw, at = found
        if what and (why := _fault(raw)) is not None:
            return f"CONNECT {what}: {why}"
    return None
