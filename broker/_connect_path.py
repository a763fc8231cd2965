"""``ConnectPath``: how a connection becomes a session, in O(this client's own state).

The base of ``BlendBroker`` between :class:`DeliveryPath` and it. It overrides amqtt 0.12.1's
CONNECT path (``_client_connected``, ``_initialize_client_session``, ``_authenticate``,
``_handle_client_session``, ``_client_message_loop``) for two reasons:

* safety: every connection passes the connection caps and rate first
  (:mod:`blendsm.broker._admission`), and the CONNECT is authenticated *before* amqtt takes
  over or deletes a session with that client id; a client id bound to one identity cannot be
  resumed by another;
* scale: amqtt looked at every subscription filter of every client on each CONNECT (to send
  retained messages, which BlendBroker sends only on SUBSCRIBE, to the subscribing session)
  and formatted the whole subscription table after each SUBSCRIBE (``repr`` evaluated whatever
  the log level), so connecting N clients cost O(N^2): 5,000 clients took over a minute. And
  each session carried a ``transitions.Machine`` (about 2 ms and 10 KB each): sessions made
  here are :class:`BlendSession`.

The amqtt code paths are kept step for step otherwise (take-over of a connected session,
CONNACK, the ``CLIENT_CONNECTED`` event, the offline-queue replay, the per-session message
loop); the overridden signatures are checked at import (:mod:`._amqtt_compat`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Final

from amqtt.broker import BrokerEvents, Server
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.events import MQTTEvents
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    IDENTIFIER_REJECTED,
    NOT_AUTHORIZED,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnackPacket,
)
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from transitions import MachineError

from blendsm.broker._access import Identity
from blendsm.broker._admission import Admission
from blendsm.broker._conn_reader import PacketStream, read_connect_packet
from blendsm.broker._delivery import DeliveryPath
from blendsm.broker._handler import KEEPALIVE_GRACE, abort_connection
from blendsm.broker._inflight import release_hold
from blendsm.broker._listeners import certificate_subject
from blendsm.broker._log_limit import LogLimiter
from blendsm.broker._session_state import BlendSession
from blendsm.broker._sessions import SessionKeeper, is_persistent
from blendsm.broker._small_queue import ArrivalQueue, SmallQueue

if TYPE_CHECKING:
    from amqtt.plugins.manager import PluginManager

__all__ = ["ConnectPath", "read_connect"]

_log = logging.getLogger("blendsm.broker")
_CONNECT_TIMEOUT_LOG: Final = LogLimiter(_log)
"""Idle sockets are client-controlled: one log line a minute for them, with a count."""
_CERTIFICATE_LOG: Final = LogLimiter(_log)
"""CONNECTs over a verified client certificate: one log line a minute, with a count."""
_PRE_CONNECT_LOG: Final = LogLimiter(_log, logging.WARNING)
"""Connections that end, or send something else, before a valid CONNECT (port probes, health
checks, scanners): one line a minute, with a count."""
_CLIENT_ID_LOG: Final = LogLimiter(_log, logging.WARNING)
"""CONNECTs refused for a client id another identity holds: one line a minute."""
_TAKEOVER_LOG: Final = LogLimiter(_log)
"""Session take-overs and too-quick reconnects: one line a minute."""


class _DropAmqttSessionFailure(logging.Filter):
    """amqtt logs one more WARNING per connection that failed before its session existed
    ("Failed to initialize client session: ..."), unbounded; the broker's own line for it is
    rate-limited (:data:`_PRE_CONNECT_LOG`) and says the same."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to initialize client session")


logging.getLogger("amqtt.broker").addFilter(_DropAmqttSessionFailure())
_MQTT_3_1_1: Final = 4
"""The protocol level amqtt 0.12.1 speaks."""
_AMQTT_DELIVER: Final = BrokerProtocolHandler.mqtt_deliver_next_message
"""amqtt's own: a handler class that overrides it keeps its coroutine (and its Task)."""


