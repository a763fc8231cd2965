"""The marketplace service: identity, access, metering and vouchers for one broker.

Why one object: the auth decision, the SUBSCRIBE/PUBLISH/RECEIVE decisions, the per-delivery
credit gate and the voucher intake all read the same in-memory state (the chain view and the
meter), and the broker subclass and the amqtt plugin both need it. Every decision here is a
synchronous dict lookup; only voucher storage and notices are awaited, off the delivery path.

Fail closed: an unknown session, an unhealthy chain view, a missing channel or any exception
answers "no", and the log says why. Public (non-market) topics follow ``public_topics`` and keep
working while the chain is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from eth_account.signers.local import LocalAccount
from web3 import AsyncWeb3
from web3.middleware import Web3Middleware
from web3.types import RPCEndpoint, RPCResponse

from blendsm.broker._anchor_records import AnchorRecord
from blendsm.broker._anchors import AnchorConfig, Anchorer
from blendsm.broker._chain_view import ChainView
from blendsm.broker._config import BrokerConfig
from blendsm.broker._leaf_store import AsyncLeafStore
from blendsm.broker._meter import Account, Charge, Meter, Reservation
from blendsm.broker._store import AsyncVoucherStore
from blendsm.contracts._bindings import Marketplace
from blendsm.contracts._deploy import Deployment
from blendsm.contracts._events import ChainEvent
from blendsm.device_sdk._connect_token import ConnectTokenVerifier
from blendsm.device_sdk._control import (
    ANCHORS_TOPIC,
    CONTROL_ROOT,
    KEYS_ROOT,
    NOTICE,
    PROOF,
    VOUCHER,
    AnyNotice,
    Notice,
    PaymentRequest,
    Quote,
    Receipt,
    Refusal,
    RefusalCode,
    control_topic,
    decode_proof_request,
    decode_voucher,
    encode_anchor_notice,
    encode_notice,
    is_control_topic,
    parse_control_topic,
    parse_key_topic,
)
from blendsm.device_sdk._envelope import (
    Envelope,
    MessageDomain,
    decode_envelope,
    verify_envelope_leaf,
)
from blendsm.device_sdk._voucher import ChannelState, VoucherDomain, VoucherVerifier
from blendsm.errors import (
    ConnectTokenError,
    EnvelopeError,
    VoucherChannelError,
    VoucherNotNewerError,
    VoucherSignatureError,
    WireError,
)

if TYPE_CHECKING:
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
    from amqtt.session import Session
    from web3.types import AsyncMakeRequestFn

    from blendsm.broker._settlement import Settler

__all__ = [
    "CHAIN_ERROR_SOURCES",
    "ChainErrors",
    "Identity",
    "MarketplaceService",
    "ServiceStats",
    "Verdict",
]

_log = logging.getLogger("blendsm.broker")

MAX_OFFLINE_PAID: Final = 1000
"""Paid messages queued per disconnected persistent session; newer ones are dropped (logged)."""


CHAIN_ERROR_SOURCES: Final = ("chain_view", "settlement", "gas_balance", "anchors")
"""Where a broker's failed chain requests come from (the ``source`` label of the metric):
event polling of the chain view, claims and the reads around them, the operator's balance
check, anchor transactions and their receipts."""


class ChainErrors:
    """Failed JSON-RPC requests of one broker's background work, by source.

    Why at the request level: every chain interaction of the chain view, the settler and the
    anchorer goes through the service's ``AsyncWeb3``, and each of them catches and logs its
    own failures in its own way. A web3 middleware sees them all, and a context variable set
    on each background task says whose request it was, so requests made by anything else
    (the CLI, tests sharing the connection, another broker in the same process) are not
    counted here."""

    __slots__ = ("by_source",)

    def __init__(self) -> None:
        self.by_source: dict[str, int] = dict.fromkeys(CHAIN_ERROR_SOURCES, 0)

    def count(self, source: str, method: str) -> None:
        if source == "settlement" and method == "eth_getBalance":
            source = "gas_balance"
        self.by_source[source] = self.by_source.get(source, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.by_source.values())


_CHAIN_SOURCE: contextvars.ContextVar[tuple[ChainErrors, str] | None] = contextvars.ContextVar(
    "blendsm_chain_source", default=None
)
_COUNTER_NAME: Final = "blendsm_chain_errors"


class _ChainErrorCounter(Web3Middleware):
    """Counts a request that raised (node unreachable, timeout) or came back with a JSON-RPC
    error (e.g. a revert) into the :class:`ChainErrors` of the task that made it."""

    async def async_wrap_make_request(self, make_request: AsyncMakeRequestFn) -> AsyncMakeRequestFn:
        async def middleware(method: RPCEndpoint, params: Any) -> RPCResponse:
            tag = _CHAIN_SOURCE.get()
            if tag is None:
                return await make_request(method, params)
            try:
                response = await make_request(method, params)
            except Exception:
                tag[0].count(tag[1], str(method))
                raise
            if isinstance(response, dict) and response.get("error") is not None:
                tag[0].count(tag[1], str(method))
            return response

        return middleware


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


@dataclass(slots=True)
class ServiceStats:
    """Counters for logs, tests, the demo and metrics."""

    connects_accepted: int = 0
    connects_refused: int = 0
    deliveries_denied: int = 0
    vouchers_accepted: int = 0
    vouchers_refused: int = 0
    payment_requests: int = 0
    quotes: int = 0
    disconnects_revoked: int = 0
    offline_dropped: int = 0
    envelopes_refused: int = 0
    proofs_served: int = 0
    anchor_notices: int = 0
    public_deliveries: int = 0
    """Deliveries on public (non-market) topics admitted by the gate: free, never metered."""
    free_market_deliveries: int = 0
    """Deliveries on market topics priced 0 admitted by the gate (entitled, not charged)."""


class MarketplaceService:
    """Chain-backed identity, access control, metering and voucher intake for one broker."""

    def __init__(
        self,
        *,
        config: BrokerConfig,
        w3: AsyncWeb3[Any],
        deployment: Deployment,
        operator: LocalAccount,
        view: ChainView | None = None,
        logger: logging.Logger | None = None,
        token_validity: int = 60,
        settler_options: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.w3 = w3
        self.deployment = deployment
        self.operator = operator
        self.log = logger or _log
        self.public_topics = config.public_topics
        self.view = view or ChainView(
            w3,
            deployment,
            confirmations=config.chain.confirmations,
            poll_interval=config.chain.poll_interval,
            max_staleness=config.chain.staleness_limit,
            logger=self.log.getChild("chain"),
        )
        self.meter = Meter(operator.address, config.payments.credit_messages)
        self.tokens = ConnectTokenVerifier(
            deployment.chain_id, operator.address, validity=token_validity
        )
        self.vouchers = VoucherVerifier(
            VoucherDomain(deployment.chain_id, deployment.address("PaymentChannels"))
        )
        self.messages = MessageDomain(deployment.chain_id, deployment.address("Registry"))
        self.marketplace = Marketplace(
            w3, deployment, operator, confirmations=config.chain.confirmations
        )
        self.stats = ServiceStats()
        self.chain_errors = ChainErrors()
        self.store: AsyncVoucherStore | None = None
        self.settler: Settler | None = None
        self.anchorer: Anchorer | None = None
        self._anchor_task: asyncio.Task[None] | None = None
        self.broker: Any = None  # the BlendBroker serving this service
        self._tasks: set[asyncio.Task[Any]] = set()
        self._view_task: asyncio.Task[None] | None = None
        self._settler_task: asyncio.Task[None] | None = None
        self._unlisten: Any = None
        self._settler_options = settler_options or {}

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self, *, sync_timeout: float = 30.0) -> None:
        """Open the voucher store, follow the chain and start settling.

        A chain that cannot be reached at start does not stop the broker: the view stays
        unhealthy (market decisions answer no) and keeps retrying in the background."""
        from blendsm.broker._settlement import Settler

        data_dir = self.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = await AsyncVoucherStore.open(data_dir / "vouchers.sqlite3")
        paid = []
        for channel_id in await self.store.channels():
            latest = await self.store.latest(channel_id)
            if latest is not None:
                paid.append((channel_id, latest.cumulative_amount))
        self.meter.load_paid(paid)
        self._unlisten = self.view.on_change(self._on_chain_event)
        self._count_chain_errors()
        self._view_task = asyncio.create_task(
            self.view.run(), name="blendsm-chain-view", context=self._chain_source("chain_view")
        )
        deadline = time.monotonic() + sync_timeout
        while not self.view.synced and time.monotonic() < deadline:
            if self._view_task.done():
                break
            await asyncio.sleep(0.02)
        if not self.view.synced:
            self.log.warning(
                "chain view not synced after %.0fs; market decisions answer no until it is",
                sync_timeout,
            )
        self.settler = Settler(
            self.store,
            self.marketplace,
            self.view,
            self.config.payments.settlement,
            logger=self.log.getChild("settlement"),
            confirmations=self.config.chain.confirmations,
            **self._settler_options,
        )
        self._settler_task = asyncio.create_task(
            self.settler.run(), name="blendsm-settlement", context=self._chain_source("settlement")
        )
        leaves = await AsyncLeafStore.open(
            data_dir / "leaves.sqlite3", self.log.getChild("anchors")
        )
        self.anchorer = Anchorer(
            leaves,
            self.marketplace,
            AnchorConfig.of(self.config.anchoring, self.config.chain.confirmations),
            logger=self.log.getChild("anchors"),
            on_anchored=self._on_anchored,
        )
        self._anchor_task = asyncio.create_task(
            self.anchorer.run(), name="blendsm-anchors", context=self._chain_source("anchors")
        )
        self.log.info(
            "marketplace service started: operator %s, chain id %d, public topics %s",
            self.operator.address,
            self.deployment.chain_id,
            "on" if self.public_topics else "off",
        )

    async def stop(self) -> None:
        """Stop settling and following; wait for in-flight voucher writes; close the store."""
        if self.settler is not None:
            self.settler.stop()
        if self.anchorer is not None:
            self.anchorer.stop()
        self.view.stop()
        for task in (self._settler_task, self._anchor_task, self._view_task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, timeout=10)
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._unlisten is not None:
            self._unlisten()
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self.anchorer is not None:
            await self.anchorer.store.close()
            self.anchorer = None

    def _count_chain_errors(self) -> None:
        """Install the chain error counter on the connection (once per ``AsyncWeb3``)."""
        onion: Any = self.w3.middleware_onion
        if _COUNTER_NAME not in onion:
            onion.add(_ChainErrorCounter, name=_COUNTER_NAME)

    def _chain_source(self, source: str) -> contextvars.Context:
        """A context whose chain requests count as this broker's ``source``."""
        context = contextvars.copy_context()
        context.run(_CHAIN_SOURCE.set, (self.chain_errors, source))
        return context

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
                "CONNECT refused for client %r: Will topic %r is a market or control topic, or"
                " public topics are off",
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
        if not topic or is_control_topic(topic) or self.view.is_market_topic(topic):
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
        if topic_filter == ANCHORS_TOPIC:
            return True  # anchor notices are public: anyone may check them on chain
        if topic_filter.startswith(KEYS_ROOT):
            parsed = parse_key_topic(topic_filter)
            return parsed is not None and bool(ident.key) and parsed[1] == ident.key
        if topic_filter.startswith(CONTROL_ROOT):
            own = f"{CONTROL_ROOT}/{ident.key}/"
            allowed = bool(ident.key) and topic_filter.startswith(own)
            if not allowed:
                self.log.info(
                    "SUBSCRIBE %r refused for %s: not its control topic",
                    topic_filter,
                    ident.address,
                )
            return allowed
        if "+" in topic_filter or "#" in topic_filter:
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
        if ident is None or is_control_topic(topic_name) or topic_name == ANCHORS_TOPIC:
            return False
        if topic_name.startswith(KEYS_ROOT):
            return self._is_key_publisher(ident, topic_name)
        view = self.view
        topic = view.topic_for_name(topic_name)
        if topic is None:
            if view.is_market_topic(topic_name):
                self.log.info("PUBLISH %r refused: chain view unhealthy", topic_name)
                return False
            return self.public_topics
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
        if ident is None or is_control_topic(topic_name):
            return False
        if topic_name == ANCHORS_TOPIC:
            return True
        if topic_name.startswith(KEYS_ROOT):
            return self._is_key_owner(ident, topic_name)
        view = self.view
        topic = view.topic_for_name(topic_name)
        if topic is None:
            return self.public_topics and not view.is_market_topic(topic_name)
        return bool(ident.key) and view.can_subscribe(ident.key, topic.topic_id)

    # --- the delivery gate (hot path) ----------------------------------------------------

    def admit(self, session: Session, topic_name: str) -> Charge | Verdict:
        """Decide one delivery: a :class:`Charge` to commit after the write, or a Verdict."""
        ident = getattr(session, "blendsm", None)
        if ident is None:
            return Verdict.DENY
        view = self.view
        topic = view.topic_for_name(topic_name)
        if topic is None:
            if topic_name == ANCHORS_TOPIC:
                return Verdict.FREE
            if topic_name.startswith(KEYS_ROOT):
                return Verdict.FREE if self._is_key_owner(ident, topic_name) else Verdict.DENY
            if is_control_topic(topic_name):
                return Verdict.DENY
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
        if not topic.price:
            self.stats.free_market_deliveries += 1
            return Verdict.FREE
        account = self.meter.select(key, topic, view)
        if account is None:
            self.stats.deliveries_denied += 1
            return Verdict.DENY
        result = self.meter.reserve(account, topic.price, topic_name)
        if type(result) is Charge:
            return result
        self.stats.deliveries_denied += 1
        if result == Reservation.NO_CREDIT:
            ident.owing = account
            ident.owing_topic = topic_name
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

    def quote_for(self, session: Session, charge: Charge) -> Quote | None:
        """The Quote to send before this delivery, if the session has not seen this price
        and channel for the topic yet."""
        ident: Identity = session.blendsm
        account = charge.account
        current = (account.channel_id, charge.price)
        if ident.quoted.get(charge.topic) == current:
            return None
        ident.quoted[charge.topic] = current
        self.stats.quotes += 1
        return Quote(
            topic=charge.topic,
            seller=account.seller,
            channel_id=account.channel_id,
            price=charge.price,
            credit=self.meter.credit_of(charge.price),
            charged=account.charged,
            paid=account.paid,
        )

    def payment_request_for(self, session: Session) -> PaymentRequest | None:
        """The payment request owed after a NO_CREDIT verdict (once until paid)."""
        ident: Identity | None = getattr(session, "blendsm", None)
        if ident is None or ident.owing is None:
            return None
        account, topic = ident.owing, ident.owing_topic
        if account.requested:
            return None
        account.requested = True
        self.stats.payment_requests += 1
        price = self.view.topic_for_name(topic)
        credit = self.meter.credit_of(price.price) if price is not None else 0
        return PaymentRequest(
            channel_id=account.channel_id,
            charged=account.charged,
            paid=account.paid,
            credit=credit,
            topic=topic,
        )

    # --- control topics: vouchers in, notices out ---------------------------------------

    def on_control_publish(
        self, session: Session, handler: BrokerProtocolHandler, topic: str, data: bytes | bytearray
    ) -> None:
        """A client PUBLISHed under the control root: take vouchers, refuse the rest.
        Never broadcast; processing runs in its own task, off the client's read loop."""
        ident = self.identity(session)
        parsed = parse_control_topic(topic)
        if ident is not None and ident.key and parsed == (ident.key, PROOF):
            self._spawn(self._answer_proof(handler, ident, bytes(data)), "blendsm-proof")
            return
        if ident is None or not ident.key or parsed is None or parsed != (ident.key, VOUCHER):
            self.stats.vouchers_refused += 1
            who = ident.address if ident is not None else None
            self.log.warning(
                "control PUBLISH to %r refused for %s: not its voucher topic", topic, who
            )
            if ident is not None and ident.key:
                self._spawn(
                    self.send_notice(
                        handler, ident, Refusal("wrong_topic", f"cannot publish to {topic[:200]!r}")
                    ),
                    "blendsm-notice",
                )
            return
        self._spawn(self._take_voucher(handler, ident, bytes(data)), "blendsm-voucher")

    async def _take_voucher(
        self, handler: BrokerProtocolHandler, ident: Identity, payload: bytes
    ) -> None:
        try:
            notice = await self._accept_voucher(ident, payload)
        except Exception as exc:  # never let a voucher crash the broker
            self.log.exception("voucher from %s: internal error", ident.address)
            notice = Refusal("store_unavailable", f"internal error: {type(exc).__name__}")
        if isinstance(notice, Refusal):
            self.stats.vouchers_refused += 1
            self.log.info(
                "voucher from %s refused: %s: %s", ident.address, notice.code, notice.detail
            )
        await self.send_notice(handler, ident, notice)

    async def _accept_voucher(self, ident: Identity, payload: bytes) -> Notice:
        def refuse(code: RefusalCode, detail: str) -> Refusal:
            return Refusal(code, detail, voucher.channel_id, voucher.cumulative_amount)

        try:
            voucher = decode_voucher(payload)
        except WireError as exc:
            return Refusal("malformed", str(exc)[:300])
        view = self.view
        info = view.channel(voucher.channel_id)
        if info is None:
            reason = view.unhealthy_reason
            return refuse(
                "unknown_channel",
                f"channel unknown to this broker{'' if reason is None else f' (chain view: {reason})'}",
            )
        if info.operator is None or info.operator.lower() != self.meter.operator:
            return refuse(
                "not_metered_here", f"channel names operator {info.operator}, not this broker"
            )
        if info.payer.lower() != ident.key:
            return refuse("not_payer", f"channel is paid by {info.payer}, not {ident.address}")
        try:
            self.vouchers.verify(
                voucher,
                ChannelState(info.payer, info.deposit, info.claimed, info.closes_at, info.settled),
                int(time.time()),
            )
        except VoucherSignatureError as exc:
            return refuse("bad_signature", str(exc))
        except VoucherNotNewerError as exc:
            return refuse("not_newer", str(exc))
        except VoucherChannelError as exc:
            return refuse("channel_closing", str(exc))
        if voucher.cumulative_amount > info.deposit:
            return refuse(
                "over_deposit",
                f"amount {voucher.cumulative_amount} exceeds the deposit {info.deposit}",
            )
        if voucher.cumulative_amount <= self.meter.paid_of(voucher.channel_id):
            return refuse(
                "not_newer",
                f"amount {voucher.cumulative_amount} is not above the accepted"
                f" {self.meter.paid_of(voucher.channel_id)}",
            )
        store = self.store
        if store is None:
            return refuse("store_unavailable", "broker is shutting down")
        try:
            stored = await store.accept(voucher)
        except Exception as exc:
            self.log.error("voucher store failed, voucher not counted: %s", exc)
            return refuse("store_unavailable", "voucher store unavailable, try again")
        if not stored:
            return refuse("not_newer", "a voucher at least as high is already stored")
        # Durable: now it counts.
        account = self.meter.paid_up_to(voucher.channel_id, voucher.cumulative_amount)
        self.stats.vouchers_accepted += 1
        if self.settler is not None:
            self.settler.notify_voucher(voucher.channel_id, voucher.cumulative_amount)
        if account is not None and account.waiters:
            waiters, account.waiters = account.waiters, []
            if self.broker is not None:
                for session in waiters:
                    self.broker.resume_offline_replay(session)
        return Receipt(voucher.channel_id, voucher.cumulative_amount)

    async def _answer_proof(
        self, handler: BrokerProtocolHandler, ident: Identity, payload: bytes
    ) -> None:
        try:
            request = decode_proof_request(payload)
        except WireError as exc:
            await self.send_notice(handler, ident, Refusal("malformed", str(exc)[:300]))
            return
        anchorer = self.anchorer
        if anchorer is None:
            answer: AnyNotice = Refusal(
                "proof_unavailable", "broker is shutting down", request_id=request.request_id
            )
        else:
            try:
                answer = await anchorer.answer(request)
            except Exception as exc:
                self.log.exception("proof request from %s failed", ident.address)
                answer = Refusal(
                    "proof_unavailable",
                    f"internal error: {type(exc).__name__}",
                    request_id=request.request_id,
                )
        if not isinstance(answer, Refusal):
            self.stats.proofs_served += 1
        await self.send_notice(handler, ident, answer)

    # --- market messages: signed envelopes, leaves, anchors ------------------------------

    def inspect_publish(
        self, session: Session, topic: str, data: bytes | bytearray
    ) -> tuple[Envelope, bytes] | Literal[False] | None:
        """For a PUBLISH on a market topic by an allowed device: the verified envelope and its
        leaf; False if it is not a valid envelope signed by that device (the message is then
        dropped); None when it is not ours to check (not a market topic, or not allowed:
        amqtt's PUBLISH decision refuses it later)."""
        ident = self.identity(session)
        view = self.view
        topic_info = view.topic_for_name(topic)
        if ident is None or not ident.key or topic_info is None:
            return None
        if not view.can_publish(ident.key, topic_info.topic_id):
            return None
        try:
            envelope = decode_envelope(data)
            signer, leaf = verify_envelope_leaf(self.messages, topic, envelope)
        except EnvelopeError as exc:
            self.stats.envelopes_refused += 1
            self.log.warning("PUBLISH on %r from %s dropped: %s", topic, ident.address, exc)
            return False
        if topic_info.encrypted and not envelope.encrypted:
            self.stats.envelopes_refused += 1
            self.log.warning(
                "PUBLISH on %r from %s dropped: the topic is marked encrypted on chain and"
                " the payload is not",
                topic,
                ident.address,
            )
            return False
        if signer.lower() != ident.key:
            self.stats.envelopes_refused += 1
            self.log.warning(
                "PUBLISH on %r from %s dropped: signed by %s, not by the publishing device",
                topic,
                ident.address,
                signer,
            )
            return False
        return envelope, leaf

    def _on_anchored(self, record: AnchorRecord) -> None:
        broker = self.broker
        if broker is None:
            return
        self.stats.anchor_notices += 1
        self._spawn(
            broker.internal_message_broadcast(
                ANCHORS_TOPIC, encode_anchor_notice(record.notice()), 0
            ),
            "blendsm-anchor-notice",
        )

    async def send_notice(
        self, handler: BrokerProtocolHandler, ident: Identity, notice: AnyNotice
    ) -> None:
        """Send a notice straight to this session (never broadcast), QoS 0."""
        from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

        if not ident.key or handler.session is None or handler.writer is None:
            return
        try:
            await BrokerProtocolHandler.mqtt_publish(
                handler, control_topic(ident.key, NOTICE), encode_notice(notice), 0, False
            )
        except Exception as exc:
            self.log.info("notice to %s not sent: %s", ident.address, exc)

    # --- chain events --------------------------------------------------------------------

    async def _on_chain_event(self, event: ChainEvent) -> None:
        if event.contract == "PaymentChannels":
            info = self.view.channel_record(bytes(event.args["channelId"]))
            if info is not None:
                self.meter.channel_changed(info)
            return
        if event.contract != "Registry":
            return
        name = event.event
        if name in ("Revoked", "Left", "Rejected"):
            account = str(event.args["account"]).lower()
            await self._disconnect(
                lambda i: i.key == account or i.seller_key == account,
                f"{name.lower()} in the Registry",
            )
        elif name == "DeviceRemoved":
            device = str(event.args["device"]).lower()
            await self._disconnect(lambda i: i.key == device, "device removed from the Registry")

    async def _disconnect(self, match: Any, reason: str) -> None:
        if self.broker is None:
            return
        count = await self.broker.disconnect_matching(match, reason)
        self.stats.disconnects_revoked += count
