"""What the Publisher's callbacks receive, and the version of their signatures."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["AckCallback", "Acknowledgement", "PublisherCallbackAPI"]


class PublisherCallbackAPI(enum.IntEnum):
    """Signatures of the Publisher's callbacks, versioned like paho's CallbackAPIVersion
    (and :class:`SubscriberCallbackAPI`) so they can change later without breaking code.

    VERSION1::

        on_acknowledged(publisher, ack: Acknowledgement)
    """

    VERSION1 = 1


@dataclass(frozen=True, slots=True)
class Acknowledgement:
    """A QoS 1/2 message the broker acknowledged (PUBACK for QoS 1, PUBCOMP for QoS 2): it
    left the outbox and will not be sent again. ``sequence`` is what :meth:`Publisher.publish`
    returned for it (unique per topic and device)."""

    topic: str
    sequence: int
    qos: int


AckCallback = Callable[[Any, Acknowledgement], None]
"""``on_acknowledged(publisher, ack)``, on the Publisher's sender thread: keep it short."""