async def read_connect(
    reader: Any, writer: Any, plugins_manager: PluginManager[Any]
) -> tuple[BrokerProtocolHandler, Session]:
    """amqtt's ``BrokerProtocolHandler.init_from_connect``, check for check, making a
    :class:`BlendSession` instead of a Session with its own state Machine, and a handler
    whose pending SUBSCRIBE/UNSUBSCRIBE queues are :class:`SmallQueue`s and that holds no
    Event until it is stopped. A TCP/TLS connection's CONNECT is cut from its
    :class:`PacketStream` (whatever follows it stays buffered for the handler)."""
    if type(reader) is PacketStream:
        connect = await read_connect_packet(reader)
    else:
        connect = await ConnectPacket.from_stream(reader)
    await plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=connect)
    if connect.variable_header is None:
        raise MQTTError("CONNECT packet: variable header not initialized.")
    if connect.payload is None:
        raise MQTTError("CONNECT packet: payload not initialized.")
    if connect.payload.client_id is None:
        raise MQTTError("[[MQTT-3.1.3-3]] : Client identifier must be present")
    if connect.variable_header.will_flag and (
        connect.payload.will_topic is None or connect.payload.will_message is None
    ):
        raise MQTTError("Will flag set, but will topic/message not present in payload")
    if connect.variable_header.reserved_flag:
        raise MQTTError("[MQTT-3.1.2-3] CONNECT reserved flag must be set to 0")
    if connect.proto_name != "MQTT":
        raise MQTTError(f'[MQTT-3.1.2-1] Incorrect protocol name: "{connect.proto_name}"')
    remote_info = writer.get_peer_info()
    remote_address: str | None = None
    remote_port: int | None = None
    if remote_info is not None:
        remote_address, remote_port = remote_info
        where = f"{remote_address}:{remote_port}"
        connack, error = None, None
        if connect.proto_level != _MQTT_3_1_1:
            error = f"Invalid protocol from {where}: {connect.proto_level}"
            connack = ConnackPacket.build(0, UNACCEPTABLE_PROTOCOL_VERSION)
        elif not connect.username_flag and connect.password_flag:
            connack = ConnackPacket.build(0, BAD_USERNAME_PASSWORD)  # [MQTT-3.1.2-22]
        elif connect.username_flag and connect.username is None:
            error = f"Invalid username from {where}"
            connack = ConnackPacket.build(0, BAD_USERNAME_PASSWORD)
        elif connect.password_flag and connect.password is None:
            error = f"Invalid password from {where}"
            connack = ConnackPacket.build(0, BAD_USERNAME_PASSWORD)
        elif connect.clean_session_flag is False and connect.payload.client_id_is_random:
            error = f"[MQTT-3.1.3-8] [MQTT-3.1.3-9] {where}: No client Id provided (cleansession=0)"
            connack = ConnackPacket.build(0, IDENTIFIER_REJECTED)
        if connack is not None:
            await plugins_manager.fire_event(MQTTEvents.PACKET_SENT, packet=connack)
            await connack.to_stream(writer)
            await writer.close()
            raise MQTTError(error) from None
    session = BlendSession()
    session.client_id = connect.client_id
    session.clean_session = connect.clean_session_flag
    session.will_flag = connect.will_flag
    session.will_retain = connect.will_retain_flag
    session.will_qos = connect.will_qos
    session.will_topic = connect.will_topic
    session.will_message = connect.will_message
    session.username = connect.username
    session.password = connect.password
    session.remote_address = remote_address
    session.remote_port = remote_port
    session.ssl_object = writer.get_ssl_info()
    session.keep_alive = max(connect.keep_alive, 0)
    handler = BrokerProtocolHandler(plugins_manager)
    handler._pending_subscriptions = ArrivalQueue()
    handler._pending_unsubscriptions = ArrivalQueue()
    handler._reader_stopped = None  # made by start() or stop(): no Event per idle session
    return handler, session


