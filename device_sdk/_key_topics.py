"""Topic names of the topic-key tree (split from ``_control``, which re-exports them).

``blendsm/keys/<topic id hex>/<address>`` carries a topic key wrapped to one address; the
broker's access rules and the SDK's key service both parse these names, so they live once.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["KEYS_ROOT", "key_topic", "parse_key_topic"]

_ADDRESS = re.compile(r"0x[0-9a-f]{40}")

KEYS_ROOT: Final = "blendsm/keys"
"""Root of the topic-key tree: ``blendsm/keys/<topic id hex>/<address>`` carries the topic
key wrapped (ECIES) to that address's public key. Only the topic's seller publishes there
(retained), and only ``<address>`` may subscribe to it."""


def key_topic(topic_id: bytes, address: str) -> str:
    """``blendsm/keys/<topic id, 64 hex>/<address lower>``."""
    return f"{KEYS_ROOT}/{topic_id.hex()}/{address.lower()}"


def parse_key_topic(topic: str) -> tuple[bytes, str] | None:
    """``(topic id, address lower)`` for a well-formed key topic name, else None."""
    parts = topic.split("/")
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != KEYS_ROOT:
        return None
    if not re.fullmatch(r"[0-9a-f]{64}", parts[2]) or not _ADDRESS.fullmatch(parts[3]):
        return None
    return bytes.fromhex(parts[2]), parts[3]
