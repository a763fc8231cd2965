"""The one error tree of BlendSM.

Every error BlendSM raises on purpose derives from :class:`BlendsmError`; where a
stdlib class describes the same failure, the error also derives from it, so callers
can catch either. Chain errors are re-raised with ``from`` so the original stays
visible::

    BlendsmError
    ├── ConfigError(BlendsmError, ValueError)        bad settings, named by field
    ├── WireError(BlendsmError, ValueError)          malformed wire data (vouchers, tokens, proofs)
    │   ├── VoucherError                             a voucher the contract would refuse
    │   │   ├── VoucherSignatureError                malformed, high-s, bad v, not the payer
    │   │   ├── VoucherNotNewerError                 cumulative amount not above what was claimed
    │   │   └── VoucherChannelError                  channel unknown, closed or past its challenge period
    │   ├── ConnectTokenError                        MQTT CONNECT password token malformed, forged, stale or replayed
    │   ├── EnvelopeError                            signed message envelope malformed, or not signed by its device
    │   └── DecryptionError                          encrypted payload or wrapped topic key cannot be opened
    ├── ArtifactError(BlendsmError, RuntimeError)    compiled contracts missing or stale
    ├── StoreError(BlendsmError, RuntimeError)       voucher store unreadable, foreign, newer or misused
    ├── OutboxFullError(BlendsmError, RuntimeError)  a device's durable outbox is at its bound; message refused
    ├── LeafBudgetError(BlendsmError, RuntimeError)  a seller's unanchored leaves are at the broker's bound; message refused
    ├── BrokerConnectionError(BlendsmError, ConnectionError)   MQTT broker unreachable, silent or gone
    │   └── BrokerRefusedError                       CONNACK refused (bad token, not a member), with its code
    ├── SubscriptionRefusedError(BlendsmError, PermissionError)  SUBACK 0x80 for a topic filter
    └── ChainError(BlendsmError, RuntimeError)       the chain could not answer or refused
        ├── ChainUnavailableError(ChainError, ConnectionError)
        ├── TransactionFailedError                   mined but reverted, or never mined
        └── ContractRevertError                      a contract's custom error, decoded
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "ArtifactError",
    "BlendsmError",
    "BrokerConnectionError",
    "BrokerRefusedError",
    "ChainError",
    "ChainUnavailableError",
    "ConfigError",
    "ConnectTokenError",
    "ContractRevertError",
    "DecryptionError",
    "EnvelopeError",
    "LeafBudgetError",
    "OutboxFullError",
    "StoreError",
    "SubscriptionRefusedError",
    "TransactionFailedError",
    "VoucherChannelError",
    "VoucherError",
    "VoucherLaneError",
    "VoucherNotNewerError",
    "VoucherSignatureError",
    "WireError",
]


class BlendsmError(Exception):
    """Root of every error BlendSM raises on purpose."""


class ConfigError(BlendsmError, ValueError):
    """A setting is missing or invalid; the message names the field."""


class WireError(BlendsmError, ValueError):
    """Bytes from the wire (a voucher, a token, a proof) are malformed."""


class VoucherError(WireError):
    """A voucher that the PaymentChannels contract would refuse to pay."""


class VoucherSignatureError(VoucherError):
    """The signature is malformed, non-canonical (high s, v not 27/28) or not the payer's."""


class VoucherNotNewerError(VoucherError):
    """The voucher's cumulative amount pays nothing over what was already claimed."""


class VoucherChannelError(VoucherError):
    """The channel is unknown, already settled, or past its challenge period."""


class VoucherLaneError(VoucherError):
    """The voucher names another lane (broker key) than the one that meters it here."""


class ConnectTokenError(WireError):
    """An MQTT CONNECT password token the broker refuses.

    Malformed text, a bad or foreign signature (other broker, chain, client id or
    address), an ``issuedAt`` outside the accepted window, a replayed nonce, or a full
    replay cache (refused rather than risk forgetting a nonce still valid).
    """