class ConnectPath(DeliveryPath):
    """amqtt's CONNECT path, authenticated first and O(own state) (see the module doc)."""

    _admission: Admission | None = None
    """Connection caps and rates (created on the first connection, so a broker made by the
    plugin's class swap has one too)."""

    if TYPE_CHECKING:  # provided by BlendBroker, the one subclass

        @property
        def keeper(self) -> SessionKeeper: ...

        def _install(self, handler: BrokerProtocolHandler) -> BrokerProtocolHandler: ...

    async def _client_connected(self, listener_name: str, reader: Any, writer: Any) -> None:
        """Every new connection, on every listener: admitted within the connect rate of its
        address and the connection caps, or closed at once, before it costs more than its
        socket; its packets are read within ``limits.max_packet_bytes``
        (:mod:`blendsm.broker._admission`)."""
        admission = self._admission
        if admission is None:
            admission = Admission(self.service.config.limits, self.service.stats)
            self._admission = admission
        peer = writer.get_peer_info() if writer is not None else None
        address = str(peer[0]) if peer else "unknown"
        if not admission.enter(address, writer):
            return
        try:
            limited = admission.reader(reader, writer, address)
            await super()._client_connected(listener_name, limited, writer)
        finally:
            admission.leave(address)

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        timeout = self.service.config.limits.connect_timeout_seconds
        try:
            handler, session = await asyncio.wait_for(
                read_connect(reader, writer, self.plugins_manager),
                timeout,
            )
        except TimeoutError as exc:
            self.service.stats.connect_timeouts += 1
            _CONNECT_TIMEOUT_LOG.note(
                "%s:%s sent no complete CONNECT within %.1fs: closed",
                remote_address,
                remote_port,
                timeout,
            )
            abort_connection(writer)
            raise AMQTTError("CONNECT timeout") from exc
        except AMQTTError as exc:
            _PRE_CONNECT_LOG.note(
                "%s:%s: first packet is not a CONNECT: %s", remote_address, remote_port, exc
            )
            abort_connection(writer)  # MQTT-3.1.0-1: the server closes the connection
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            _PRE_CONNECT_LOG.note("%s:%s: invalid CONNECT: %s", remote_address, remote_port, exc)
            await writer.close()
            raise MQTTError(exc) from exc
        except NoDataError as exc:
            _PRE_CONNECT_LOG.note("%s:%s: no data: %s", remote_address, remote_port, exc)
            # Ended (or refused) before a CONNECT: our side is closed too. amqtt left it to
            # the garbage collector, and its descriptor with it (a port probe, a health check).
            abort_connection(writer)
            raise AMQTTError(exc) from exc
        # Our decision first: a refused CONNECT must not take over or delete anything.
        accepted = self.service.authenticate(session)
        if accepted and self._has_other("_auth_plugins"):
            accepted = await super()._authenticate(session, None)
        return_code = NOT_AUTHORIZED
        if accepted and session.client_id in self._sessions and not session.clean_session:
            existing = self._sessions[session.client_id][0]
            mine: Identity | None = getattr(existing, "blendsm", None)
            new: Identity = session.blendsm
            if mine is not None and mine.key != new.key:
                _CLIENT_ID_LOG.note(
                    "CONNECT refused: client id %r belongs to another identity", session.client_id
                )
                accepted = False
                return_code = IDENTIFIER_REJECTED
        if (
            accepted
            and is_persistent(session)
            and session.client_id not in self._sessions
            and not self.keeper.admit_new(
                session.client_id, session.blendsm.key, self._sessions.__contains__
            )
        ):
            accepted, return_code = False, IDENTIFIER_REJECTED  # sessions.max_per_identity
        if not accepted:
            await self._refuse(writer, return_code)
            raise AMQTTError(f"CONNECT from {remote_address}:{remote_port} refused")
        self._install(handler)
        session.blendsm_authenticated = True
        subject = certificate_subject(session)
        if subject is not None:
            _CERTIFICATE_LOG.note(
                "client %r (%s) connected with client certificate %s",
                session.client_id,
                session.username,
                subject,
            )
        if session.clean_session:
            if session.client_id:
                existing_pair = self._sessions.get(session.client_id)
                if existing_pair is not None:
                    other: Identity | None = getattr(existing_pair[0], "blendsm", None)
                    if other is not None and other.key != session.blendsm.key:
                        _CLIENT_ID_LOG.note(
                            "CONNECT refused: client id %r belongs to another identity",
                            session.client_id,
                        )
                        await self._refuse(writer, IDENTIFIER_REJECTED)
                        raise AMQTTError("client id taken by another identity")
                await self._delete_session(session.client_id)
            else:
                from amqtt.broker import gen_client_id

                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            existing_session, _ = self._sessions[session.client_id]
            for name in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "keep_alive",
                "username",
                "password",
            ):
                setattr(existing_session, name, getattr(session, name))
            existing_session.blendsm = session.blendsm
            existing_session.is_anonymous = session.is_anonymous
            existing_session.blendsm_authenticated = True
            session = existing_session
            session.parent = 1
            self.keeper.connected(session.client_id)
            release_hold(session)  # a take-over: deliveries held for the last one go out
            session.blendsm_hold = asyncio.Event()  # released once redelivery and replay ran
        else:
            session.parent = 0
        # The reader's timeout: 1.5 x the keepalive the client asked for (MQTT-3.1.2-24), plus
        # amqtt's optional extra delay; 0 means the client asked for no keepalive.
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0:
            extra = delay if isinstance(delay, int) else 0
            session.keep_alive = session.keep_alive * KEEPALIVE_GRACE + extra
        return handler, session

    async def _refuse(self, writer: Any, return_code: int) -> None:
        try:
            await ConnackPacket.build(0, return_code).to_stream(writer)
        except Exception as exc:  # the client may already be gone
            self.logger.debug("CONNACK refusal not sent: %s", exc)
        await writer.close()

    async def _authenticate(self, session: Session, _: Any) -> bool:
        # Decided in _initialize_client_session, before any session take-over.
        return bool(getattr(session, "blendsm_authenticated", False))

    async def _handle_client_session(
        self,
        reader: Any,
        writer: Any,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Server,
        listener_name: str,
    ) -> None:
        """amqtt's session lifecycle without its scan of every subscription filter on each
        CONNECT (retained messages go out on SUBSCRIBE only; the scan sent nothing here and
        cost O(all filters) per CONNECT)."""
        authenticated = await self._authenticate(client_session, None)
        if client_session.client_id is None:
            raise BrokerError("Client ID was not correctly created/set.")
        while True:
            try:
                client_session.transitions.connect()
                break
            except (MachineError, ValueError):
                if client_session.transitions.is_connected():
                    _TAKEOVER_LOG.note(
                        "client %r is already connected: taken over by its new connection",
                        client_session.client_id,
                    )
                    old_session = self._sessions[client_session.client_id]
                    await old_session[1].handle_connection_closed()
                    await old_session[1].stop()
                    break
                _TAKEOVER_LOG.note(
                    "client %r is reconnecting too quickly: made to wait 1 s",
                    client_session.client_id,
                )
                await asyncio.sleep(1)
        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)
        await handler.mqtt_connack_authorize(authenticated)
        if not authenticated:
            await writer.close()
            return
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED,
            client_id=client_session.client_id,
            client_session=client_session,
        )
        await handler.start()
        await self._publish_session_retained_messages(client_session)
        await self._client_message_loop(client_session, handler)

    async def _client_message_loop(
        self, client_session: Session, handler: BrokerProtocolHandler
    ) -> None:
        """amqtt's loop over a session's DISCONNECT, SUBSCRIBE, UNSUBSCRIBE and PUBLISH,
        without formatting the whole subscription table after each SUBSCRIBE (amqtt's
        ``logger.debug(repr(self._subscriptions))``, evaluated whatever the log level). When
        the session's queues are :class:`SmallQueue`s, the loop waits on them with one future
        (:meth:`_small_message_loop`), instead of one per queue and ``asyncio.wait``."""
        queues = _small_queues(client_session, handler)
        if queues is not None:
            await self._small_message_loop(client_session, handler, *queues)
            return
        disconnect_waiter = _disconnect_of(handler)
        subscribe_waiter = _next_of(handler, "_pending_subscriptions")
        unsubscribe_waiter = _next_of(handler, "_pending_unsubscriptions")
        wait_deliver = _next_delivery(handler)
        connected = True
        while connected:
            try:
                done, _ = await asyncio.wait(
                    [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if disconnect_waiter in done:
                    await self._handle_disconnect(client_session, handler, disconnect_waiter)
                    connected = False
                if subscribe_waiter in done:
                    await self._handle_subscription(client_session, handler, subscribe_waiter)
                    subscribe_waiter = _next_of(handler, "_pending_subscriptions")
                if unsubscribe_waiter in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe_waiter)
                    unsubscribe_waiter = _next_of(handler, "_pending_unsubscriptions")
                if wait_deliver in done:
                    if not await self._handle_message_delivery(
                        client_session, handler, wait_deliver
                    ):
                        break
                    wait_deliver = _next_delivery(handler)
            except asyncio.CancelledError:
                self.logger.debug("Client loop cancelled")
                break
        waiters = [subscribe_waiter, unsubscribe_waiter, wait_deliver]
        if disconnect_waiter is not getattr(handler, "_disconnect_waiter", None):
            waiters.append(disconnect_waiter)  # ours to cancel, not the handler's own future
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)

    async def _small_message_loop(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        disconnect: asyncio.Future[Any],
        subscriptions: SmallQueue[Any],
        unsubscriptions: SmallQueue[Any],
        deliveries: SmallQueue[Any],
    ) -> None:
        """amqtt's rounds (at most one SUBSCRIBE, one UNSUBSCRIBE and one PUBLISH of those
        ready, in that order), the items handed on as resolved futures, as amqtt's handlers
        expect. Once the disconnect is seen, what the client sent before it is handled first,
        all of it (bounded: what is queued at that moment), then the disconnect: amqtt handled
        the disconnect first and at most one more PUBLISH, so a PUBLISH sent just before a
        DISCONNECT could be lost. While nothing is ready the loop waits on one future that a
        put on any queue, or the disconnect, resolves."""
        loop = asyncio.get_running_loop()
        queues = (subscriptions, unsubscriptions, deliveries)
        try:
            while True:
                if disconnect.done():
                    for _ in range(max(queue.qsize() for queue in queues)):
                        if not await self._message_round(client_session, handler, *queues):
                            break
                    await self._handle_disconnect(client_session, handler, disconnect)
                    break
                if not await self._message_round(client_session, handler, *queues):
                    break
                if disconnect.done() or any(queue.qsize() for queue in queues):
                    continue
                wake: asyncio.Future[None] = loop.create_future()
                for queue in queues:
                    queue.watch(wake)

                def woken(_: asyncio.Future[Any], wake: asyncio.Future[None] = wake) -> None:
                    if not wake.done():
                        wake.set_result(None)

                disconnect.add_done_callback(woken)
                try:
                    await wake
                finally:
                    disconnect.remove_done_callback(woken)
                    for queue in queues:
                        queue.watch(None)
        except asyncio.CancelledError:
            self.logger.debug("Client loop cancelled")

    async def _message_round(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        subscriptions: SmallQueue[Any],
        unsubscriptions: SmallQueue[Any],
        deliveries: SmallQueue[Any],
    ) -> bool:
        """One round of :meth:`_small_message_loop`; False when the loop must end. Up to two
        of the pending SUBSCRIBEs and UNSUBSCRIBEs, in the order the client sent them (amqtt
        took one SUBSCRIBE, then one UNSUBSCRIBE: an UNSUBSCRIBE and a SUBSCRIBE of the same
        filter sent together ended unsubscribed), then one PUBLISH."""
        loop = asyncio.get_running_loop()
        for _ in range(2):
            subscribed = _arrival(subscriptions)
            unsubscribed = _arrival(unsubscriptions)
            if subscribed is None and unsubscribed is None:
                break
            if unsubscribed is None or (subscribed is not None and subscribed < unsubscribed):
                item = _resolved(loop, subscriptions.get_nowait())
                await self._handle_subscription(client_session, handler, item)
            else:
                item = _resolved(loop, unsubscriptions.get_nowait())
                await self._handle_unsubscription(client_session, handler, item)
        if deliveries.qsize():
            item = _resolved(loop, deliveries.get_nowait())
            return bool(await self._handle_message_delivery(client_session, handler, item))
        return True


