"""Which part of the topic space a topic name or filter belongs to: the one classifier.

Why one place: the ``blendsm/`` tree is reserved for the broker's own traffic, and every
decision (CONNECT's Will, SUBSCRIBE, PUBLISH, RECEIVE, the delivery gate, the routing of a
client's PUBLISH) must agree on where it starts. A topic outside the reserved trees is a
market topic if the chain view knows it, else a public one: that is the chain view's call,
not this module's.

The reserved roots are matched as prefixes (``blendsm/ctl`` also covers ``blendsm/ctlx``),
so a name that merely extends a root is never mistaken for a public topic: it fails closed.
"""

from __future__ import annotations

import enum

from blendsm.device_sdk import ANCHORS_TOPIC, CONTROL_ROOT, KEYS_ROOT

__all__ = ["TopicClass", "classify_topic"]


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
    OPEN = "open"
    """Anything else: a market topic (the chain view knows it) or a public one."""


def classify_topic(topic: str) -> TopicClass:
    """The class of a topic name or filter (see :class:`TopicClass`)."""
    if topic == ANCHORS_TOPIC:
        return TopicClass.ANCHORS
    if topic.startswith(KEYS_ROOT):
        return TopicClass.KEYS
    if topic.startswith(CONTROL_ROOT):
        return TopicClass.CONTROL
    return TopicClass.OPEN
