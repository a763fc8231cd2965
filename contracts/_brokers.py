"""The binding of ``Brokers``: an operator's broker processes and the operators serving a topic.

Kept out of :mod:`._bindings` (one module per contract family, each under the size limit).
Listing is bounded: ``brokers()`` reads at most ``limit`` records, since each costs a call,
and the contract's lists can only grow.
"""

from __future__ import annotations

from collections.abc import Iterable

from blendsm.contracts._binding_base import Binding, addr, bytes32
from blendsm.contracts._records import BrokerInfo, BrokerStatus, ServingOperators, TxResult

__all__ = ["MAX_LISTED_BROKERS", "Brokers", "split_endpoints"]

#: The most broker records one listing call reads (each is one or two contract calls).
MAX_LISTED_BROKERS = 1_000


def split_endpoints(endpoints: str | Iterable[str]) -> str:
    """One space-separated endpoint string from a string or a list of URLs (no check here:
    the contract validates, and its error names the problem)."""
    if isinstance(endpoints, str):
        return " ".join(endpoints.split())
    return " ".join(e.strip() for e in endpoints)


class Brokers(Binding):
    """Broker registrations (per operator) and the operators a seller chose for its topics."""

    NAME = "Brokers"

    async def register_broker(self, broker_key: str, endpoints: str | Iterable[str]) -> TxResult:
        """Register a broker key with its endpoints (active operators only)."""
        return await self._simple("registerBroker", addr(broker_key), split_endpoints(endpoints))

    async def update_endpoints(self, broker_key: str, endpoints: str | Iterable[str]) -> TxResult:
        return await self._simple("updateEndpoints", addr(broker_key), split_endpoints(endpoints))

    async def retire_broker(self, broker_key: str) -> TxResult:
        """Retire one of the signer's brokers for good."""
        return await self._simple("retireBroker", addr(broker_key))

    async def set_topic_operators(self, topic_id: bytes, operators: Iterable[str]) -> TxResult:
        """Choose the operators serving ``topic_id`` (its seller only); empty clears."""
        return await self._simple(
            "setTopicOperators", bytes32(topic_id, "topic_id"), [addr(o) for o in operators]
        )

    async def set_seller_operators(self, operators: Iterable[str]) -> TxResult:
        """Choose the signing seller's default operators; empty clears (any operator)."""
        return await self._simple("setSellerOperators", [addr(o) for o in operators])

    async def broker(self, broker_key: str) -> BrokerInfo | None:
        """The broker's record, None if the key was never registered."""
        key = addr(broker_key)
        endpoints, operator, registered_at, status = await self._read("broker", key)
        if BrokerStatus(status) is BrokerStatus.NONE:
            return None
        active = bool(await self._read("isActiveBroker", key))
        return BrokerInfo(
            broker_key=key,
            operator=addr(operator),
            status=BrokerStatus(status),
            registered_at=int(registered_at),
            endpoints=tuple(str(endpoints).split()),
            active=active,
        )

    async def is_active_broker(self, broker_key: str) -> bool:
        return bool(await self._read("isActiveBroker", addr(broker_key)))

    async def broker_count(self) -> int:
        return int(await self._read("brokerCount"))

    async def operator_broker_keys(self, operator: str) -> list[str]:
        """Every key ``operator`` ever registered, oldest first (retired ones included)."""
        return [addr(k) for k in await self._read("operatorBrokers", addr(operator))]

    async def brokers(
        self, operator: str | None = None, *, limit: int = MAX_LISTED_BROKERS
    ) -> list[BrokerInfo]:
        """The records of every broker (or of ``operator``'s), oldest first, at most ``limit``."""
        if operator is not None:
            keys = (await self.operator_broker_keys(operator))[:limit]
        else:
            count = min(await self.broker_count(), limit)
            keys = [addr(await self._read("brokerAt", i)) for i in range(count)]
        found = [await self.broker(k) for k in keys]
        return [b for b in found if b is not None]

    async def topic_operators(self, topic_id: bytes) -> list[str]:
        """The list set for the topic itself, unfiltered."""
        return [addr(o) for o in await self._read("topicOperators", bytes32(topic_id, "topic_id"))]

    async def seller_operators(self, seller: str) -> list[str]:
        """The seller's default list, unfiltered."""
        return [addr(o) for o in await self._read("sellerOperators", addr(seller))]

    async def serving_operators(self, topic_id: bytes) -> ServingOperators:
        """Who may serve the topic now (see :class:`ServingOperators`)."""
        any_operator, operators = await self._read(
            "servingOperators", bytes32(topic_id, "topic_id")
        )
        return ServingOperators(bool(any_operator), tuple(addr(o) for o in operators))

    async def is_serving(self, topic_id: bytes, operator: str) -> bool:
        return bool(await self._read("isServing", bytes32(topic_id, "topic_id"), addr(operator)))