class EnvelopeError(WireError):
    """A signed message envelope is malformed, or its signature is not its device's for
    that topic (tampered payload, topic, sequence or timestamp, or another key)."""


class DecryptionError(WireError):
    """An encrypted payload or a wrapped key cannot be opened: unknown epoch, wrong key,
    altered bytes, or bound to another topic, epoch or recipient."""


class OutboxFullError(BlendsmError, RuntimeError):
    """The publisher's outbox is at its bound (messages or bytes): the message was refused,
    nothing queued was dropped. Wait for the broker (``flush``) or raise the bound."""

    def __init__(self, pending: int, pending_bytes: int, max_messages: int, max_bytes: int) -> None:
        self.pending = pending
        self.pending_bytes = pending_bytes
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        super().__init__(
            f"outbox full: {pending} messages / {pending_bytes} bytes queued"
            f" (bounds {max_messages} messages, {max_bytes} bytes); message refused"
        )


class LeafBudgetError(BlendsmError, RuntimeError):
    """A seller's devices have ``anchoring.max_pending_leaves_per_seller`` leaves waiting for an
    anchor: the broker refuses the message (not stored, delivered or acknowledged) until
    anchors drain the backlog, so one seller cannot make the broker keep unbounded data."""


class ArtifactError(BlendsmError, RuntimeError):
    """Compiled contract artifacts are missing, unreadable or do not match their sources."""


class StoreError(BlendsmError, RuntimeError):
    """The broker's voucher store cannot be trusted or was misused.

    The file is not SQLite, belongs to another application, has a newer schema, or a
    claim was moved through an impossible state; refusing beats losing money silently.
    """


class BrokerConnectionError(BlendsmError, ConnectionError):
    """The MQTT broker cannot be reached, did not answer in time, or the connection is gone."""


class BrokerRefusedError(BrokerConnectionError):
    """The broker answered CONNECT with a refusal.

    ``return_code`` is the MQTT 3.1.1 CONNACK code (1 protocol version, 2 client id,
    3 server unavailable, 4 bad user name or password, 5 not authorised); ``reason`` its name.
    A BlendSM broker answers 4 or 5 to a stale, replayed or foreign token and to non-members.
    """

    def __init__(self, return_code: int, reason: str) -> None:
        self.return_code = return_code
        self.reason = reason
        super().__init__(f"broker refused the connection: {reason} (CONNACK code {return_code})")


class SubscriptionRefusedError(BlendsmError, PermissionError):
    """The broker answered SUBSCRIBE with 0x80 (no access, unpaid topic, invalid filter).

    The client stays connected; ``topic_filter`` is the refused filter.
    """

    def __init__(self, topic_filter: str) -> None:
        self.topic_filter = topic_filter
        super().__init__(f"broker refused the subscription to {topic_filter!r} (SUBACK 0x80)")


class ChainError(BlendsmError, RuntimeError):
    """The chain could not answer, or refused what we asked."""


class ChainUnavailableError(ChainError, ConnectionError):
    """The JSON-RPC endpoint cannot be reached (down, restarting, timing out)."""


class TransactionFailedError(ChainError):
    """A transaction reverted or was not mined in time."""


class ContractRevertError(ChainError):
    """A contract reverted with one of its custom errors.

    ``error_name`` is the Solidity error (e.g. ``PaymentChannelsNothingToClaim``) and
    ``error_args`` its decoded arguments by name.
    """

    def __init__(self, error_name: str, error_args: dict[str, Any] | None = None) -> None:
        self.error_name = error_name
        self.error_args = dict(error_args or {})
        detail = ", ".join(f"{k}={_shown(v)}" for k, v in self.error_args.items())
        super().__init__(f"{error_name}({detail})")


def _shown(value: Any) -> str:
    """An error argument as people read it: ``Status.REVOKED`` for an enum, else its repr."""
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    return repr(value)