def _small_queues(
    session: Session, handler: BrokerProtocolHandler
) -> tuple[asyncio.Future[Any], SmallQueue[Any], SmallQueue[Any], SmallQueue[Any]] | None:
    """The handler's disconnect future and the session's three queues, when all three are
    :class:`SmallQueue`s and amqtt's own methods read them; else None."""
    disconnect: object = handler._disconnect_waiter
    subscriptions = handler._pending_subscriptions
    unsubscriptions = handler._pending_unsubscriptions
    deliveries = getattr(session, "delivered_message_queue", None)
    if (
        isinstance(disconnect, asyncio.Future)
        and type(handler).mqtt_deliver_next_message is _AMQTT_DELIVER
        and isinstance(subscriptions, SmallQueue)
        and isinstance(unsubscriptions, SmallQueue)
        and isinstance(deliveries, SmallQueue)
    ):
        return disconnect, subscriptions, unsubscriptions, deliveries
    return None


def _arrival(queue: SmallQueue[Any]) -> int | None:
    """When the oldest pending item of ``queue`` arrived; a plain :class:`SmallQueue` (a
    handler made elsewhere) counts as older than any :class:`ArrivalQueue`."""
    if not queue.qsize():
        return None
    return queue.head_arrival() if isinstance(queue, ArrivalQueue) else -1


