"""Where an SDK client connects, as one value: :class:`BrokerEndpoint`.

Why: the Publisher, the Subscriber, the TopicKeyring and the TopicKeyService all connect to a
BlendSM broker the same way (host and port, CONNECT tokens bound to the broker operator's
address and the chain id, a client id and a keepalive). One frozen value, checked once, is
passed instead of the same six keyword arguments through every class; the old keyword
arguments still work (:func:`resolve_endpoint` turns them into an endpoint).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from blendsm.errors import ConfigError

from ._eip712 import address_bytes, check_chain_id
from ._keccak import checksum_address

__all__ = ["BrokerEndpoint", "EndpointArgs", "resolve_endpoint"]


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    """A BlendSM broker as an SDK client sees it; the fields are checked on construction
    (ConfigError).

    ``broker`` is the broker operator's address (hex or 20 bytes, kept in checksum form):
    CONNECT tokens are bound to it and to ``chain_id``, so a token for one broker is
    worthless at another. ``client_id`` None makes each client draw its own
    (``bsm-<address>-<random>``), so one endpoint can be shared by several clients of one
    account without their sessions taking over each other.
    """

    host: str
    port: int
    broker: str
    chain_id: int
    client_id: str | None = None
    keepalive: int = 60

    def __init__(
        self,
        host: str,
        port: int,
        broker: str | bytes,
        chain_id: int,
        client_id: str | None = None,
        keepalive: int = 60,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "chain_id", check_chain_id(chain_id))
        set_(self, "broker", checksum_address(address_bytes(broker, "broker", ConfigError)))
        if client_id is not None and (not isinstance(client_id, str) or not client_id):
            raise ConfigError(f"client_id: must be a non-empty str, got {client_id!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ConfigError(f"port: must be an int in [1, 65535], got {port!r}")
        if not isinstance(keepalive, int) or isinstance(keepalive, bool) or keepalive < 0:
            raise ConfigError(f"keepalive: must be a non-negative int, got {keepalive!r}")
        set_(self, "host", host)
        set_(self, "port", port)
        set_(self, "client_id", client_id)
        set_(self, "keepalive", keepalive)


class EndpointArgs(TypedDict, total=False):
    """The fields of a :class:`BrokerEndpoint` as keyword arguments of a client (the way
    clients were configured before ``endpoint=``; still accepted)."""

    host: str
    port: int
    broker: str | bytes
    chain_id: int
    client_id: str | None
    keepalive: int


_REQUIRED = ("host", "port", "broker", "chain_id")
_FIELDS = frozenset(EndpointArgs.__annotations__)


def resolve_endpoint(
    endpoint: BrokerEndpoint | None, fields: Mapping[str, Any], owner: str
) -> BrokerEndpoint:
    """``endpoint``, or one built from the keyword arguments ``fields`` given to ``owner``.

    Raises TypeError, as Python does for a bad call, for an unknown or missing keyword
    argument; ConfigError when both an ``endpoint`` and endpoint fields are given (which
    would win is not obvious) or a field is invalid.
    """
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
    if endpoint is not None:
        if fields:
            raise ConfigError(
                f"{owner}: give either endpoint= or {', '.join(sorted(fields))}, not both"
            )
        if not isinstance(endpoint, BrokerEndpoint):
            raise ConfigError(f"endpoint: must be a BrokerEndpoint, got {endpoint!r}")
        return endpoint
    missing = [name for name in _REQUIRED if name not in fields]
    if missing:
        raise TypeError(
            f"{owner}() missing required keyword argument {missing[0]!r} (or give endpoint=)"
        )
    return BrokerEndpoint(**fields)
