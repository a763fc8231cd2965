"""Who a session is and what it may do: CONNECT, SUBSCRIBE, PUBLISH, RECEIVE and the gate.

Why apart from the service wiring: these decisions are the broker's security boundary and its
hot path, and they only read in-memory state (the chain view, the meter), so they can be read,
reviewed and tested as one piece. :class:`AccessDecisions` is the part of
:class:`~blendsm.broker.MarketplaceService` that makes them; the service supplies the state.
Every decision classifies the topic with :func:`~blendsm.broker._topics.classify_topic` first,
before any chain view lookup: the reserved ``blendsm/`` tree is decided here whatever the chain
says, so a topic an older Market let a seller squat there cannot hijack it.

Fail closed: an unknown session, an unhealthy chain view, a missing channel or any exception
answers "no", and the log says why. Public (non-market) topics follow ``public_topics`` and keep
working while the chain is unreachable.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from blendsm.broker._chain_view import ChainView
from blendsm.broker._log_limit import LogLimiter
from blendsm.broker._meter import Account, Charge, Meter, Reservation
from blendsm.broker._stats import ServiceStats
from blendsm.broker._topics import TopicClass, classify_topic
from blendsm.device_sdk import CONTROL_ROOT, ConnectTokenVerifier, Refusal, parse_key_topic
from blendsm.errors import ConnectTokenError

if TYPE_CHECKING:
    from amqtt.session import Session
    from eth_account.signers.local import LocalAccount

    from blendsm.broker._voucher_intake import VoucherIntake
    from blendsm.contracts import TopicInfo


__all__ = ["MAX_PENDING_REFUSALS", "AccessDecisions", "Identity", "Verdict"]

MAX_PENDING_REFUSALS = 8
"""Refusal notices one SUBSCRIBE may queue for its session (the rest are only logged)."""


class Verdict(enum.Enum):
    """Non-charging outcomes of the delivery gate."""

    FREE = "free"
    """Send, nothing to charge (public topic, or a market topic priced 0)."""
    DENY = "deny"
    """Do not send: not entitled, no channel, chain view unhealthy, control topic."""
    NO_CREDIT = "no credit"
    """Do not send now: the channel's credit is used up until a voucher arrives."""


@dataclass(slots=True, eq=False)
class Identity:
    """Who a session is, fixed at CONNECT (attached to the amqtt Session as ``blendsm``)."""

    kind: Literal["participant", "device", "anonymous"]
    address: str | None = None
    """Checksum address proven by the CONNECT token; None for anonymous clients."""
    key: str = ""
    """Lower-case address, the key of every chain view lookup ("" for anonymous)."""
    seller_key: str = ""
    """For a device, its seller's lower-case address."""
    quoted: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    """topic -> (channel id, price) last quoted to this session."""
    subscribing: bool = False
    """Set while amqtt handles this session's SUBSCRIBE (retained messages go out only then)."""
    owing: Account | None = None
    """Account whose credit ran out at the last gate refusal (payment request pending)."""
    owing_topic: str = ""
    requested: dict[bytes, int] = field(default_factory=dict)
    """channel id -> the account's ``paid`` when this session was last sent a payment request."""
    control_tasks: int = 0
    """Control tasks of this session still in process (proof requests, notices): bounded by
    ``MAX_CONTROL_TASKS``. Vouchers take no task: they queue in the voucher intake."""
    receipted: dict[bytes, float] = field(default_factory=dict)
    """channel id -> loop time this session was last sent a Receipt (receipt batching)."""
    pending_refusals: list[Refusal] = field(default_factory=list)
    """Refusals of the SUBSCRIBE being handled (``not_serving``), sent after its SUBACK;
    at most ``MAX_PENDING_REFUSALS``."""


