"""What a verifying subscriber reads from the chain, and a small synchronous reader for it.

The subscriber trusts the chain, never the broker, for three facts: who sells a topic
(``Market.topic``), which seller a device acts for (``Registry.activeSellerOf``) and the root
a broker anchored for a batch (``DataAnchors.anchorOf``). :class:`ChainReader` is that
interface; :class:`Web3ChainReader` implements it with synchronous web3 over HTTP.

web3 is imported only when a :class:`Web3ChainReader` is made, so the device SDK keeps
importing without it (install ``blendsm[broker]`` or web3 to read the chain).

Caching: topic sellers and device owners change rarely and are kept ``ttl`` seconds (a
revoked device is accepted for at most that long); an anchored root never changes, so roots
are kept for good (bounded), while "not anchored yet" is never cached. The reader is
thread-safe; calls are serialised on one lock, and a node that does not answer within
``timeout`` raises :class:`~blendsm.errors.ChainUnavailableError`.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar, cast, runtime_checkable

from blendsm.errors import ConfigError

from ._keccak import checksum_address, keccak256

if TYPE_CHECKING:
    from blendsm.contracts import Deployment

__all__ = ["ChainReader", "Web3ChainReader"]

_T = TypeVar("_T")
_MISSING: Final = object()
_ROOTS_KEPT: Final = 4096


@runtime_checkable
class ChainReader(Protocol):
    """The chain facts a verifying subscriber needs; implementations must be thread-safe.
    Addresses are returned checksummed; each method may raise
    :class:`~blendsm.errors.ChainError` when the chain cannot answer."""

    def seller_of_topic(self, topic: str) -> str | None:
        """The seller of market topic ``topic`` (its name), None if no such topic."""
        ...

    def active_seller_of(self, device: str) -> str | None:
        """The active seller ``device`` publishes for, None if unregistered or inactive."""
        ...

    def anchor_root(self, broker: str, batch_id: int) -> bytes | None:
        """The Merkle root ``broker`` anchored as batch ``batch_id``, None if not anchored."""
        ...


class _TtlCache:
    """A bounded dict whose entries expire ``ttl`` seconds after they were stored."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float]) -> None:
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._items: OrderedDict[Any, tuple[float, Any]] = OrderedDict()

    def get(self, key: Any) -> Any:
        hit = self._items.get(key)
        if hit is None or hit[0] < self.clock():
            self._items.pop(key, None)
            return _MISSING
        self._items.move_to_end(key)
        return hit[1]

    def put(self, key: Any, value: Any, ttl: float | None = None) -> None:
        self._items[key] = (self.clock() + (self.ttl if ttl is None else ttl), value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


class Web3ChainReader:
    """:class:`ChainReader` over synchronous web3 on an HTTP(S) JSON-RPC endpoint.

    ``deployment`` is a :class:`~blendsm.contracts.Deployment` or the path of its JSON file.
    ``ttl`` bounds how stale a topic's seller or a device's owner may be; ``timeout`` is the
    HTTP request timeout in seconds.
    """

    def __init__(
        self,
        endpoint_url: str,
        deployment: Deployment | str | os.PathLike[str],
        *,
        ttl: float = 30.0,
        timeout: float = 10.0,
        cache_size: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(endpoint_url, str) or not endpoint_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(f"endpoint_url: must be an http(s):// URL, got {endpoint_url!r}")
        if not ttl >= 0:
            raise ConfigError(f"ttl: must be >= 0 seconds, got {ttl!r}")
        try:
            from web3 import HTTPProvider, Web3

            from blendsm.contracts import Deployment, load_artifact
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ConfigError(
                "Web3ChainReader needs web3: install blendsm with its broker dependencies"
            ) from exc
        if not isinstance(deployment, Deployment):
            deployment = Deployment.load(deployment)
        self.endpoint_url = endpoint_url
        self.deployment: Deployment = deployment
        self.w3 = Web3(HTTPProvider(endpoint_url, request_kwargs={"timeout": timeout}))

        def contract(name: str) -> Any:
            return self.w3.eth.contract(
                address=cast(Any, deployment.address(name)), abi=load_artifact(name)["abi"]
            )

        self._market = contract("Market")
        self._registry = contract("Registry")
        self._anchors = contract("DataAnchors")
        self._lock = threading.Lock()
        self._sellers = _TtlCache(ttl, cache_size, clock)
        self._owners = _TtlCache(ttl, cache_size, clock)
        self._roots = _TtlCache(float("inf"), _ROOTS_KEPT, clock)
        self.calls = 0
        """Chain calls made so far (cache misses)."""

    @property
    def chain_id(self) -> int:
        return self.deployment.chain_id

    @property
    def registry(self) -> str:
        """The Registry address: the ``verifyingContract`` of message signatures."""
        return self.deployment.address("Registry")

    def invalidate(self) -> None:
        """Forget cached sellers and device owners (roots never change and are kept)."""
        with self._lock:
            self._sellers.clear()
            self._owners.clear()

    def _call(self, action: str, fn: Callable[[], _T]) -> _T:
        from blendsm.contracts import chain_errors

        self.calls += 1
        with chain_errors(action):
            return fn()

    def _cached(self, cache: _TtlCache, key: Any, action: str, fn: Callable[[], _T]) -> _T:
        with self._lock:
            hit = cache.get(key)
            if hit is not _MISSING:
                return hit  # type: ignore[no-any-return]
            value = self._call(action, fn)
            cache.put(key, value)
            return value

    def seller_of_topic(self, topic: str) -> str | None:
        topic_id = keccak256(topic.encode())

        def read() -> str | None:
            seller = self._market.functions.topic(topic_id).call()[0]
            return _none_if_zero(seller)

        return self._cached(self._sellers, topic, "Market.topic", read)

    def active_seller_of(self, device: str) -> str | None:
        device = _checksum(device)

        def read() -> str | None:
            return _none_if_zero(self._registry.functions.activeSellerOf(device).call())

        return self._cached(self._owners, device, "Registry.activeSellerOf", read)

    def anchor_root(self, broker: str, batch_id: int) -> bytes | None:
        broker = _checksum(broker)
        key = (broker, batch_id)
        with self._lock:
            hit = self._roots.get(key)
            if hit is not _MISSING:
                return hit  # type: ignore[no-any-return]
            root = bytes(
                self._call(
                    "DataAnchors.anchorOf",
                    lambda: self._anchors.functions.anchorOf(broker, batch_id).call()[0],
                )
            )
            if not any(root):
                return None  # not anchored (yet): asked again next time
            self._roots.put(key, root)
            return root


def _checksum(address: str) -> str:
    text = address.removeprefix("0x").removeprefix("0X")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 20:
        raise ConfigError(f"not an address: {address!r}")
    return checksum_address(raw)


def _none_if_zero(value: str) -> str | None:
    return None if int(value, 16) == 0 else _checksum(value)