def _resolved(loop: asyncio.AbstractEventLoop, item: Any) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = loop.create_future()
    future.set_result(item)
    return future


def _disconnect_of(handler: BrokerProtocolHandler) -> asyncio.Future[Any]:
    """``handler.wait_disconnect()`` as a future: the handler's own disconnect future (no
    Task around it), or one resolved with None when it has none (already closed)."""
    waiter: object = handler._disconnect_waiter
    if isinstance(waiter, asyncio.Future):
        return waiter
    return _task(handler.wait_disconnect())


def _next_of(handler: BrokerProtocolHandler, name: str) -> asyncio.Future[Any]:
    """The next pending SUBSCRIBE or UNSUBSCRIBE of ``handler``: a future of its
    :class:`SmallQueue`, or amqtt's coroutine in a Task for a handler made elsewhere."""
    queue = getattr(handler, name)
    if isinstance(queue, SmallQueue):
        return queue.next_item()
    if name == "_pending_subscriptions":
        return _task(handler.get_next_pending_subscription())
    return _task(handler.get_next_pending_unsubscription())


def _next_delivery(handler: BrokerProtocolHandler) -> asyncio.Future[Any]:
    """``handler.mqtt_deliver_next_message()`` (the session's next incoming PUBLISH) as a
    future of its :class:`SmallQueue` when it has one."""
    session = handler.session
    queue = getattr(session, "delivered_message_queue", None)
    if type(handler).mqtt_deliver_next_message is _AMQTT_DELIVER and isinstance(queue, SmallQueue):
        return queue.next_item()
    return _task(handler.mqtt_deliver_next_message())


def _task(coroutine: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
    return asyncio.ensure_future(coroutine)
