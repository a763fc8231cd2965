"""``BlendBroker``: amqtt 0.12.1's Broker with every delivery path gated and metered.

Why a subclass and not only plugins (docs/design/amqtt-integration.md): amqtt sends a PUBLISH
to a subscriber on five paths, and only the live broadcast consults topic plugins, through one
asyncio Task per plugin per delivery. Here every path goes through
:meth:`MeteredHandler.mqtt_publish` (the gate, synchronous) and the charge is committed in
:meth:`MeteredHandler._send_packet` right after the PUBLISH bytes were written, so a subscriber
is charged for exactly what was sent. The subclass also fixes three amqtt behaviours that
would leak data or let a stranger disturb a session:

* CONNECT is authenticated *before* amqtt takes over or deletes a session with that client
  id, and a client id bound to one address cannot be resumed by another; setting a session up
  costs O(its own state) (both in :mod:`blendsm.broker._connect_path`);
* retained messages go out only on a SUBSCRIBE, to the subscribing session, at its granted
  QoS (amqtt sends them to every filter of every client on each CONNECT); no client leaves one
  in the reserved ``blendsm/`` tree (but a seller its wrapped topic keys), and the retained
  message of a name dies when the name becomes a market topic;
* messages queued for an offline session are replayed through the gate with retain=False,
  and pause (stay queued) when the credit runs out, resuming when a voucher arrives;
* persistent sessions (:mod:`blendsm.broker._sessions`) expire, are capped per identity and
  queue within bounds; QoS 1/2 messages in flight are redelivered on reconnect, before
  anything new (:mod:`blendsm.broker._inflight`).

We depend on private names of amqtt 0.12.1; :mod:`blendsm.broker._amqtt_compat` verifies them
at import so an upgrade fails loudly instead of silently bypassing the meter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from amqtt.broker import Action, Broker
from amqtt.contexts import ListenerConfig as AmqttListener
from amqtt.contexts import ListenerType
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from blendsm.broker._access import Identity, Verdict
from blendsm.broker._amqtt_compat import AMQTT_VERSION, check_amqtt_compatibility
from blendsm.broker._config_listeners import ListenerConfig
from blendsm.broker._connect_path import ConnectPath
from blendsm.broker._credit_hold import end_credit_hold
from blendsm.broker._handler import (
    MeteredHandler,
    PublishedPayload,
)
from blendsm.broker._inflight import release_hold
from blendsm.broker._listeners import open_server
from blendsm.broker._service import MarketplaceService
from blendsm.broker._sessions import SessionKeeper
from blendsm.broker._shutdown import close_connections, wait_bounded
from blendsm.broker._topics import TopicClass, classify_topic, is_reserved
from blendsm.errors import ConfigError

if TYPE_CHECKING:
    from blendsm.contracts import ChainEvent

__all__ = ["AMQTT_VERSION", "BlendBroker", "MeteredHandler", "check_amqtt_compatibility"]


class BlendBroker(ConnectPath):
    """The amqtt Broker serving a :class:`MarketplaceService` (see the module docstring).

    Built by ``blendsm broker``; a plain amqtt Broker is turned into one by
    :class:`blendsm.plugins.MarketplacePlugin` (class swap), so both share this code."""

    _blendsm: MarketplaceService | None = None
    _other_topic_plugins: bool | None = None
    _other_auth_plugins: bool | None = None
    _unlisten_market: Callable[[], None] | None = None
    _market_retained: set[str] | None = None
    """Names whose retained message was kept while they were market topics (by a device)."""
    _session_keeper: SessionKeeper | None = None
    _listener_specs: dict[str, ListenerConfig] | None = None
    """Our listeners by amqtt listener name (``start_broker``); None from a plain amqtt
    config, whose own listener settings then apply."""

    def __init__(
        self,
        config: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
        plugin_namespace: str | None = None,
        *,
        service: MarketplaceService | None = None,
        listeners: tuple[ListenerConfig, ...] = (),
    ) -> None:
        self._blendsm = service
        self._listener_specs = {spec.name: spec for spec in listeners}
        if service is not None:
            service.broker = self
        super().__init__(config, loop, plugin_namespace)
        if listeners:
            # Exactly these: amqtt copies its ``default`` listener's settings into any other
            # whose setting equals amqtt's own default (a bind of 0.0.0.0:1883 became another
            # listener's bind, or none, and the listener silently did not open).
            self.listeners_config = {
                spec.name: AmqttListener(
                    type=ListenerType(spec.type), bind=f"{spec.host}:{spec.port}"
                )
                for spec in listeners
            }
        if service is not None:
            self._follow_market(service)

    def attach_service(self, service: MarketplaceService) -> None:
        """Serve ``service`` (used by the plugin after a class swap)."""
        self._blendsm = service
        service.broker = self
        self._follow_market(service)

    def _follow_market(self, service: MarketplaceService) -> None:
        if self._unlisten_market is not None:
            self._unlisten_market()
        self._unlisten_market = service.view.on_change(self._on_chain_event)

    @property
    def service(self) -> MarketplaceService:
        if self._blendsm is None:
            raise ConfigError("BlendBroker has no marketplace service attached")
        return self._blendsm

    @property
    def keeper(self) -> SessionKeeper:
        """Persistent-session bookkeeping (created on first use, like the connection caps)."""
        if self._session_keeper is None:
            service = self.service
            self._session_keeper = SessionKeeper(service.config.sessions, service.stats)
        return self._session_keeper

    def _install(self, handler: BrokerProtocolHandler) -> BrokerProtocolHandler:
        handler.__class__ = MeteredHandler
        handler._blendsm = self.service
        return handler

    def _has_other(self, kind: str) -> bool:
        from blendsm.plugins import MarketplacePlugin

        plugins = getattr(self.plugins_manager, kind, [])
        return any(not isinstance(p, MarketplacePlugin) for p in plugins)

    async def shutdown(self, *, within: float | None = None) -> None:
        """Stop in at most ``within`` seconds (default ``limits.shutdown_seconds``): listeners
        closed, then every connection closed at once, concurrently (output flushed, in-flight
        charges committed or released by the gate); those still open after 60 % of the time
        are aborted; amqtt's own shutdown (subscriptions, broadcast loop, plugins) gets the
        rest. amqtt alone closed sessions one by one, each wait unbounded."""
        if self._blendsm is None:
            await super().shutdown()
            return
        budget = self.service.config.limits.shutdown_seconds if within is None else within
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        for server in self._servers.values():
            if server.instance is not None:
                server.instance.close()  # no new connections while the old ones close
        handlers = [handler for _, handler in self._sessions.values() if handler is not None]
        aborted = await close_connections(handlers, budget * 0.6)
        self.service.stats.connections_aborted += aborted
        await wait_bounded([super().shutdown()], deadline - loop.time(), "broker shutdown")

    # --- listeners ----------------------------------------------------------------------

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: Any,
        address: str | None,
        port: int,
        ssl_context: Any,
    ) -> Any:
        """Open a listener with its own TLS context (client certificates required when
        configured, TLS 1.2 at least) and its TLS/WebSocket handshake bounded by
        ``limits.connect_timeout_seconds`` (see :mod:`._listeners`)."""
        service = self._blendsm
        timeout = service.config.limits.connect_timeout_seconds if service is not None else 10.0
        return await open_server(
            listener_name,
            listener_type,
            address,
            port,
            ssl_context,
            spec=(self._listener_specs or {}).get(listener_name),
            handshake_timeout=timeout,
            stream_connected=self.stream_connected,
            ws_connected=self.ws_connected,
        )

    def create_offline_session(self, client_id: str) -> tuple[BrokerProtocolHandler, Session]:
        handler, session = super().create_offline_session(client_id)
        self.keeper.disconnected(session)  # never connected: it expires like the others
        return self._install(handler), session

    # --- session lifetime: expiry of disconnected sessions, one loop -------------------

    async def _handle_disconnect(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        disconnect_waiter: asyncio.Future[Any],
    ) -> None:
        try:
            await end_credit_hold(self, client_session)  # held for credit: offline queue or dropped
            await super()._handle_disconnect(client_session, handler, disconnect_waiter)
        finally:
            release_hold(client_session)
            self.keeper.disconnected(client_session)

    async def _session_monitor(self) -> None:
        """Replaces amqtt's scan of every session each second: drop the disconnected
        sessions amqtt does not keep, and persistent ones past ``sessions.expiry_seconds``."""
        keeper = self.keeper
        while True:
            for client_id, session, expired in keeper.due():
                pair = self._sessions.get(client_id)
                if pair is None or pair[0] is not session:
                    continue
                if session.transitions.state != "disconnected":
                    continue
                await self._delete_session(client_id)
                if expired:
                    self.service.stats.sessions_expired += 1
                    self.logger.debug("persistent session %r expired", client_id)
            await asyncio.sleep(keeper.tick_seconds)

    async def _delete_session(self, client_id: str) -> None:
        self.keeper.forget(client_id)
        await super()._delete_session(client_id)

    # --- decisions --------------------------------------------------------------------

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        service = self.service
        if action is Action.RECEIVE:
            # A connected session is decided by the delivery gate (entitlement and credit),
            # so RECEIVE only screens messages about to be queued for an offline session.
            allowed = session.transitions.state == "connected" or service.allow_receive(
                session, topic
            )
        elif action is Action.SUBSCRIBE:
            allowed = service.allow_subscribe(session, topic)
        else:
            allowed = service.allow_publish(session, topic)
        if not allowed:
            return False
        if self._other_topic_plugins is None:
            self._other_topic_plugins = self._has_other("_topic_plugins")
        if self._other_topic_plugins:
            return bool(await super()._topic_filtering(session, topic, action))
        return True

    async def _handle_message_delivery(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        wait_deliver: asyncio.Future[Any],
    ) -> bool:
        message = wait_deliver.result()
        topic = getattr(message, "topic", None)
        if topic and classify_topic(topic) is TopicClass.CONTROL:
            self.service.on_control_publish(client_session, handler, topic, message.data)
            return True
        if getattr(getattr(message, "publish_packet", None), "blendsm_rejected", False):
            return True  # not a valid envelope of the publishing device: never broadcast
        if message.data is not None:
            message.data = PublishedPayload.of(message.data, message.qos)
        return bool(await super()._handle_message_delivery(client_session, handler, wait_deliver))

    # --- retained messages: only on SUBSCRIBE, to the subscriber, at its QoS -------------

    async def _handle_subscription(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        subscribe_waiter: asyncio.Future[Any],
    ) -> None:
        ident: Identity | None = getattr(client_session, "blendsm", None)
        if ident is not None:
            ident.subscribing = True
        try:
            await super()._handle_subscription(client_session, handler, subscribe_waiter)
        finally:
            if ident is not None:
                ident.subscribing = False
        if ident is not None and ident.pending_refusals:  # after the SUBACK (0x80) went out
            refusals, ident.pending_refusals = ident.pending_refusals, []
            for refusal in refusals:
                await self.service.send_notice(handler, ident, refusal)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        ident: Identity | None = getattr(session, "blendsm", None)
        if ident is None or not ident.subscribing:
            return  # amqtt also calls this on every CONNECT, for every filter of every client
        topic_filter = subscription[0]
        granted = next(
            (
                q
                for s, q in self._subscriptions.get(topic_filter, ())
                if s.client_id == session.client_id
            ),
            None,
        )
        if granted is None:
            return
        await self._drop_retained_of_new_market_topics()
        await super()._publish_retained_messages_for_subscription((topic_filter, granted), session)

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        """Keep (or clear) the retained message of ``topic_name``; a client's retained
        message or Will in the reserved tree is refused, but a seller's wrapped topic key."""
        if topic_name is None:
            return
        if (
            source_session is not None
            and is_reserved(topic_name)
            and not (
                classify_topic(topic_name) is TopicClass.KEYS
                and self.service.allow_publish(source_session, topic_name)
            )
        ):
            self.logger.warning(
                "retained message of client %r on %r refused: the blendsm/ tree is reserved",
                source_session.client_id,
                topic_name,
            )
            return
        await super().retain_message(source_session, topic_name, data, qos)
        marked = self._marked_retained()
        if topic_name in self._retained_messages and self.service.view.is_market_topic(topic_name):
            marked.add(topic_name)
        else:
            marked.discard(topic_name)

    def _marked_retained(self) -> set[str]:
        if self._market_retained is None:
            self._market_retained = set()
        return self._market_retained

    async def _on_chain_event(self, event: ChainEvent) -> None:
        """A name the chain view now knows as a market topic loses its retained message."""
        if event.contract == "Market" and event.event == "TopicCreated":
            name = str(event.args["name"])
            if self.service.view.is_market_topic(name):
                await self._drop_retained(name, "the name became a market topic")

    async def _drop_retained(self, name: str, why: str) -> None:
        self._marked_retained().discard(name)
        if name in self._retained_messages:
            self.logger.warning("retained message on %r dropped: %s", name, why)
            await Broker.retain_message(self, None, name, b"")

    async def _drop_retained_of_new_market_topics(self) -> None:
        """Drop retained messages kept before their name was known as a market topic (e.g.
        published while the chain view was still syncing, so no live event reported it)."""
        view = self.service.view
        marked = self._marked_retained()
        stale = [t for t in self._retained_messages if t not in marked and view.is_market_topic(t)]
        for name in stale:
            await self._drop_retained(name, "kept before the name was known as a market topic")

    # --- offline queue: bounded on entry, gated and resumable on replay -------------------

    async def _retain_broadcast_message(
        self, broadcast: dict[str, Any], qos: int, target_session: Session
    ) -> None:
        data = broadcast.get("data")
        if type(data) is PublishedPayload and data.publish_qos < qos:
            qos = data.publish_qos  # queued at the QoS it will be delivered with
            if not qos:
                return  # a QoS 0 message is not stored for an offline session
        topic = broadcast.get("topic") or ""
        if self.keeper.admit(self.service, target_session, topic, data):
            await super()._retain_broadcast_message(broadcast, qos, target_session)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        handler = self._get_handler(session)
        if not isinstance(handler, MeteredHandler) or getattr(session, "blendsm_replaying", False):
            release_hold(session)
            return
        session.blendsm_replaying = True
        try:
            await self._replay(session, handler)
        finally:
            session.blendsm_replaying = False
            release_hold(session)

    async def _replay(self, session: Session, handler: MeteredHandler) -> None:
        queue = session.retained_messages
        while not queue.empty():
            if session.transitions.state != "connected":
                return
            if handler.window_full():
                session.blendsm_window_paused = True  # the next acknowledgement resumes it
                return
            message = queue.get_nowait()
            SessionKeeper.taken(session, message.data)
            outcome = await handler.publish_gated(message.topic, message.data, message.qos, False)
            if outcome is Verdict.NO_CREDIT:
                # Keep it first in line; a voucher on this account resumes the replay.
                queue._queue.appendleft(message)
                SessionKeeper.taken(session, message.data, back=True)
                ident: Identity | None = getattr(session, "blendsm", None)
                account = ident.owing if ident is not None else None
                if account is not None and session not in account.waiters:
                    account.waiters.append(session)
                return

    def resume_offline_replay(self, session: object) -> None:
        """A voucher arrived for an account this session's replay waits on."""
        if isinstance(session, Session) and session.transitions.state == "connected":
            asyncio.get_running_loop().create_task(self._publish_session_retained_messages(session))

    # --- revocation ------------------------------------------------------------------

    async def disconnect_matching(self, match: Callable[[Identity], bool], reason: str) -> int:
        """Close and forget every session whose identity matches (revocation)."""
        count = 0
        for client_id, (session, handler) in list(self._sessions.items()):
            ident: Identity | None = getattr(session, "blendsm", None)
            if ident is None or not match(ident):
                continue
            count += 1
            session.will_flag = False  # a revoked client's Will must not go out
            self.logger.warning(
                "disconnecting %s (client %r): %s", ident.address, client_id, reason
            )
            writer = getattr(handler, "writer", None)
            if writer is not None:
                try:
                    await writer.close()
                except Exception as exc:
                    self.logger.debug("close of %r failed: %s", client_id, exc)
            await self._delete_session(client_id)
        return count