class AccessDecisions:
    """The identity and access decisions of a :class:`~blendsm.broker.MarketplaceService`
    (a base class: the service sets the state they read)."""

    log: logging.Logger
    public_topics: bool
    view: ChainView
    meter: Meter
    tokens: ConnectTokenVerifier
    operator: LocalAccount
    stats: ServiceStats
    intake: VoucherIntake
    _denied_log: LogLimiter
    """Paid deliveries not sent for credit or deposit: one line a minute, the rest counted."""
    _serving_log: LogLimiter
    """PUBLISH and SUBSCRIBE refused because this operator does not serve the topic."""

    # --- identity ----------------------------------------------------------------------

    def authenticate(self, session: Session) -> bool:
        """Decide a CONNECT; on success attach an :class:`Identity` to the session."""
        try:
            identity = self._identify(session)
        except Exception:
            self.log.exception("CONNECT refused for client %r: internal error", session.client_id)
            identity = None
        if identity is None:
            self.stats.connects_refused += 1
            return False
        if session.will_flag and not self._will_allowed(session.will_topic):
            self.log.warning(
                "CONNECT refused for client %r: Will topic %r is in the reserved blendsm/ tree or"
                " a market topic, or public topics are off",
                session.client_id,
                session.will_topic,
            )
            self.stats.connects_refused += 1
            return False
        session.blendsm = identity
        session.is_anonymous = identity.kind == "anonymous"
        self.stats.connects_accepted += 1
        return True

    def _identify(self, session: Session) -> Identity | None:
        client = session.client_id
        if not session.username and not session.password:
            if self.public_topics:
                return Identity("anonymous")
            self.log.info(
                "CONNECT refused for client %r: anonymous and public topics are off", client
            )
            return None
        try:
            address = self.tokens.verify(
                session.username, client or "", session.password, time.time()
            )
        except ConnectTokenError as exc:
            self.log.info("CONNECT refused for client %r: %s", client, exc)
            return None
        view = self.view
        if not view.healthy:
            self.log.warning(
                "CONNECT refused for %s (client %r): chain view unhealthy (%s)",
                address,
                client,
                view.unhealthy_reason,
            )
            return None
        key = address.lower()
        found = view.identify(address)
        if found is not None:
            _role, seller = found
            if seller is None:
                return Identity("participant", address, key)
            return Identity("device", address, key, seller.lower())
        self.log.info(
            "CONNECT refused for %s (client %r): not an active participant or device of an"
            " active seller in the Registry",
            address,
            client,
        )
        return None

    def _will_allowed(self, topic: str | None) -> bool:
        if not topic or classify_topic(topic) is not TopicClass.OPEN:
            return False  # the reserved tree: only the broker and the sellers' keys write there
        if self.view.is_market_topic(topic):
            return False
        return self.public_topics

    @staticmethod
    def identity(session: Session) -> Identity | None:
        return getattr(session, "blendsm", None)

    # --- access decisions (SUBSCRIBE, PUBLISH, RECEIVE) ----------------------------------

    def allow_subscribe(self, session: Session, topic_filter: str) -> bool:
        """SUBSCRIBE: own control subtree; exact market topics need canSubscribe and a usable
        channel; wildcards are granted and gated per message; public topics per config."""
        ident = self.identity(session)
        if ident is None:
            return False
        reserved = classify_topic(topic_filter)
        if reserved is TopicClass.ANCHORS:
            return True  # anchor notices are public: anyone may check them on chain
        if reserved is TopicClass.KEYS:
            return self._is_key_owner(ident, topic_filter)
        if reserved is TopicClass.CONTROL:
            own = f"{CONTROL_ROOT}/{ident.key}/"
            allowed = bool(ident.key) and topic_filter.startswith(own)
            if not allowed:
                self.log.info(
                    "SUBSCRIBE %r refused for %s: not its control topic",
                    topic_filter,
                    ident.address,
                )
            return allowed
        wildcard = "+" in topic_filter or "#" in topic_filter
        if reserved is TopicClass.RESERVED and not wildcard:
            self.log.info(
                "SUBSCRIBE %r refused for %s: reserved topic",
                topic_filter,
                ident.address or "anonymous",
            )
            return False
        if wildcard:  # each message is gated (admit), reserved ones included
            return self.public_topics or bool(ident.key)
        view = self.view
        topic = view.topic_for_name(topic_filter)
        if topic is None:
            if view.is_market_topic(topic_filter):
                self.log.info(
                    "SUBSCRIBE %r refused for %s: chain view unhealthy (%s)",
                    topic_filter,
                    ident.address,
                    view.unhealthy_reason,
                )
                return False
            return self.public_topics
        if not view.serves(topic):
            self.stats.subscribes_refused_not_serving += 1
            self._not_serving("SUBSCRIBE", topic_filter, ident, topic)
            if ident.key and len(ident.pending_refusals) < MAX_PENDING_REFUSALS:
                detail = f"operator {self.operator.address} does not serve {topic_filter[:200]!r}"
                ident.pending_refusals.append(Refusal("not_serving", detail))
            return False
        if not ident.key or not view.can_subscribe(ident.key, topic.topic_id):
            self.log.info(
                "SUBSCRIBE %r refused for %s: Market.canSubscribe is false",
                topic_filter,
                ident.address or "anonymous",
            )
            return False
        if topic.price and self.meter.select(ident.key, topic, view) is None:
            self.log.info(
                "SUBSCRIBE %r refused for %s: no open channel to seller %s with operator %s",
                topic_filter,
                ident.address,
                topic.seller,
                self.operator.address,
            )
            return False
        return True

    def allow_publish(self, session: Session, topic_name: str) -> bool:
        """PUBLISH: market topics only from the seller's registered devices."""
        ident = self.identity(session)
        if ident is None:
            return False
        reserved = classify_topic(topic_name)
        if reserved is TopicClass.KEYS:
            return self._is_key_publisher(ident, topic_name)
        if reserved is not TopicClass.OPEN:
            return False  # only the broker publishes there (control: its own intake)
        view = self.view
        topic = view.topic_for_name(topic_name)
        if topic is None:
            if view.is_market_topic(topic_name):
                self.log.info("PUBLISH %r refused: chain view unhealthy", topic_name)
                return False
            return self.public_topics
        if not view.serves(topic):
            self.stats.publishes_refused_not_serving += 1
            self._not_serving("PUBLISH", topic_name, ident, topic)
            return False
        if ident.key and view.can_publish(ident.key, topic.topic_id):
            return True
        self.log.info(
            "PUBLISH %r refused for %s: not a registered device of seller %s (or topic paused)",
            topic_name,
            ident.address or "anonymous",
            topic.seller,
        )
        return False

    def allow_receive(self, session: Session, topic_name: str) -> bool:
        """RECEIVE (broadcast, also before queueing for an offline session): entitlement
        only; credit is checked when the message is actually sent."""
        ident = self.identity(session)
        if ident is None:
            return False
        reserved = classify_topic(topic_name)
        if reserved is TopicClass.ANCHORS:
            return True
        if reserved is TopicClass.KEYS:
            return self._is_key_owner(ident, topic_name)
        if reserved is not TopicClass.OPEN:
            return False
        view = self.view
        topic = view.topic_for_name(topic_name)
        if topic is None:
            return self.public_topics and not view.is_market_topic(topic_name)
        return bool(ident.key) and view.can_subscribe(ident.key, topic.topic_id)

    def _not_serving(self, action: str, topic_name: str, ident: Identity, topic: TopicInfo) -> None:
        any_operator, chosen = self.view.serving_lists(topic)
        self._serving_log.note(
            "%s %r refused for %s: operator %s does not serve it (Brokers: %s; operator active:"
            " %s)",
            action,
            topic_name[:200],
            ident.address or "anonymous",
            self.operator.address,
            "any operator" if any_operator else f"seller chose {sorted(chosen)}",
            self.view.operator_active(),
        )

    # --- the delivery gate (hot path) ----------------------------------------------------

    def admit(self, session: Session, topic_name: str) -> Charge | Verdict:
        """Decide one delivery: a :class:`Charge` to commit after the write, or a Verdict."""
        ident = getattr(session, "blendsm", None)
        if ident is None:
            return Verdict.DENY
        reserved = classify_topic(topic_name)  # the reserved tree first, whatever the chain says
        if reserved is not TopicClass.OPEN:
            if reserved is TopicClass.ANCHORS:
                return Verdict.FREE
            if reserved is TopicClass.KEYS:
                return Verdict.FREE if self._is_key_owner(ident, topic_name) else Verdict.DENY
            return Verdict.DENY  # control (sent as notices, never broadcast) and the rest
        view = self.view
        topic = view.topic_for_name(topic_name)
        if topic is None:
            if view.is_market_topic(topic_name):  # the view cannot decide: fail closed
                self.stats.deliveries_denied += 1
                return Verdict.DENY
            if self.public_topics:
                self.stats.public_deliveries += 1
                return Verdict.FREE
            return Verdict.DENY
        key = ident.key
        if not key or not view.can_subscribe(key, topic.topic_id):
            self.stats.deliveries_denied += 1
            return Verdict.DENY
        return self._admit_entitled(ident, topic_name, topic)

    def gate(self, topic_name: str) -> Callable[[Session], Charge | Verdict]:
        """:meth:`admit` for every session of one broadcast of ``topic_name``, deciding what
        depends on the topic alone once (its class, the view's health and topic record,
        whether it runs and its seller is active) instead of once per delivery: at ten
        subscribers that was most of the gate's cost. Use it within one loop turn (the view
        changes only between turns): the fan-out makes a new one after any await. Anything
        other than a live public or market topic takes :meth:`admit` per session."""
        admit = self.admit
        if classify_topic(topic_name) is not TopicClass.OPEN:
            return lambda session: admit(session, topic_name)
        view = self.view
        topic = view.topic_for_name(topic_name)
        if topic is None:
            if not self.public_topics or view.is_market_topic(topic_name):
                return lambda session: admit(session, topic_name)  # denied: counted there
            stats = self.stats

            def public(session: Session) -> Charge | Verdict:
                if getattr(session, "blendsm", None) is None:
                    return Verdict.DENY
                stats.public_deliveries += 1
                return Verdict.FREE

            return public
        if not view.topic_sells(topic):
            return lambda session: admit(session, topic_name)  # denied: counted there
        admits_buyer, entitled, stats = view.admits_buyer, self._admit_entitled, self.stats

        def market(session: Session) -> Charge | Verdict:
            ident: Identity | None = getattr(session, "blendsm", None)
            if ident is None:
                return Verdict.DENY
            if not ident.key or not admits_buyer(topic, ident.key):
                stats.deliveries_denied += 1
                return Verdict.DENY
            return entitled(ident, topic_name, topic)

        return market

    def _admit_entitled(
        self, ident: Identity, topic_name: str, topic: TopicInfo
    ) -> Charge | Verdict:
        """The gate's second half, for a subscriber ``canSubscribe`` admits: free, or a
        reservation on its channel (credit and deposit)."""
        view = self.view
        key = ident.key
        if not topic.price:
            self.stats.free_market_deliveries += 1
            if self.meter.on_delivered is not None:
                self.meter.on_delivered(topic_name)
            return Verdict.FREE
        account = self.meter.select(key, topic, view)
        if account is None:
            self.stats.deliveries_denied += 1
            return Verdict.DENY
        result = self.meter.reserve(account, topic.price, topic_name)
        if type(result) is Charge:
            return result
        self.stats.deliveries_denied += 1
        self._denied_log.note(
            "paid message on %r not sent to %s: %s (channel %s: %d refused for credit so far)",
            topic_name,
            ident.address,
            "refused for credit, awaiting a voucher"
            if result == Reservation.NO_CREDIT
            else "deposit used up",
            account.channel_id.hex(),
            account.denied_no_credit,
        )
        if result == Reservation.NO_CREDIT:
            ident.owing = account
            ident.owing_topic = topic_name
            # Whatever becomes of this delivery (held, paused in a replay, dropped), a voucher
            # of its channel already in the intake is taken now: no linger, no yielding.
            self.intake.expedite(account.channel_id)
            return Verdict.NO_CREDIT
        return Verdict.DENY

    @staticmethod
    def _is_key_owner(ident: Identity, topic_name: str) -> bool:
        """Only the addressed participant receives a wrapped topic key."""
        parsed = parse_key_topic(topic_name)
        return parsed is not None and bool(ident.key) and parsed[1] == ident.key

    def _is_key_publisher(self, ident: Identity, topic_name: str) -> bool:
        """Only the topic's seller publishes its wrapped keys."""
        parsed = parse_key_topic(topic_name)
        if parsed is None or not ident.key:
            return False
        topic = self.view.topic(parsed[0])
        allowed = topic is not None and topic.seller.lower() == ident.key
        if not allowed:
            self.log.info(
                "PUBLISH %r refused for %s: not the topic's seller", topic_name, ident.address
            )
        return allowed
