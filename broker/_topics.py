"""Which part of the topic space a topic name or filter belongs to: the one classifier.

Why one place: the ``blendsm/`` tree is reserved for the broker's own traffic, and every
decision (CONNECT's Will, SUBSCRIBE, PUBLISH, RECEIVE, the delivery gate, the routing of a
client's PUBLISH) must agree on where it starts. A topic outside the reserved trees is a
market topic if the chain view knows it, else a public one: that is the chain view's call,
not this module's.

The whole ``blendsm/`` tree is reserved (DESIGN.md): no market topic, Will or retained message
of a client lives there, whatever the chain says (``Market`` refuses such names; a topic an
older deployment let a seller squat there is ignored by the chain view). So every decision
classifies a topic here *before* it asks the chain view, and the classes are checked under
:data:`RESERVED_ROOT` only: ``blendsmX`` is an ordinary name, ``blendsm/anything`` is not.
Inside the tree the roots are matched as prefixes (``blendsm/ctl`` also covers
``blendsm/ctlx``); a name under no known root is :attr:`TopicClass.RESERVED`: nobody's.
"""

from __future__ import annotations

import enum
from typing import Final

from blendsm.device_sdk import ANCHORS_TOPIC, CONTROL_ROOT, KEYS_ROOT

__all__ = ["RESERVED_ROOT", "TopicClass", "classify_topic", "is_reserved"]

RESERVED_ROOT: Final = "blendsm/"
"""The broker's own topic tree (``Market`` refuses topic names that start with it)."""


class TopicClass(enum.Enum):
    """Where a topic lies, for access decisions."""

    ANCHORS = "anchors"
    """``blendsm/anchors``: anchor notices; anyone may subscribe, only the broker publishes."""
    KEYS = "keys"
    """``blendsm/keys/<topic id>/<address>``: a topic key wrapped for ``<address>``; only the
    topic's seller publishes, only ``<address>`` receives."""
    CONTROL = "control"
    """``blendsm/ctl/<address>/<leaf>``: a participant's vouchers in, notices and proofs out;
    never broadcast."""
    RESERVED = "reserved"
    """Anything else under ``blendsm/``: nobody publishes, subscribes or leaves a Will or a
    retained message there (a wildcard filter is granted and gated per message)."""
    OPEN = "open"
    """Anything else: a market topic (the chain view knows it) or a public one."""


def classify_topic(topic: str) -> TopicClass:
    """The class of a topic name or filter (see :class:`TopicClass`)."""
    if not topic.startswith(RESERVED_ROOT):
        return TopicClass.OPEN
    if topic == ANCHORS_TOPIC:
        return TopicClass.ANCHORS
    if topic.startswith(KEYS_ROOT):
        return TopicClass.KEYS
    if topic.startswith(CONTROL_ROOT):
        return TopicClass.CONTROL
    return TopicClass.RESERVED


def is_reserved(topic: str) -> bool:
    """Whether ``topic`` lies in the reserved ``blendsm/`` tree."""
    return topic.startswith(RESERVED_ROOT)
