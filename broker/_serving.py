"""Whether this broker's operator serves a market topic: ``Brokers.isServing`` from events.

Why: a seller chooses which operators carry its data (``Brokers.setTopicOperators``, or a
default for all its topics with ``setSellerOperators``). A broker of an operator the seller did
not choose must neither take the seller's messages in (store, anchor, fan out) nor sell them,
so the chain view answers "no" to ``can_publish`` and ``can_subscribe`` for such a topic, and
the delivery gate stops live subscribers the moment the lists change. Kept apart from
:mod:`~blendsm.broker._chain_view` (near its size limit) as a mixin of it: the lists are
mirrored by the same event follower and the same handler, so they share its health, and the
hot path never calls the chain.

The rule is the contract's, read from the mirrored state:

- the topic's own list if set, else its seller's default; neither set: any operator;
- either way this broker's operator must be an active Operator in the Registry now (so a
  revoked or departed operator serves nothing, and a list whose operators were all revoked
  yields nobody: fail closed, never "anyone");
- a deployment made before the ``Brokers`` contract has no lists: every market topic is
  served as before (logged once at start), since nobody could have chosen otherwise;
- a view with no operator (a client's or a test's view of the market) does not check serving.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from blendsm.contracts import ChainEvent, Deployment, Role, TopicInfo

__all__ = ["SERVING_EVENTS", "ServingLists"]

#: The Brokers events the serving lists follow (besides the Registry's, which the view has).
SERVING_EVENTS: Final = ("Brokers.SellerOperatorsChanged", "Brokers.TopicOperatorsChanged")


class ServingLists:
    """The operator lists of ``Brokers`` and the serving decision of one broker's operator.

    A mixin of :class:`~blendsm.broker.ChainView`: it reads the view's participants through
    :meth:`_has_active_role` and is folded by the view's one event handler."""

    log: logging.Logger

    if TYPE_CHECKING:  # the chain view's, found through the MRO

        def _has_active_role(self, key: str, role: Role) -> bool: ...

    def _init_serving(self, deployment: Deployment) -> tuple[str, ...]:
        """Empty lists; the events to follow (none for a deployment without Brokers)."""
        self.brokers_deployed = "Brokers" in deployment.addresses
        self.operator_key: str | None = None
        """Lower-case address of the operator this view decides serving for; None: no check."""
        self._topic_lists: dict[bytes, frozenset[str]] = {}
        self._seller_lists: dict[str, frozenset[str]] = {}
        return SERVING_EVENTS if self.brokers_deployed else ()

    def serve_as(self, operator: str) -> None:
        """Decide serving for ``operator`` (the broker's ``operator_key`` address) from now on."""
        self.operator_key = operator.lower()
        if not self.brokers_deployed:
            self.log.warning(
                "chain view: this deployment has no Brokers contract, so no seller can choose"
                " operators: operator %s serves every market topic as before Brokers existed",
                operator,
            )

    def serves(self, topic: TopicInfo) -> bool:
        """``Brokers.isServing(topic, operator)`` as mirrored (see the module's rule). Read
        only with a topic a healthy view just returned: the caller checked health."""
        operator = self.operator_key
        if operator is None or not self.brokers_deployed:
            return True
        if not self._has_active_role(operator, Role.OPERATOR):
            return False
        chosen = self._topic_lists.get(topic.topic_id)
        if chosen is None:
            chosen = self._seller_lists.get(topic.seller.lower())
        return chosen is None or operator in chosen

    def operator_active(self) -> bool:
        """Whether this view's operator is an active Operator now (for log lines: uncounted)."""
        key = self.operator_key
        return key is not None and self._has_active_role(key, Role.OPERATOR)

    def serving_lists(self, topic: TopicInfo) -> tuple[bool, frozenset[str]]:
        """``(any_operator, chosen)`` as set on chain for ``topic`` (unfiltered; listings)."""
        chosen = self._topic_lists.get(topic.topic_id)
        if chosen is None:
            chosen = self._seller_lists.get(topic.seller.lower())
        return chosen is None, chosen or frozenset()

    def _apply_brokers(self, event: ChainEvent) -> None:
        """Fold a ``TopicOperatorsChanged`` or ``SellerOperatorsChanged`` (an empty list
        clears it); other Brokers events do not change who serves."""
        a = event.args
        operators = frozenset(str(o).lower() for o in a.get("operators", ()))
        if event.event == "TopicOperatorsChanged":
            topic_id = bytes(a["topicId"])
            if operators:
                self._topic_lists[topic_id] = operators
            else:
                self._topic_lists.pop(topic_id, None)
        elif event.event == "SellerOperatorsChanged":
            seller = str(a["seller"]).lower()
            if operators:
                self._seller_lists[seller] = operators
            else:
                self._seller_lists.pop(seller, None)
