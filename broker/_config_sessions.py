"""The ``sessions`` config section: how long persistent sessions live and what they may hold.

A persistent session (CONNECT with clean session 0) outlives its connection: amqtt keeps its
subscriptions, the QoS 1/2 messages in flight and a queue of messages published while it was
away. Each of these is client-controlled memory, so each has a bound here, with a default
that a normal client never reaches (``docs/broker-config.md`` explains every choice). The
outgoing bounds of a connected session (``max_outgoing_*``, ``slow_consumer_seconds``) are here
too: what a subscriber that stops reading may make the broker hold
(:mod:`blendsm.broker._backpressure`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from blendsm.broker._config_fields import check_keys, integer, seconds
from blendsm.errors import ConfigError

__all__ = ["MAX_EXPIRY_SECONDS", "SessionsConfig", "parse_sessions"]

MAX_EXPIRY_SECONDS: Final = 30 * 86_400
"""``sessions.expiry_seconds`` at most: 30 days."""
MAX_SLOW_CONSUMER_SECONDS: Final = 3600.0
"""``sessions.slow_consumer_seconds`` at most: an hour."""


@dataclass(frozen=True, slots=True)
class SessionsConfig:
    """Persistent sessions: expiry, a cap per identity, and the bounds of their queues."""

    expiry_seconds: float = 86_400.0
    """A disconnected persistent session, with its queue and messages in flight, is dropped
    this long after its client went away (> 0, at most 30 days). A day covers an app restart
    or a night offline; abandoned client ids do not pile up for longer."""
    max_per_identity: int = 10
    """Persistent sessions one participant or device may hold (1-10000). The CONNECT that
    would open one more is refused with CONNACK 2 (identifier rejected); resuming an existing
    one, or a clean session, is always allowed."""
    max_queued_messages: int = 1000
    """Messages queued for one disconnected session (1-1000000); newer ones are dropped (not
    charged) and counted, like mosquitto's ``max_queued_messages``."""
    max_queued_bytes: int = 1 << 20
    """Payload bytes queued for one disconnected session (1 KiB - 1 GiB); newer messages that
    do not fit are dropped and counted."""
    max_inflight_messages: int = 1000
    """QoS 1/2 messages sent to one session and not yet acknowledged (1-65535, the packet id
    space); a delivery beyond it is not sent (not charged) and counted, and the replay of an
    offline queue waits for acknowledgements."""
    max_outgoing_bytes: int = 1 << 20
    """Bytes one connected session may have outstanding in the broker (4 KiB - 1 GiB): written
    to its transport and not yet taken by the kernel, plus deliveries and notices started and
    not yet written. A delivery beyond it is not sent (not charged) and counted, and the
    session is paused (:mod:`blendsm.broker._backpressure`)."""
    max_outgoing_messages: int = 10_000
    """Messages (deliveries and notices) one connected session may have outstanding in the
    broker, as for ``max_outgoing_bytes`` (1-10000000)."""
    slow_consumer_seconds: float = 10.0
    """A session paused (over an outgoing bound) without draining to half of it for this long
    is disconnected as a slow consumer (> 0, at most an hour)."""


def parse_sessions(data: Mapping[str, Any]) -> SessionsConfig:
    """Validate the ``sessions`` mapping (missing keys take their defaults)."""
    check_keys(data, SessionsConfig, "sessions")
    default = SessionsConfig()
    expiry = seconds(data, "expiry_seconds", "sessions", default.expiry_seconds, allow_zero=False)
    if expiry > MAX_EXPIRY_SECONDS:
        raise ConfigError(f"sessions.expiry_seconds: must be <= {MAX_EXPIRY_SECONDS}, got {expiry}")
    slow = seconds(
        data, "slow_consumer_seconds", "sessions", default.slow_consumer_seconds, allow_zero=False
    )
    if slow > MAX_SLOW_CONSUMER_SECONDS:
        raise ConfigError(
            f"sessions.slow_consumer_seconds: must be <= {MAX_SLOW_CONSUMER_SECONDS:.0f}, got {slow}"
        )
    return SessionsConfig(
        expiry_seconds=expiry,
        max_per_identity=integer(
            data, "max_per_identity", "sessions", default.max_per_identity, low=1, high=10_000
        ),
        max_queued_messages=integer(
            data, "max_queued_messages", "sessions", default.max_queued_messages, low=1, high=10**6
        ),
        max_queued_bytes=integer(
            data, "max_queued_bytes", "sessions", default.max_queued_bytes, low=1024, high=1 << 30
        ),
        max_inflight_messages=integer(
            data,
            "max_inflight_messages",
            "sessions",
            default.max_inflight_messages,
            low=1,
            high=65_535,
        ),
        max_outgoing_bytes=integer(
            data,
            "max_outgoing_bytes",
            "sessions",
            default.max_outgoing_bytes,
            low=4096,
            high=1 << 30,
        ),
        max_outgoing_messages=integer(
            data,
            "max_outgoing_messages",
            "sessions",
            default.max_outgoing_messages,
            low=1,
            high=10**7,
        ),
        slow_consumer_seconds=slow,
    )
