"""Which brokers serve a topic, read from the ``Brokers`` contract, in failover order.

Why here: a :class:`~blendsm.device_sdk.FailoverSubscriber` built from the chain needs the
endpoints of every serving broker without the buyer configuring them. The SDK stays light:
web3 is imported when this is called, never at import (as :mod:`._chain_reader` does).

The order (the failover policy of :meth:`FailoverSubscriber.from_chain`):

1. operators in the order ``Brokers.servingOperators(topicId)`` returns them: the topic's
   list as the seller wrote it, else the seller's default list (the seller's preference),
   filtered to active operators; when the seller chose nobody (``anyOperator``), every
   registered broker in registration order (``brokerAt``);
2. per operator, its brokers in ``operatorBrokers`` order (registration), skipping those
   ``isActiveBroker`` says are retired or whose operator was revoked;
3. per broker, its ``mqtt://`` endpoints (and ``mqtts://`` ones with TLS) in the order the
   operator registered them; ``ws``/``wss`` are skipped here (build a
   :class:`BrokerEndpoint` by hand for those).

The list is read once; call again (and build a new subscriber) to follow
``BrokerRegistered``, ``BrokerRetired`` or ``TopicOperatorsChanged``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import urlsplit

from blendsm.errors import ConfigError

from ._endpoint import BrokerEndpoint, ClientTls

if TYPE_CHECKING:
    from blendsm.contracts import Deployment

__all__ = ["serving_endpoints"]

MAX_DISCOVERED: Final = 64
"""Most endpoints returned (operators x brokers x URLs are each bounded on chain)."""


def serving_endpoints(
    endpoint_url: str,
    deployment: Deployment | str | os.PathLike[str],
    topic_id: bytes,
    *,
    timeout: float = 10.0,
) -> list[BrokerEndpoint]:
    """The endpoints of the brokers serving ``topic_id`` (32 bytes), in failover order (see
    the module doc). ``BrokerEndpoint.broker`` is each broker's operator: CONNECT tokens and
    channels are bound to the operator, so a buyer needs a channel per serving operator."""
    if len(topic_id) != 32:
        raise ConfigError(f"topic_id: must be 32 bytes, got {len(topic_id)}")
    try:
        from web3 import HTTPProvider, Web3

        from blendsm.contracts import Deployment, load_artifact
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ConfigError("serving_endpoints needs web3: install blendsm with the broker") from exc
    if not isinstance(deployment, Deployment):
        deployment = Deployment.load(deployment)
    w3 = Web3(HTTPProvider(endpoint_url, request_kwargs={"timeout": timeout}))
    brokers = w3.eth.contract(
        address=cast(Any, deployment.address("Brokers")), abi=load_artifact("Brokers")["abi"]
    )
    fn = brokers.functions
    any_operator, operators = fn.servingOperators(topic_id).call()
    keys: list[str] = []
    if any_operator:
        keys = [fn.brokerAt(i).call() for i in range(min(fn.brokerCount().call(), 256))]
    else:
        for operator in operators:
            keys.extend(fn.operatorBrokers(operator).call())
    found: list[BrokerEndpoint] = []
    for key in keys:
        if not fn.isActiveBroker(key).call():
            continue
        record = fn.broker(key).call()
        endpoints, operator = record[0], record[1]
        for url in str(endpoints).split():
            endpoint = _endpoint(url, operator, deployment.chain_id)
            if endpoint is not None and len(found) < MAX_DISCOVERED:
                found.append(endpoint)
    return found


def _endpoint(url: str, operator: str, chain_id: int) -> BrokerEndpoint | None:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        return None
    port = parts.port or (1883 if parts.scheme == "mqtt" else 8883)
    tls = ClientTls() if parts.scheme == "mqtts" else None
    return BrokerEndpoint(parts.hostname, port, operator, chain_id, tls=tls)
